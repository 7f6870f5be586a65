"""The optimum of KL-regularised RL (docs/theory.md, "A fourth pressure: KL-regularised RL").

numpy only. For a reward R of whole episodes and a reference policy p,

    J_beta(pi) = E_pi[R] - beta KL(pi || p)        (the KL over whole episodes)

is maximised by backward induction with *expectation* backups over the environment's moves:

    Q(s, a) = r(s, a) + E_{s' ~ tau(.|s, a)}[V(s')],    V(s) = beta log sum_a p(a|s) exp(Q(s, a) / beta),
    pi*(a|s) proportional to p(a|s) exp(Q(s, a) / beta),

and V at the start is the optimal J_beta itself. Two rewards, two sequences of `lmcoh exact`
(k = 0..K with beta = 1/k; k = 0 is p, the optimum at beta = infinity):

* ``klrl``: R = sum_t log max(q, epsilon), the paper's r with a floor, so that an episode that
  meets q = 0 earns log epsilon rather than -inf (what a sampled RL reward must do). Additive,
  so the optimum is a policy over (step, state).
* ``klrl_success``: R = the episode's success, 1 or 0, whose mean given the episode is prod q.
  Not additive: with w the product of the q collected so far, the value of (t, s) is
  V(t, s, w) = w V_{beta/w}(t, s, 1), so histories that reach (t, s) with different w want
  different actions. Where every history reaching each (t, s) carries the same w (trees, and
  every task whose q sit only on terminals), the optimum is a policy over (step, state); elsewhere
  it is computed on the task *unrolled* by (step, state, w), a tree-like copy of the task whose
  states carry w and whose terminals carry the episode's whole prod q, up to `MAX_HISTORIES`
  copies. Its `policy` is then aggregated per (step, state), each copy weighted by its visits
  (as `lmcoh evaluate` aggregates an LM's policy over histories), while success, return and
  incoherence are those of the policy over histories.

The KL-RL optimum is the optimum of J_beta, not a coherent policy: incoherence measures Q^pi
without the KL term (docs/theory.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import LmcohError
from ..tasks.task import Task, _ranges
from ..tasks.task import safe_log as _log
from . import exact

KINDS = ("klrl", "klrl_success")
REWARDS = {"klrl": "log_q", "klrl_success": "success"}
EPSILON = 1e-12          # default floor of q in R = sum log max(q, epsilon)
MAX_HISTORIES = 200_000  # decision copies of an unrolled task before klrl_success is left out
_W_DIGITS = 12           # log w rounded to this many decimals when histories are merged by w


class TooManyHistories(LmcohError):
    """klrl_success needs the task unrolled by history, and the unrolled task is too big."""


def over_histories(histories: int) -> str:
    """The note `lmcoh exact` writes where the klrl_success optimum depends on the history."""
    return (f"the optimum depends on the history (a state is reached with different products of q): computed "
            f"on the task unrolled by history ({histories} decision states); success, return and incoherence "
            "are the policy's over histories, its table is aggregated per (step, state) by visits")


def beta_of(k: int) -> float:
    """beta = 1/k for step k of a sequence; k = 0 is the prior (beta = infinity)."""
    return math.inf if k == 0 else 1.0 / k


@dataclass
class Optimum:
    """The maximiser of J_beta: ``policy`` per (step, state) of the task, ``value`` = max J_beta.

    ``unrolled``/``unrolled_policy``: the task unrolled by (step, state, w) and the optimum on it,
    when the optimum depends on the history (else None); `summary` then measures that policy."""

    beta: float
    policy: exact.Policy
    value: float
    unrolled: Task | None = None
    unrolled_policy: exact.Policy | None = None

    def summary(self, task: Task, delta: float = 1.0) -> dict:
        if self.unrolled is None:
            return exact.summary(task, self.policy, delta)
        return exact.summary(self.unrolled, self.unrolled_policy, delta)


# ---- the backward pass --------------------------------------------------------------------------

def _solve(task: Task, beta: float, prior: exact.Policy, step_reward: list[np.ndarray],
           end_value: list[np.ndarray]) -> tuple[exact.Policy, float]:
    """Backward induction for J_beta. ``step_reward[t]``: r(s, a) per action of layer t;
    ``end_value[t]``: the reward of each transition of layer t that ends the episode (into a
    terminal, or out of decisions), ignored for transitions into a live state.
    beta = inf evaluates the prior (V = E_p[Q], pi = p)."""
    v = np.zeros(task.n_states)
    policy: exact.Policy = [np.zeros(0)] * task.steps
    for t in reversed(range(task.steps)):
        layer = task.layers[t]
        live = ~task.terminal[layer.trans_next] & (t + 1 < task.steps)
        nxt = np.where(live, v[layer.trans_next], end_value[t])
        q = step_reward[t] + layer.by_action.sum(np.exp(layer.trans_logp) * nxt)
        p = prior[t]
        if math.isinf(beta):
            policy[t] = p
            value = layer.by_state.sum(np.where(p > 0, p * q, 0.0))
        else:
            logits = _log(p) + q / beta
            policy[t] = layer.by_state.softmax(logits, p)
            value = beta * layer.by_state.logsumexp(logits)
        v[layer.states] = value
    start = task.start_prob > 0
    total = float(np.sum(task.start_prob[start & ~task.terminal] * v[start & ~task.terminal]))
    return policy, total


def _log_q_rewards(task: Task, epsilon: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """R = sum log max(q, epsilon): the per-step and the end rewards of `_solve`."""
    floor = math.log(epsilon)
    steps, ends = [], []
    for t, layer in enumerate(task.layers):
        steps.append(np.maximum(task.action_logq[layer.actions], floor))
        term = task.terminal[layer.trans_next]
        ends.append(np.maximum(np.where(term, task.terminal_logq[layer.trans_next], task.timeout_logq), floor))
    return steps, ends


def _collected(task: Task) -> list[np.ndarray] | None:
    """log w (the log of the product of the q collected before step t) of every state of every
    layer, when every history reaching it carries the same w; None where some state is reached
    with two different w (then R = success is history-dependent)."""
    logw = [np.zeros(len(task.layers[0].states))] if task.layers else []
    for t, layer in enumerate(task.layers[:-1]):
        nxt_layer = task.layers[t + 1]
        where = np.full(task.n_states, -1, dtype=np.int64)
        where[nxt_layer.states] = np.arange(len(nxt_layer.states))
        w = layer.by_action.repeat(logw[t][layer.seg] + task.action_logq[layer.actions])
        live = ~task.terminal[layer.trans_next]
        idx, w = where[layer.trans_next[live]], np.round(w[live], _W_DIGITS)
        lo = np.full(len(nxt_layer.states), np.inf)
        hi = np.full(len(nxt_layer.states), -np.inf)
        np.minimum.at(lo, idx, w)
        np.maximum.at(hi, idx, w)
        if np.any(lo != hi):
            return None
        logw.append(lo)
    return logw


def _success_rewards(task: Task, logw: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """R = success with w fixed per (step, state): no per-step reward, prod q at the end."""
    steps, ends = [], []
    for t, layer in enumerate(task.layers):
        steps.append(np.zeros(len(layer.actions)))
        term = task.terminal[layer.trans_next]
        end_logq = np.where(term, task.terminal_logq[layer.trans_next], task.timeout_logq)
        before = layer.by_action.repeat(logw[t][layer.seg] + task.action_logq[layer.actions])
        ends.append(np.exp(before + end_logq))
    return steps, ends


# ---- the task unrolled by collected q ----------------------------------------------------------

@dataclass
class _Unrolled:
    task: Task
    origin: list[np.ndarray]  # origin[t][i]: the index in task.layers[t] of copy i of step t


def unroll(task: Task, prior: exact.Policy, limit: int | None = None) -> _Unrolled:
    """The task with one decision state per (step, state, w) and one terminal per final prod q;
    actions earn q = 1 (their q is carried in w), terminals earn the whole episode's prod q, and
    the prior of each copy is ``prior`` at its (step, state). `TooManyHistories` past ``limit``
    decision states (default `MAX_HISTORIES`)."""
    limit = MAX_HISTORIES if limit is None else limit
    layers = task.layers
    origin = [np.arange(len(layers[0].states))]   # origin[t][i]: copy i's index in layers[t]
    logw = [np.zeros(len(layers[0].states))]     # and the log of the q it has collected
    offset = [0, len(origin[0])]                 # copies of step t are states offset[t]..offset[t+1]-1
    parts = {"counts": [], "actions": [], "prior": [], "trans": [], "prob": [], "next": []}
    finals = []  # log prod q of every transition that ends an episode, in order
    for t, layer in enumerate(layers):
        slots = _ranges(layer.start[origin[t]], layer.start[origin[t] + 1])  # the copies' action slots
        owner = np.repeat(np.arange(len(origin[t])), layer.by_state.counts[origin[t]])
        rows = _ranges(layer.trans_start[slots], layer.trans_start[slots + 1])
        per_row = np.repeat(np.arange(len(slots)), np.diff(layer.trans_start)[slots])
        w = (logw[t][owner] + task.action_logq[layer.actions[slots]])[per_row]
        nxt = layer.trans_next[rows]
        live = ~task.terminal[nxt] & (t + 1 < task.steps)
        target = np.zeros(len(rows), dtype=np.int64)
        if np.any(live):
            where = np.full(task.n_states, -1, dtype=np.int64)
            where[layers[t + 1].states] = np.arange(len(layers[t + 1].states))
            states, ws, inverse = _unique_pairs(where[nxt[live]], np.round(w[live], _W_DIGITS))
            if offset[-1] + len(states) > limit:
                raise TooManyHistories(
                    f"klrl_success on {task.name!r} depends on the history (a state is reached with different "
                    f"products of q) and the task unrolled by history has more than {limit} decision states")
            origin.append(states)
            logw.append(ws)
            target[live] = offset[-1] + inverse
            offset.append(offset[-1] + len(states))
        end_logq = np.where(task.terminal[nxt], task.terminal_logq[nxt], task.timeout_logq)
        with np.errstate(invalid="ignore"):
            finals.append(w[~live] + end_logq[~live])
        target[~live] = -1 - (sum(len(f) for f in finals[:-1]) + np.arange(int((~live).sum())))
        parts["counts"].append(layer.by_state.counts[origin[t]])
        parts["actions"].append(layer.actions[slots])
        parts["prior"].append(prior[t][slots])
        parts["trans"].append(np.diff(layer.trans_start)[slots])
        parts["prob"].append(np.exp(layer.trans_logp[rows]))
        parts["next"].append(target)
    n_dec = offset[-1]
    values, term_of = np.unique(np.round(np.concatenate(finals), _W_DIGITS), return_inverse=True)
    starts = np.flatnonzero((task.start_prob > 0) & task.terminal)  # episodes that end before a decision
    end_logq = np.concatenate([values, task.terminal_logq[starts]])
    n_states = n_dec + len(end_logq)
    target = np.concatenate(parts["next"])
    target = np.where(target >= 0, target, n_dec + term_of.ravel()[np.maximum(-1 - target, 0)])
    actions = np.concatenate(parts["actions"])
    terminal = np.zeros(n_states, dtype=bool)
    terminal[n_dec:] = True
    start_prob = np.zeros(n_states)
    start_prob[:offset[1]] = task.start_prob[layers[0].states]
    start_prob[n_dec + len(values):] = task.start_prob[starts]
    names = [f"{task.state_names[int(layers[t].states[i])]}@{t}#{j}"
             for t in range(len(origin)) for j, i in enumerate(origin[t])]
    unrolled = Task(
        name=f"{task.name} [unrolled by history]", horizon=task.steps,
        state_names=names + [f"end#{j}" for j in range(len(end_logq))], state_texts=[""] * n_states,
        terminal=terminal, terminal_logq=np.concatenate([np.zeros(n_dec), end_logq]), start_prob=start_prob,
        action_ptr=np.concatenate([[0], np.cumsum(np.concatenate(parts["counts"])),
                                   np.full(len(end_logq), len(actions))]).astype(np.int64),
        action_names=[task.action_names[a] for a in actions], action_logq=np.zeros(len(actions)),
        prior=np.concatenate(parts["prior"]),
        trans_ptr=np.concatenate([[0], np.cumsum(np.concatenate(parts["trans"]))]).astype(np.int64),
        trans_next=target, trans_prob=np.concatenate(parts["prob"]), source=task.source)
    return _Unrolled(unrolled, origin)


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct pairs (a[i], b[i]) sorted by a then b, and each i's pair (np.unique over
    pairs, without its slow structured sort)."""
    order = np.lexsort((b, a))
    sa, sb = a[order], b[order]
    new = np.concatenate([[True], (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])])
    inverse = np.empty(len(a), dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return sa[new], sb[new], inverse


def _aggregate(task: Task, unrolled: _Unrolled, policy: exact.Policy) -> exact.Policy:
    """The policy over histories as one distribution per (step, state): each copy weighted by its
    visits (the plain mean over copies where no copy is visited)."""
    occ = exact.occupancy(unrolled.task, policy)
    out = []
    for t, layer in enumerate(task.layers):
        ulayer, origin = unrolled.task.layers[t], unrolled.origin[t]
        counts = ulayer.by_state.counts
        slot = layer.start[origin].repeat(counts) + (np.arange(len(ulayer.actions)) - ulayer.start[:-1].repeat(counts))
        mass, visits = np.zeros(len(layer.actions)), np.zeros(len(layer.states))
        plain, copies = np.zeros(len(layer.actions)), np.zeros(len(layer.states))
        np.add.at(mass, slot, ulayer.by_state.repeat(occ[t]) * policy[t])
        np.add.at(visits, origin, occ[t])
        np.add.at(plain, slot, policy[t])
        np.add.at(copies, origin, 1.0)
        v, c = layer.by_state.repeat(visits), layer.by_state.repeat(copies)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(v > 0, mass / v, plain / c))
    return out


# ---- the optimum and the sequences ----------------------------------------------------------------

def optimum(task: Task, beta: float, reward: str = "log_q", prior: exact.Policy | None = None,
            epsilon: float = EPSILON) -> Optimum:
    """The maximiser of E[R] - beta KL(pi || p) for R = sum log max(q, epsilon) (``"log_q"``) or
    R = success (``"success"``); p = ``prior`` (default: the task's prior)."""
    return next(iter(_optima(task, [beta], reward, prior, epsilon)))


def _optima(task: Task, betas: list[float], reward: str, prior: exact.Policy | None,
            epsilon: float) -> Iterator[Optimum]:
    if not epsilon > 0 or epsilon >= 1:
        raise LmcohError(f"epsilon, the floor of q in R = sum log max(q, epsilon), must be in (0, 1), got {epsilon:g}")
    p = exact.prior_policy(task) if prior is None else prior
    unrolled = None
    if reward == "log_q":
        steps, ends = _log_q_rewards(task, epsilon)
        at_start = np.maximum(task.terminal_logq, math.log(epsilon))
    elif reward == "success":
        logw = _collected(task)
        if logw is None:
            unrolled = unroll(task, p)
            steps, ends = _success_rewards(unrolled.task, [np.zeros(len(layer.states))
                                                           for layer in unrolled.task.layers])
        else:
            steps, ends = _success_rewards(task, logw)
        at_start = np.exp(task.terminal_logq)
    else:
        raise ValueError(f"unknown reward {reward!r}; choose log_q or success")
    start = (task.start_prob > 0) & task.terminal
    ended = float(np.sum(task.start_prob[start] * at_start[start]))
    for beta in betas:
        if unrolled is None:
            policy, value = _solve(task, beta, p, steps, ends)
            yield Optimum(beta, policy, value + ended)
        else:
            policy, value = _solve(unrolled.task, beta, exact.prior_policy(unrolled.task), steps, ends)
            yield Optimum(beta, _aggregate(task, unrolled, policy), value + ended, unrolled.task, policy)


def optima(task: Task, kind: str, steps: int, prior: exact.Policy | None = None,
           epsilon: float = EPSILON) -> list[Optimum]:
    """The optima k = 0..steps of sequence ``kind`` (``klrl`` or ``klrl_success``), beta = 1/k."""
    if kind not in KINDS:
        raise ValueError(f"unknown KL-RL sequence {kind!r}; choose one of {', '.join(KINDS)}")
    return list(_optima(task, [beta_of(k) for k in range(steps + 1)], REWARDS[kind], prior, epsilon))
