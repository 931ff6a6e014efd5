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
    installs = [line for line in pip_lines[1:] if " uninstall " not in line]
    assert installs and all('install -c "$lock"' in line for line in installs)


# The package's floors, bottom to top (docs/architecture.md): a module imports only from its own
# floor or below.
FLOORS = {
    "errors": 0,
    "hashing": 0,
    "objectives": 1,
    "io": 1,
    "modeling": 2,
    "viz": 2,
    "config": 3,
    "training": 4,
    "lab": 5,
    "cli": 6,
}


def package_imports() -> dict[str, set[str]]:
    """Module name (``dopd.x.y``) -> the dopd modules it imports anywhere in its source."""
    import ast

    imports = {}
    for path in (ROOT / "src" / "dopd").rglob("*.py"):
        parts = path.relative_to(ROOT / "src").with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dopd"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("dopd"))
        imports[name] = found
    return imports


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def test_no_import_runs_up_a_floor():
    imports = package_imports()
    assert {module.split(".")[1] for module in imports if "." in module} == set(FLOORS)
    upward = [
        f"{module} -> {target}"
        for module, targets in imports.items()
        for target in targets
        if floor(module) is not None and floor(target) is not None and floor(target) > floor(module)
    ]
    assert upward == []


def test_no_import_circle():
    imports = package_imports()
    modules = set(imports)
    graph = {m: {t for t in targets if t in modules and t != m} for m, targets in imports.items()}
    # A package's __init__ may name its own modules; the modules never import it back here.
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                raise AssertionError(" -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
