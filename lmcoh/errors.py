"""lmcoh's errors: one base class, a subclass per layer.

Every error the user can cause (a bad task file, a bad flag, a missing model directory, a
damaged run) is an `LmcohError` whose message is one line that names the problem. The CLI
and the recipes print that line and exit with the error's ``exit_status`` (2 unless the class
says otherwise); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LmcohError(ValueError):
    """A problem with the user's input; ``str(err)`` is one line for the user, and
    ``exit_status`` the status the command exits with (2; a subclass may name another)."""

    exit_status = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class TaskError(LmcohError):
    """A task that cannot be loaded or built."""


class BudgetError(LmcohError):
    """Work that would need more memory than the limit allows."""


class ModelError(LmcohError):
    """A model that cannot be built, loaded or saved."""


class DivergenceError(ModelError):
    """Training made the weights, or the model's probabilities, non-finite. The command that
    trained adds the hint: which of its flags to change."""


class RunError(LmcohError):
    """A bad recipe config, a run directory that cannot be used, or a run that cannot go on."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of a library's error message (they are often many lines long)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:limit]
