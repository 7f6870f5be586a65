"""What `lmcoh evaluate` reports about an LM policy: success, return, incoherence at the
state and token level, and distance to the re-training sequence G^k(p). numpy only.

The prior p of G^k(p) is the task's prior (``reference="task"``: the behaviour a model that lmcoh
conditioned was trained on) or the model's own unconditioned policy p_M (``"model"``: the
model prompted with no goal, aggregated per (step, state)), which any causal LM has zero-shot:
then tv_to_retrain[1] measures how far success prompting is from exact Bayesian conditioning of
the model's own behaviour.

Token-level incoherence. A state's actions are token sequences; they form a trie. Any
distribution over the actions induces token conditionals at each trie node (the mass of a
child's subtree over the node's mass), and by the chain rule

    KL(pi || pi^delta) = sum_j E_{prefix of length j ~ pi} KL(pi(.|prefix) || pi^delta(.|prefix)).

Both conditionals come from the action marginals (pi is the renormalised LM policy, which is
exactly what rollouts sample), so the position terms add up to the state-level KL. Summed over
states weighted by occupancy, ``by_position[j]`` is the incoherence spent at token j and the
positions add up to kappa_delta.
"""

from __future__ import annotations

import math

import numpy as np

from ..oracle import exact
from ..tasks.task import Task

RETRAIN_STEPS = 4  # tv_to_retrain reports k = 0..RETRAIN_STEPS
REFERENCES = ("task", "model")  # whose prior p the sequence G^k(p) starts from


def token_terms(tokens: list[tuple[int, ...]], p: np.ndarray, pd: np.ndarray) -> list[float]:
    """Per-token-position KL terms of KL(p || pd) for actions written as ``tokens``.

    An action whose sequence is a proper prefix of another ends at an internal node; ending
    there counts as one more child (the end symbol).
    """
    depth = max(len(seq) for seq in tokens)
    terms = [0.0] * depth
    for j in range(depth):
        groups: dict[tuple, dict[object, list[float]]] = {}
        for seq, a, b in zip(tokens, p, pd):
            if len(seq) < j:
                continue
            child = seq[j] if len(seq) > j else None
            node = groups.setdefault(seq[:j], {})
            mass = node.setdefault(child, [0.0, 0.0])
            mass[0] += a
            mass[1] += b
        for node in groups.values():
            if len(node) == 1:
                continue  # one way on: the conditional is 1 under both, the term is 0
            total_p = sum(m[0] for m in node.values())
            total_d = sum(m[1] for m in node.values())
            kl = sum((cp * (math.log(cp / total_p) - math.log(cd / total_d)) if cd > 0 else math.inf)
                     for cp, cd in node.values() if cp > 0)
            terms[j] += max(kl, 0.0)  # a KL: float rounding must not make it negative
    return terms


def token_incoherence(task: Task, policy: exact.Policy, action_tokens: list[tuple[int, ...]],
                      delta: float = 1.0, occ: list[np.ndarray] | None = None) -> dict:
    """``{"total": kappa, "by_position": [sum over states of d(s) * position-j KL term]}``."""
    occ = exact.occupancy(task, policy) if occ is None else occ
    target = exact.boltzmann_policy(task, policy, delta)
    by_position: list[float] = []
    for t, layer in enumerate(task.layers):
        for i in np.flatnonzero(occ[t] > 0):
            lo, hi = layer.start[i], layer.start[i + 1]
            acts = layer.actions[lo:hi]
            terms = token_terms([action_tokens[a] for a in acts], policy[t][lo:hi], target[t][lo:hi])
            by_position += [0.0] * (len(terms) - len(by_position))
            for j, x in enumerate(terms):
                if x:
                    by_position[j] += occ[t][i] * x
    total = math.inf if any(math.isinf(x) for x in by_position) else float(sum(by_position))
    return {"total": total, "by_position": by_position}


def tv_to(task: Task, policy: exact.Policy, targets: list[exact.Policy],
          occ: list[np.ndarray] | None = None) -> list[float]:
    """Visit-weighted TV (under ``policy``'s own normalised visits) to each target policy."""
    occ = exact.occupancy(task, policy) if occ is None else occ
    return [exact.tv_distance(task, policy, target, occ) for target in targets]


def report(task: Task, lm, goal: str, delta: float = 1.0, reference: exact.Policy | None = None,
           reference_success: float | None = None) -> dict:
    """The `lmcoh evaluate --json` object for a tabulated LM policy (`tabulate.LMPolicy`), with
    G^k of ``reference`` (default: the task's prior); ``success_of_retrain[k]`` is the exact
    success of G^k of it. ``reference_success``, when given, is the reference model's own
    success (over histories, like ``success``)."""
    pi = lm.policy
    occ = exact.occupancy(task, pi)
    state = exact.summary(task, pi, delta)
    tokens = token_incoherence(task, pi, lm.action_tokens, delta, occ)
    targets = exact.sequence(task, "retrain", RETRAIN_STEPS, reference)
    out = {"task": task.name, "goal": goal,
           "success": float(lm.success),
           "return": state["return"],
           "incoherence": state["incoherence"],
           "incoherence_finite_part": float(state["incoherence_finite_part"]),
           "token_incoherence": {"total": tokens["total"], "by_position": tokens["by_position"]},
           "tv_to_retrain": tv_to(task, pi, targets, occ),
           "success_of_retrain": [exact.success(task, g) for g in targets],
           "reference": "task" if reference is None else "model",
           "histories": int(lm.histories),
           "exact": bool(lm.exact)}
    if not lm.exact:
        out["success_ci"] = float(lm.success_ci)
        out["episodes"] = int(lm.episodes)
    out["policy"] = exact.policy_table(task, pi)
    if reference is not None:
        out["reference_policy"] = exact.policy_table(task, reference)
    if reference_success is not None:
        out["reference_success"] = float(reference_success)
    return out


def evaluate(loaded, task: Task, goal: str = "success", temperature: float = 1.0,
             layout=None, delta: float = 1.0, max_histories: int = 200_000, *,
             reference: str = "task", seed: int = 0, batch_size: int = 256, mc_episodes: int = 4000,
             progress: bool = False) -> dict:
    """Tabulate ``loaded`` prompted with ``goal`` on ``task`` (in ``layout``, default compact
    history prompts) and `report` on it, against G^k of the task's prior (``reference="task"``)
    or of the model's own policy with no goal at temperature 1 (``"model"``)."""
    from .tabulate import tabulate  # torch: only when a model is evaluated
    from .text import Layout

    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; choose one of {', '.join(REFERENCES)}")
    layout = Layout() if layout is None else layout

    def table(goal: str, temperature: float):
        return tabulate(loaded, task, goal, temperature, layout, max_histories, seed=seed,
                        batch_size=batch_size, mc_episodes=mc_episodes, progress=progress)

    lm = table(goal, temperature)
    if reference == "model":
        prior = lm if goal == "none" and temperature == 1.0 else table("none", 1.0)
        out = report(task, lm, goal, delta, prior.policy, prior.success)
    else:
        out = report(task, lm, goal, delta)
    out.update({"temperature": temperature, "format": layout.format, "prompt": layout.mode,
                "goal_text": layout.goal_text})
    return out
