"""The repository's own promises: the README's Quickstart commands are what CI runs, and setup
installs nothing outside the project's virtual environment."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    """The commands of the README's Quickstart block, comments stripped."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_quickstart_is_two_commands_that_set_up_first():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert all(command.startswith("bash scripts/setup.sh && .venv/bin/") for command in commands)
    assert commands[0].endswith("dopd demo") and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quickstart_commands()[1] in [line.strip() for line in ci]


def test_setup_uses_only_the_project_venv_and_the_lock():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    code = [line.split("#", 1)[0].strip() for line in setup.splitlines()]
    assert "venv=.venv" in code
    # pip is defined once as the venv's own, and every other mention of pip uses that definition.
    pip_lines = [line for line in code if re.search(r"\bpip\b", line) and "echo" not in line]
    assert pip_lines[0].startswith('pip=("$venv/bin/python" -m pip ')
    assert len(pip_lines) > 1 and all(line.startswith('"${pip[@]}" ') for line in pip_lines[1:])
    # Every install is constrained by the lock.
    assert all('install -c "$lock"' in line for line in pip_lines[1:])
