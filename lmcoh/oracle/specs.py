"""Policy specs: the one place that reads a policy named in words (``lmcoh show --policy SPEC``).

``p`` (the prior), ``retrain:K`` (G^K(p)), ``temperature:A`` (pi_alpha), ``KIND:K`` for the other
sequences of `lmcoh.oracle.exact.ALL_SEQUENCES` (k = K; klrl:K and klrl_success:K at beta = 1/K), ``boltzmann`` (the coherent limit of
Boltzmann iteration, delta = 1) or ``model:DIR`` (a language model, which the caller
tabulates: `model_dir`). numpy only.
"""

from __future__ import annotations

import math

from ..errors import LmcohError
from ..tasks.task import Task
from . import exact

_SEQUENCE_NAMES = {"retrain": "G^{k}(p)", "fold": "fold (Def 5.7), k = {k}", "fold_ratio": "fold of log(pi/p), k = {k}",
                   "cumulative": "cumulative fold, k = {k}", "klrl": "KL-RL, beta = 1/{k}, R = sum log q",
                   "klrl_success": "KL-RL, beta = 1/{k}, R = success"}
SPECS = ", ".join(["p", "retrain:K", "temperature:A"] + [f"{kind}:K" for kind in exact.ALL_SEQUENCES
                                                         if kind not in ("retrain", "temperature")]
                  + ["boltzmann"]) + " or model:DIR"


def model_dir(spec: str) -> str | None:
    """DIR of a ``model:DIR`` spec, else None."""
    kind, colon, arg = spec.partition(":")
    return arg if kind == "model" and colon and arg else None


def exact_policy(task: Task, spec: str) -> tuple[str, exact.Policy]:
    """(a title, the policy) for an exact policy SPEC; one-line `LmcohError` for anything else."""
    kind, colon, arg = spec.partition(":")
    if spec == "p":
        return "p (the prior)", exact.prior_policy(task)
    if spec == "boltzmann":
        return "coherent: Boltzmann iteration to its limit", exact.boltzmann_iteration(task)[-1]
    if kind == "temperature" and colon:
        alpha = _number(spec, arg, float)
        return f"temperature alpha = {alpha:g}", exact.temperature_policy(task, alpha)
    if kind in exact.ALL_SEQUENCES and colon:
        k = _number(spec, arg, int)
        title = "G(p)" if (kind, k) == ("retrain", 1) else _SEQUENCE_NAMES.get(kind, f"{kind}, k = {{k}}").format(k=k)
        if k == 0 and kind in exact.KLRL_SEQUENCES:
            title = "p (the prior: KL-RL at k = 0)"
        return title, exact.sequence(task, kind, k)[-1]
    raise LmcohError(f"policy {spec!r}: choose one of {SPECS}")


def _number(spec: str, text: str, kind: type) -> int | float:
    what = "a whole number >= 0" if kind is int else "a finite number >= 0"
    try:
        value = kind(text)
    except ValueError:
        raise LmcohError(f"policy {spec!r}: {text!r} is not {what}") from None
    if not 0 <= value < math.inf:
        raise LmcohError(f"policy {spec!r}: {text!r} is not {what}")
    return value
