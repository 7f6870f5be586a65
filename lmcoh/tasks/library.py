"""Find a task by reference: a YAML path, a built-in name (``tasks/NAME.yaml``) or a generator spec.

The built-in tasks live in the repository's top-level ``tasks/`` folder; a wheel ships them as
``lmcoh/tasks/builtin/`` (pyproject.toml maps that package onto ``tasks/``).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from . import generators, taskfile
from .task import Task, TaskError

_SHIPPED = Path(__file__).resolve().parent / "builtin"
TASKS_DIR = _SHIPPED if _SHIPPED.is_dir() else Path(__file__).resolve().parents[2] / "tasks"


def builtin_tasks() -> list[str]:
    """Names of the built-in tasks, sorted."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def load_task(ref: str) -> Task:
    """The task ``ref`` names; any problem is a one-line `TaskError`.

    Tried in order: an existing file, a generator spec (``random-tree:...``, ``gridworld:...``,
    ``gym:...``), a built-in name.
    """
    ref = str(ref)
    path = Path(ref)
    if path.exists():
        return taskfile.load(path)
    if generators.is_spec(ref):
        return generators.generate(ref)
    if ref in builtin_tasks():
        return taskfile.load(TASKS_DIR / f"{ref}.yaml")
    if path.suffix in (".yaml", ".yml") or "/" in ref:
        raise TaskError(f"{ref}: no such file")
    hint = difflib.get_close_matches(ref, builtin_tasks(), n=1)
    tip = f"did you mean {hint[0]!r}? " if hint else ""
    raise TaskError(f"unknown task {ref!r}: {tip}give a YAML file, a built-in "
                    f"({', '.join(builtin_tasks())}) or a generator spec such as {generators.EXAMPLES[0]}")
