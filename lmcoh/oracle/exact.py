"""The exact oracle: every quantity of docs/theory.md by dynamic programming over (step, state).

numpy only (no torch). A *policy* is ``list[np.ndarray]``: entry ``t`` holds the action
probabilities over ``task.layers[t].actions`` (the flat actions of the states reachable at
decision step ``t``). All values live in log space, so q = 0 is a clean ``-inf``.

Conventions where the theory leaves a case open (documented, and tested):
* conditioning on an event of probability zero leaves a state's policy unchanged: at a state
  where every action has ``pi(a) exp Q(a) = 0``, ``G(pi)`` keeps ``pi``; where every action has
  ``Q = -inf``, ``pi^delta`` is taken to be ``pi`` (no action is better, so nothing is incoherent).
* incoherence is ``+inf`` when pi puts mass on an action that ``pi^delta`` gives zero.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..errors import LmcohError
from ..tasks.task import Task
from ..tasks.task import safe_log as _log

Policy = list[np.ndarray]
SEQUENCES = ("retrain", "temperature", "fold", "fold_ratio", "cumulative")  # the paper's (Section 5)
KLRL_SEQUENCES = ("klrl", "klrl_success")  # KL-regularised RL, beta = 1/k (lmcoh.oracle.klrl)
ALL_SEQUENCES = SEQUENCES + KLRL_SEQUENCES


def _scaled(logq: np.ndarray | float, alpha: float) -> np.ndarray:
    """alpha * log q with q**0 = 1 (so alpha = 0 gives the prior even where q = 0)."""
    logq = np.asarray(logq, dtype=float)
    if alpha == 0:
        return np.zeros_like(logq)
    with np.errstate(invalid="ignore"):
        return np.where(np.isneginf(logq), -np.inf, alpha * logq)


# ---- policies ---------------------------------------------------------------------------------
def prior_policy(task: Task) -> Policy:
    return [task.prior[layer.actions].copy() for layer in task.layers]


def uniform_policy(task: Task) -> Policy:
    return [1.0 / layer.by_state.repeat(layer.by_state.counts) for layer in task.layers]


# ---- backward passes ---------------------------------------------------------------------------
def _backup(task: Task, combine: Callable[[int, np.ndarray], np.ndarray], reward_scale: float = 1.0,
            bonus: Policy | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Backward induction. ``combine(t, Q_t)`` turns action values into state values."""
    v = np.where(task.terminal, _scaled(task.terminal_logq, reward_scale),
                 _scaled(task.timeout_logq, reward_scale))
    Q: list[np.ndarray] = [np.zeros(0)] * task.steps
    V: list[np.ndarray] = [np.zeros(0)] * task.steps
    for t in reversed(range(task.steps)):
        layer = task.layers[t]
        if t == task.steps - 1:
            cont = _last_continuation(task, reward_scale)
        else:
            cont = _continuation(layer, v)
        q = _scaled(task.action_logq[layer.actions], reward_scale) + cont
        if bonus is not None:
            q = q + bonus[t]
        Q[t], V[t] = q, combine(t, q)
        v[layer.states] = V[t]
    return Q, V


def _continuation(layer, v: np.ndarray) -> np.ndarray:
    """log E_{s' ~ tau(.|s, a)} exp v(s') for every action of the layer."""
    cont = layer.trans_logp + v[layer.trans_next]
    return cont if layer.by_action.width == 1 else layer.by_action.logsumexp(cont)


def _last_continuation(task: Task, reward_scale: float) -> np.ndarray:
    """The last step's continuation values depend only on the reward scale: cache them,
    since the last layer is usually the largest (3/4 of a tree's transitions)."""
    cache = task.oracle_cache.setdefault("last_continuation", {})
    if reward_scale not in cache:
        v = np.where(task.terminal, _scaled(task.terminal_logq, reward_scale),
                     _scaled(task.timeout_logq, reward_scale))
        cache.clear()  # keep one scale: sequences ask for the same scale many times in a row
        cache[reward_scale] = _continuation(task.layers[-1], v)
    return cache[reward_scale]


def soft_values(task: Task, policy: Policy, reward_scale: float = 1.0,
                bonus: Policy | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Soft Q^pi and V^pi (docs/theory.md, "Soft values of a policy"): exp Q = P(success from (s, a) | later actions from pi).

    ``reward_scale`` multiplies every log q (temperature); ``bonus`` adds a per-action reward
    (the folded sequences' extra log-policy terms).
    """
    def combine(t: int, q: np.ndarray) -> np.ndarray:
        layer = task.layers[t]
        return layer.by_state.logsumexp(_log(policy[t]) + q)

    return _backup(task, combine, reward_scale, bonus)


def _condition(task: Task, policy: Policy, Q: list[np.ndarray]) -> Policy:
    """pi(a|s) exp Q(s, a), renormalised per state (conditioning on success)."""
    return [layer.by_state.softmax(_log(p) + q, p)
            for p, q, layer in zip(policy, Q, task.layers)]


def goal_condition(task: Task, policy: Policy) -> Policy:
    """G(pi)(a|s) = pi(a | s, O = 1), proportional to pi(a|s) exp Q^pi(s, a)."""
    return _condition(task, policy, soft_values(task, policy)[0])


def temperature_policy(task: Task, alpha: float, prior: Policy | None = None) -> Policy:
    """pi_alpha(a|s) = p(a | s, O^alpha = 1) with P(O^alpha = 1 | s, a) = q(s, a)^alpha (Def 5.6)."""
    prior = prior_policy(task) if prior is None else prior
    return _condition(task, prior, soft_values(task, prior, reward_scale=alpha)[0])


def sequence(task: Task, kind: str, steps: int, prior: Policy | None = None,
             epsilon: float | None = None) -> list[Policy]:
    """Policies k = 0..steps of one optimisation-pressure sequence (Section 5), starting from
    ``prior`` (default: the task's prior; e.g. a language model's own unconditioned policy).

    retrain:     pi_0 = p, pi_{k+1} = G(pi_k)
    temperature: pi_alpha with alpha = k
    fold:        Def 5.7 as printed: r_{k+1} = r_0 + log pi^F_{k+1}
    fold_ratio:  the corrected fold, r_{k+1} = r_0 + log(pi^F_{k+1} / p) (equals retrain for any prior)
    cumulative:  Def 5.8: r_{k+1} = r_k + log pi^H_{k+1}
    klrl, klrl_success: the optimum of E[R] - (1/k) KL(pi || p) for R = sum log max(q, epsilon)
                 and R = success (lmcoh.oracle.klrl; epsilon defaults to klrl.EPSILON)
    """
    p = prior_policy(task) if prior is None else prior
    if kind in KLRL_SEQUENCES:
        from . import klrl

        return [o.policy for o in klrl.optima(task, kind, steps, p, _epsilon(epsilon))]
    if kind == "retrain":
        out = [p]
        for _ in range(steps):
            out.append(goal_condition(task, out[-1]))
        return out
    if kind == "temperature":
        return [p] + [temperature_policy(task, float(k), p) for k in range(1, steps + 1)]
    if kind not in ("fold", "fold_ratio", "cumulative"):
        raise ValueError(f"unknown sequence {kind!r}; choose one of {', '.join(ALL_SEQUENCES)}")
    out, bonus = [p], None
    logp = [_log(x) for x in p]
    for _ in range(steps):
        pi = _condition(task, p, soft_values(task, p, bonus=bonus)[0])
        out.append(pi)
        logpi = [_log(x) for x in pi]
        if kind == "fold":
            bonus = logpi
        elif kind == "fold_ratio":
            bonus = [a - b for a, b in zip(logpi, logp)]
        else:
            bonus = logpi if bonus is None else [b + a for b, a in zip(bonus, logpi)]
    return out


def boltzmann_policy(task: Task, policy: Policy, delta: float = 1.0) -> Policy:
    """pi^delta(a|s) proportional to exp(Q^pi(s, a) / delta) - no prior factor (Def 4.6)."""
    Q, _ = soft_values(task, policy)
    return [layer.by_state.softmax(q / delta, p)
            for p, q, layer in zip(policy, Q, task.layers)]


def boltzmann_iteration(task: Task, delta: float = 1.0, steps: int | None = None,
                        start: Policy | None = None) -> list[Policy]:
    """pi <- pi^delta from ``start`` (the prior); coherent within T steps (Prop 4.10)."""
    out = [prior_policy(task) if start is None else start]
    for _ in range(task.steps if steps is None else steps):
        out.append(boltzmann_policy(task, out[-1], delta))
    return out


# ---- forward quantities ------------------------------------------------------------------------
def _expect(weights: np.ndarray, values: np.ndarray) -> float:
    """sum(weights * values) where zero weight times -inf counts as 0."""
    live = weights > 0
    return float(np.sum(weights[live] * values[live]))


def _action_outcomes(task: Task, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Per action of layer t: expected log q collected on the step (own q plus terminal q
    reached; -inf if a q = 0 outcome is possible) and the probability of not terminating."""
    cache = task.oracle_cache.setdefault("action_outcomes", {})
    if t not in cache:
        layer = task.layers[t]
        prob = np.exp(layer.trans_logp)
        term = task.terminal[layer.trans_next]
        r = np.where(term, task.terminal_logq[layer.trans_next], 0.0)
        with np.errstate(invalid="ignore"):
            expected = layer.by_action.sum(np.where(prob > 0, prob * r, 0.0))
        reward = task.action_logq[layer.actions] + expected
        cache[t] = (reward, layer.by_action.sum(np.where(term, 0.0, prob)))
    return cache[t]


def _forward(task: Task, policy: Policy) -> tuple[list[np.ndarray], float, float]:
    """One pass forward in time: occupancy d_pi^t, return J(pi) and causal entropy H(pi)."""
    mass = np.where(task.terminal, 0.0, task.start_prob)
    start_term = task.terminal & (task.start_prob > 0)
    ret = _expect(task.start_prob[start_term], task.terminal_logq[start_term])
    occ, ent, alive = [], 0.0, 0.0
    for t, layer in enumerate(task.layers):
        d = mass[layer.states]
        occ.append(d)
        p = policy[t]
        flow = layer.by_state.repeat(d) * p
        with np.errstate(divide="ignore", invalid="ignore"):
            ent -= float(np.sum(np.where(flow > 0, flow * np.log(p), 0.0)))
        reward, stay = _action_outcomes(task, t)
        ret += _expect(flow, reward)
        if t == task.steps - 1:
            alive = float(np.dot(flow, stay))
        else:
            w = layer.by_action.repeat(flow) * np.exp(layer.trans_logp)
            mass = np.bincount(layer.trans_next, weights=w, minlength=task.n_states)
            mass[task.terminal] = 0.0
    if alive > 0:
        ret += alive * task.timeout_logq
    return occ, float(ret), ent


def occupancy(task: Task, policy: Policy) -> list[np.ndarray]:
    """d_pi^t(s): probability of being in each reachable state at decision step t."""
    return _forward(task, policy)[0]


def expected_return(task: Task, policy: Policy) -> float:
    """J(pi) = E[sum of log q] (-inf when a q = 0 event has positive probability)."""
    return _forward(task, policy)[1]


def causal_entropy(task: Task, policy: Policy) -> float:
    """H(pi) = E[sum_t H(pi(.|s_t))]."""
    return _forward(task, policy)[2]


def success(task: Task, policy: Policy) -> float:
    _, V = soft_values(task, policy)
    return _success_from_values(task, V)


def _success_from_values(task: Task, V: list[np.ndarray]) -> float:
    layer0 = task.layers[0]
    s = float(np.sum(task.start_prob[layer0.states] * np.exp(V[0])))
    term = task.terminal & (task.start_prob > 0)
    return probability(s + float(np.sum(task.start_prob[term] * np.exp(task.terminal_logq[term]))))


def probability(x: float) -> float:
    """``x`` kept within [0, 1], where float rounding of a sum of probabilities overshoots (1.0000000000000002)."""
    return min(1.0, max(0.0, x))


def optimal_values(task: Task) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Q* and V* in log space: the best success probability from (s, a) and from s (hard max backup)."""
    def best(t: int, q: np.ndarray) -> np.ndarray:
        return task.layers[t].by_state.max(q)

    return _backup(task, best)


def optimal_success(task: Task) -> float:
    """max over policies of the success probability."""
    return _success_from_values(task, optimal_values(task)[1])


def max_backup(task: Task, Q: list[np.ndarray]) -> list[np.ndarray]:
    """One step of value iteration on action values ``Q`` (log space): log q(s, a) + log E[max_a' exp Q(s', a')].
    From any Q, ``task.steps - 1`` steps reach Q*."""
    out = []
    for t, layer in enumerate(task.layers):
        v = np.where(task.terminal, task.terminal_logq, task.timeout_logq)
        if t + 1 < task.steps:
            nxt = task.layers[t + 1]
            v[nxt.states] = nxt.by_state.max(Q[t + 1])
        out.append(task.action_logq[layer.actions] + _continuation(layer, v))
    return out


def acceptance_rate(task: Task, alpha: float) -> float:
    """E_p[prod q^alpha]: the share of prior episodes rejection sampling at ``alpha`` accepts."""
    _, V = soft_values(task, prior_policy(task), reward_scale=alpha)
    layer0 = task.layers[0]
    rate = float(np.sum(task.start_prob[layer0.states] * np.exp(V[0])))
    ends = task.terminal & (task.start_prob > 0)
    return probability(rate + float(np.sum(task.start_prob[ends] * np.exp(_scaled(task.terminal_logq[ends], alpha)))))


# ---- incoherence -------------------------------------------------------------------------------
def incoherence_terms(task: Task, policy: Policy, delta: float = 1.0,
                      Q: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """KL(pi(.|s) || pi^delta(.|s)) for every (step, reachable state); +inf where infinite, and
    never below 0 (float rounding of a vanishing KL gives values such as -3e-55)."""
    Q = soft_values(task, policy)[0] if Q is None else Q
    out = []
    for p, q, layer in zip(policy, Q, task.layers):
        # log pi^delta in log space: exp(Q/delta) underflows for Q gaps above ~745 delta
        z = q / delta
        lz = layer.by_state.repeat(layer.by_state.logsumexp(z))
        with np.errstate(divide="ignore", invalid="ignore"):
            log_pd = np.where(np.isfinite(lz), z - lz, np.log(p))
            terms = np.where(p > 0, p * (np.log(p) - log_pd), 0.0)
        out.append(np.maximum(layer.by_state.sum(terms), 0.0))
    return out


def _weigh(occ: list[np.ndarray], terms: list[np.ndarray], finite_only: bool) -> float:
    total = 0.0
    for d, kl in zip(occ, terms):
        live = d > 0
        if finite_only:
            live &= np.isfinite(kl)
        elif np.any(np.isinf(kl[live])):
            return math.inf
        total += float(np.dot(d[live], kl[live]))
    return total


def incoherence(task: Task, policy: Policy, delta: float = 1.0) -> float:
    """kappa_delta(pi) = sum_t E_{s ~ d_pi^t} KL(pi(.|s) || pi^delta(.|s)) (Def 4.6, 4.12)."""
    return _weigh(occupancy(task, policy), incoherence_terms(task, policy, delta), False)


def incoherence_finite_part(task: Task, policy: Policy, delta: float = 1.0) -> float:
    """The same sum over the states whose KL is finite (the 'finite per-state parts')."""
    return _weigh(occupancy(task, policy), incoherence_terms(task, policy, delta), True)


# ---- comparisons and display -------------------------------------------------------------------
def tv_distance(task: Task, policy: Policy, other: Policy,
                occ: list[np.ndarray] | None = None) -> float:
    """State-visit-weighted total variation, weights = pi's own occupancy normalised to sum 1."""
    occ = occupancy(task, policy) if occ is None else occ
    num = den = 0.0
    for t, layer in enumerate(task.layers):
        tv = 0.5 * layer.by_state.sum(np.abs(policy[t] - other[t]))
        num += float(np.dot(occ[t], tv))
        den += float(occ[t].sum())
    return probability(num / den) if den > 0 else 0.0


def policy_table(task: Task, policy: Policy) -> dict[str, dict[str, float]]:
    """{STATE or STATE@t: {ACTION: prob}} over every reachable (step, state)."""
    table = {}
    for keys, p, layer in zip(task.policy_keys(), policy, task.layers):
        for i, key in enumerate(keys):
            lo, hi = layer.start[i], layer.start[i + 1]
            table[key] = {task.action_names[a]: float(x) for a, x in zip(layer.actions[lo:hi], p[lo:hi])}
    return table


def policy_from_table(task: Task, table: dict[str, dict[str, float]]) -> Policy:
    """The policy a `policy_table` shows (as read back from a JSON file), in array form."""
    policy = []
    for keys, layer in zip(task.policy_keys(), task.layers):
        owners = np.repeat(keys, layer.by_state.counts)
        try:
            policy.append(np.array([float(table[key][task.action_names[a]])
                                    for key, a in zip(owners, layer.actions)]))
        except KeyError as err:
            raise LmcohError(f"the policy table has no probability for {err.args[0]!r} of {task.name}") from None
    return policy


def summary(task: Task, policy: Policy, delta: float = 1.0,
            values: tuple[list[np.ndarray], list[np.ndarray]] | None = None) -> dict:
    """Success, return, incoherence (and its finite part) and causal entropy of one policy.

    ``values`` may pass in ``soft_values(task, policy)`` when the caller already has them.
    """
    Q, V = soft_values(task, policy) if values is None else values
    occ, ret, ent = _forward(task, policy)
    terms = incoherence_terms(task, policy, delta, Q)
    return {"success": _success_from_values(task, V), "return": ret,
            "incoherence": _weigh(occ, terms, False),
            "incoherence_finite_part": _weigh(occ, terms, True), "causal_entropy": ent}


def _epsilon(epsilon: float | None) -> float:
    from . import klrl

    return klrl.EPSILON if epsilon is None else epsilon


def summarised_sequence(task: Task, kind: str, steps: int, delta: float = 1.0, epsilon: float | None = None):
    """Yield ``(k, policy, summary)`` along a sequence; retrain reuses each Q for the next G.
    The KL-RL sequences' summaries add ``beta``, ``objective`` (the optimal J_beta) and, where the
    optimum depends on the history, ``histories`` (the decision states of the unrolled task)."""
    if kind in KLRL_SEQUENCES:
        from . import klrl

        for k, o in enumerate(klrl.optima(task, kind, steps, epsilon=_epsilon(epsilon))):
            extra = {"beta": o.beta, "objective": o.value}
            if o.unrolled is not None:
                extra["histories"] = int(np.sum(~o.unrolled.terminal))
            yield k, o.policy, {**o.summary(task, delta), **extra}
        return
    if kind != "retrain":
        for k, pi in enumerate(sequence(task, kind, steps)):
            yield k, pi, summary(task, pi, delta)
        return
    pi = prior_policy(task)
    for k in range(steps + 1):
        values = soft_values(task, pi)
        yield k, pi, summary(task, pi, delta, values)
        pi = _condition(task, pi, values[0])


def analyse(task: Task, steps: int = 4, delta: float = 1.0, policies: bool = True,
            kinds: tuple[str, ...] = ALL_SEQUENCES, epsilon: float | None = None) -> dict:
    """The `lmcoh exact --json` object: every sequence k = 0..steps with its summaries.

    ``epsilon`` (recorded) floors q in the klrl reward. A KL-RL sequence that had to be computed
    over histories, or left out because the task unrolled by history is too big, says so in ``notes``.
    """
    from . import klrl

    result = {"task": task.name, "deterministic": task.deterministic, "delta": delta,
              "epsilon": _epsilon(epsilon), "optimal_success": optimal_success(task), "sequences": {},
              "notes": {}}
    for kind in kinds:
        entries = []
        try:
            for k, pi, s in summarised_sequence(task, kind, steps, delta, epsilon):
                entry = {"k": k, "success": s["success"], "return": s["return"],
                         "incoherence": s["incoherence"], "incoherence_finite_part": s["incoherence_finite_part"],
                         "causal_entropy": s["causal_entropy"]}
                entry.update({key: s[key] for key in ("beta", "objective") if key in s})
                if "histories" in s:
                    result["notes"][kind] = klrl.over_histories(s["histories"])
                if policies:
                    entry["policy"] = policy_table(task, pi)
                entries.append(entry)
        except klrl.TooManyHistories as err:
            result["notes"][kind] = f"left out: {err}"
            continue
        result["sequences"][kind] = entries
    return result
