"""Runs: what the recipes (recipes/*.py) call. Their arguments (`arguments`), their output
directory (`directory`), the pieces of a self-training round (`selftrain`) and of the
temperature-versus-retraining comparison (`temperature`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def load_recipe(name: str) -> ModuleType:
    """The module of recipes/NAME.py (the loops live there; one recipe reuses another's)."""
    spec = importlib.util.spec_from_file_location(f"lmcoh_recipe_{name}", RECIPES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
