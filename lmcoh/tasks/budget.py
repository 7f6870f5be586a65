"""Memory estimated before it is allocated.

Building a task and running the oracle cost memory in proportion to the *work*: the states,
actions and transitions reachable at each decision step, summed over the steps. Generators
and `Task.layers` estimate that sum before (or while) they build, and refuse past the limit
with one line that names the size and how to raise the limit, so a huge horizon or a spec
such as ``random-tree:T=30,A=6`` is refused within seconds instead of exhausting the machine.
A horizon longer than any path costs nothing: layers stop where every episode has ended.

The limit is ``LMCOH_MEMORY_LIMIT_GB`` (set by ``--memory_limit_gb GB`` of ``lmcoh`` and of the
recipes), by default half the machine's memory, at most 8 GiB.
"""

from __future__ import annotations

import os

from ..errors import BudgetError

ENV = "LMCOH_MEMORY_LIMIT_GB"
HOW_TO_RAISE = f"raise the limit with --memory_limit_gb GB (lmcoh and the recipes) or {ENV}"

# Measured on random trees (peak RSS over element counts), rounded up: bytes per state, action
# or transition of a task (names, texts, flat arrays), per element of a step's layer, per
# layer (numpy headers), and per element for one oracle sequence's temporaries.
TASK_BYTES = 200
LAYER_BYTES = 120
LAYER_OVERHEAD = 2048
ORACLE_BYTES = 100
POLICY_BYTES = 8
TABLE_BYTES = 250  # a policy as a {state: {action: prob}} table, per action


def limit_bytes() -> int:
    """The memory limit in bytes."""
    raw = os.environ.get(ENV)
    if raw:
        try:
            gb = float(raw)
        except ValueError:
            raise BudgetError(f"{ENV}={raw!r} is not a number of GB") from None
        if not gb > 0:
            raise BudgetError(f"{ENV} must be positive, got {raw}")
        return int(gb * 2 ** 30)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 16 * 2 ** 30
    return int(min(8 * 2 ** 30, physical // 2))


def set_limit_gb(gb: float | None) -> None:
    """Set the limit for this process and the processes it starts (None keeps it)."""
    if gb is not None:
        if not gb > 0:
            raise BudgetError(f"the memory limit must be a positive number of GB, got {gb}")
        os.environ[ENV] = str(gb)


def human(nbytes: float) -> str:
    for unit, size in (("TB", 2 ** 40), ("GB", 2 ** 30), ("MB", 2 ** 20)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes / 2 ** 10:.3g} KB" if nbytes >= 2 ** 10 else f"{nbytes:.0f} bytes"


def check(what: str, nbytes: float) -> None:
    """`BudgetError` naming ``what`` and its size when ``nbytes`` is over the limit."""
    limit = limit_bytes()
    if nbytes > limit:
        raise BudgetError(f"{what} needs about {human(nbytes)}, over the memory limit of {human(limit)}; "
                          f"{HOW_TO_RAISE}")


def task_bytes(states: float, actions: float, transitions: float) -> float:
    """A task's own arrays, plus its layers when every state is reachable at one step."""
    elements = states + actions + transitions
    return (TASK_BYTES + LAYER_BYTES) * elements


def oracle_bytes(layer_elements: float, actions: float, steps: int, tables: bool, sequences: int) -> float:
    """One oracle run over ``steps`` steps of ``sequences`` sequences (`lmcoh.oracle.exact.analyse`)."""
    held = sequences * (steps + 1) * actions * (POLICY_BYTES + (TABLE_BYTES if tables else 0))
    return ORACLE_BYTES * layer_elements + held
