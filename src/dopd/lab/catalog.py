"""The tasks a lab run can name: the built-in ones, and ``path/to/file.py:ClassName`` files.

Kept apart from ``dopd.lab.task`` because every built-in task imports that interface.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

from dopd.errors import ConfigError
from dopd.lab.arithmetic import PlanArithmetic
from dopd.lab.cyclesum import CycleSum
from dopd.lab.shiftmap import ShiftMap
from dopd.lab.task import Task

BUILTIN_TASKS: dict[str, type[Task]] = {
    task.name: task for task in (PlanArithmetic, CycleSum, ShiftMap)
}


def task_names() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(BUILTIN_TASKS)


def load_task(spec: str) -> Task:
    """A built-in task by name (see ``task_names()``), or ``path/to/file.py:ClassName`` — a
    ``Task`` subclass defined in a file outside the package, instantiated with no arguments."""
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec]()
    path, _, class_name = spec.rpartition(":")
    if not path.endswith(".py") or not class_name:
        raise ConfigError(
            f"task={spec!r} is neither a built-in task ({', '.join(task_names())}) "
            "nor 'path/to/file.py:ClassName'"
        )
    task_class = getattr(_load_module(spec, path), class_name, None)
    if task_class is None:
        raise ConfigError(f"task={spec!r}: {path!r} defines no {class_name!r}; check the name")
    if not (inspect.isclass(task_class) and issubclass(task_class, Task)):
        raise ConfigError(
            f"task={spec!r}: {class_name!r} is not a subclass of dopd.lab.task.Task; "
            "derive it from Task"
        )
    return task_class()


def _load_module(spec: str, path: str):
    if not Path(path).is_file():
        raise ConfigError(f"task={spec!r}: no such file {path!r}; check the path")
    module_name = f"dopd_user_task_{Path(path).stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"task={spec!r}: cannot import {path!r}; check that it is Python source")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running, so dataclasses and pickling inside the file can find it.
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    return module
