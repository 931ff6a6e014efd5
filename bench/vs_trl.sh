#!/usr/bin/env bash
# One command for bench/vs_trl.py: build the TRL virtualenv once, then run the bench in it.
#
#     bash bench/vs_trl.sh --json docs/bench-vs-trl-cpu.json [other bench/vs_trl.py options]
#
# The venv ($TRL_VENV, default /tmp/trlvenv) sees the project's .venv (made by scripts/setup.sh)
# and gets only the pinned TRL, installed with --no-deps so that pip cannot replace the project's
# torch or transformers.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${TRL_VENV:-/tmp/trlvenv}"
pin="$(grep -E '^trl==' "$here/requirements-trl.txt")"
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('trl') != '${pin#trl==}')" 2>/dev/null; then
    project="$here/../.venv/bin/python"
    "$project" -m venv "$venv"
    purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
    # An "import" line in a .pth file runs at start-up: the project's packages, editable dopd too.
    echo "import site; site.addsitedir('$("$project" -c "$purelib")')" \
        >"$("$venv/bin/python" -c "$purelib")/dopd-project.pth"
    "$venv/bin/pip" install --quiet --no-deps "$pin"
fi
exec "$venv/bin/python" "$here/vs_trl.py" "$@"
