#!/usr/bin/env bash
# Refreshes requirements/lock.txt: resolves dopd[dev] afresh (newest releases inside
# pyproject.toml's ranges, torch held at the lock's version unless TORCH= says otherwise) in a
# scratch virtual environment, runs the style checks and the whole suite there, and writes the
# lock only if they pass. Review the diff, then commit it with the suite's summary line.
#
#   bash scripts/lock.sh                 # TORCH=2.13.0 by default
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
lock=requirements/lock.txt
torch_version=${TORCH:-$(sed -n 's/^torch==//p' "$lock")}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

"$python" -m venv "$scratch/venv"
pip=("$scratch/venv/bin/python" -m pip --quiet --disable-pip-version-check)
"${pip[@]}" install "torch==$torch_version"
"${pip[@]}" install -e ".[dev]"
"$scratch/venv/bin/ruff" check src tests bench scripts
"$scratch/venv/bin/ruff" format --check src tests bench scripts
"$scratch/venv/bin/python" -m pytest

{
    echo "# Versions the whole suite passed with; setup and CI install with these as constraints."
    echo "# Made by scripts/lock.sh on $(date -u +%Y-%m-%d), $("$scratch/venv/bin/python" -V), $(uname -sm)."
    # A local version label (+cpu) names one index's build; the version is what is locked.
    "${pip[@]}" freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} >"$lock.new"
mv "$lock.new" "$lock"
echo "wrote $lock"
