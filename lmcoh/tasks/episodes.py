"""Episodes of the exact environment: stepping it, sampling under the prior, JSON lines.

An `Episode` holds the visited states (one more than the actions: the last entry is the state
the episode ended in, a terminal or the state where it ran out of decisions), the flat action
ids taken, optionally the log-probability each action had under the policy that chose it,
the episode's success probability ``prod q`` and its sampled outcome.

Numpy only: rollouts with a language model (lmcoh.lm.rollout) reuse `_pick` and `episode_logq`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .task import Task, TaskError


@dataclass
class Episode:
    states: list[int]
    actions: list[int]
    logprobs: list[float] | None
    success_prob: float
    success: bool
    goal: str = "none"  # the goal the episode was generated under (its text is written under it)

    def to_json(self, task: Task) -> dict:
        return {"goal": self.goal,
                "states": [task.state_names[s] for s in self.states],
                "actions": [task.action_names[a] for a in self.actions],
                "logprobs": self.logprobs,
                "success_prob": self.success_prob,
                "outcome": "success" if self.success else "failure"}

    @classmethod
    def from_json(cls, task: Task, d: dict) -> "Episode":
        """Rebuild from `to_json`'s dict; a `TaskError` if it does not fit ``task``."""
        try:
            states = [task.state_index[name] for name in d["states"]]
        except KeyError as err:
            raise TaskError(f"episode does not fit task {task.name!r}: unknown state {err}") from None
        actions = []
        for s, name in zip(states, d["actions"]):
            ids = [a for a in task.actions_of(s) if task.action_names[a] == name]
            if not ids:
                raise TaskError(f"episode does not fit task {task.name!r}: state "
                                f"{task.state_names[s]!r} has no action {name!r}")
            actions.append(ids[0])
        if len(states) != len(actions) + 1:
            raise TaskError(f"episode does not fit task {task.name!r}: "
                            f"{len(states)} states for {len(actions)} actions")
        return cls(states, actions, d.get("logprobs"), float(d["success_prob"]),
                   d["outcome"] == "success", d.get("goal", "none"))


def step_environment(task: Task, state: int, action: int, rng: np.random.Generator) -> int:
    """Sample the next state after taking flat action ``action`` (which must belong to ``state``)."""
    lo, hi = int(task.trans_ptr[action]), int(task.trans_ptr[action + 1])
    if hi - lo == 1:
        return int(task.trans_next[lo])
    return int(task.trans_next[lo + _pick(task.trans_prob[lo:hi], rng.random())])


def episode_logq(task: Task, states: list[int], actions: list[int]) -> float:
    """log P(success | trajectory): every action's log q plus the end state's (or the timeout's)."""
    end = states[-1]
    last = task.terminal_logq[end] if task.terminal[end] else task.timeout_logq
    return float(np.sum(task.action_logq[actions]) + last)


def sample_prior_episodes(task: Task, n: int, rng: np.random.Generator) -> list[Episode]:
    """``n`` episodes of ``task`` under its prior, each labelled with an outcome drawn w.p. prod q.

    All episodes step together. The uniforms behind each choice are stratified over the
    episodes that make it (the m episodes in one state at one step get one uniform in each
    1/m slice, in random order), and outcomes are drawn by systematic sampling over the
    episodes sorted by trajectory. Each episode on its own is still an exact
    draw (trajectory from the prior, success w.p. prod q); jointly, the data set's action
    counts and per-trajectory success counts sit within about one of their expectations, so a
    model trained on it sees p and G(p) with far less sampling noise than independent draws.
    """
    states = np.full((n, task.steps + 1), -1, dtype=np.int64)
    actions = np.full((n, task.steps), -1, dtype=np.int64)
    logp = np.zeros((n, task.steps))
    cur = _sample_segments(np.cumsum(task.start_prob), np.zeros(n, dtype=np.int64),
                           np.full(n, task.n_states, dtype=np.int64), _stratified(np.zeros(n), rng))
    states[:, 0] = cur
    length = np.zeros(n, dtype=np.int64)
    prior_cum = np.cumsum(task.prior)
    trans_cum = np.cumsum(task.trans_prob)
    for t in range(task.steps):
        live = np.flatnonzero(~task.terminal[cur])
        if len(live) == 0:
            break
        s = cur[live]
        a = _sample_segments(prior_cum, task.action_ptr[s], task.action_ptr[s + 1], _stratified(s, rng))
        tr = _sample_segments(trans_cum, task.trans_ptr[a], task.trans_ptr[a + 1], _stratified(a, rng))
        actions[live, t] = a
        with np.errstate(divide="ignore"):
            logp[live, t] = np.log(task.prior[a])
        cur = cur.copy()
        cur[live] = task.trans_next[tr]
        states[live, t + 1] = cur[live]
        length[live] = t + 1

    episodes = []
    for i in range(n):
        k = int(length[i])
        ep_states, ep_actions = states[i, :k + 1].tolist(), actions[i, :k].tolist()
        episodes.append(Episode(ep_states, ep_actions, logp[i, :k].tolist(),
                                float(np.exp(episode_logq(task, ep_states, ep_actions))), False))
    for i in _systematic_successes(episodes, states, actions, rng):
        episodes[i].success = True
    return episodes


def sample_outcome_balanced(task: Task, n: int, rng: np.random.Generator,
                            max_draws: int = 20) -> list[Episode]:
    """``n`` prior episodes, half successes and half failures (as far as ``max_draws * n`` draws allow).

    The successes are draws from p(trajectory | O = 1) and the failures from p(trajectory | O = 0):
    batches of `sample_prior_episodes` split by outcome, a class with too many thinned
    systematically along the trajectory order (so it stays balanced), one with too few topped
    up by repeating it. A model trained behind the outcome token learns each conditional equally
    well, even when success is rare; the conditionals themselves do not depend on the class sizes.
    """
    need = {True: n // 2, False: n - n // 2}
    pool: dict[bool, list[Episode]] = {True: [], False: []}
    drawn = 0
    while drawn < max_draws * n and any(len(pool[c]) < need[c] for c in pool):
        for e in sample_prior_episodes(task, n, rng):
            pool[e.success].append(e)
        drawn += n
    for c in pool:
        if not pool[c]:  # an outcome that cannot happen: the other class takes its place
            need[not c] = n
            need[c] = 0
    episodes = []
    for c in (True, False):
        group = sorted(pool[c], key=lambda e: (e.states, e.actions))
        if need[c] and group:
            idx = np.floor((np.arange(need[c]) + rng.random()) * len(group) / need[c]).astype(int)
            episodes += [group[i] for i in idx]
    return [episodes[i] for i in rng.permutation(len(episodes))]


def _pick(probs: np.ndarray, u: float) -> int:
    return min(int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right")), len(probs) - 1)


def _stratified(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uniform per entry; the m entries of each group get one in each slice [j/m, (j+1)/m)."""
    m = len(groups)
    order = np.lexsort((rng.random(m), groups))
    sorted_groups = groups[order]
    first = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    size = np.diff(np.r_[first, m])
    rank = np.arange(m) - np.repeat(first, size)
    u = np.empty(m)
    u[order] = (rank + rng.random(m)) / np.repeat(size, size)
    return u


def _sample_segments(cum: np.ndarray, lo: np.ndarray, hi: np.ndarray, u: np.ndarray) -> np.ndarray:
    """For each i, an index in [lo[i], hi[i]) drawn from the weights whose running sum is ``cum``."""
    base = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0.0)
    target = base + u * (cum[hi - 1] - base)
    return np.clip(np.searchsorted(cum, target, side="right"), lo, hi - 1)


def _systematic_successes(episodes: list[Episode], states: np.ndarray, actions: np.ndarray,
                          rng: np.random.Generator) -> np.ndarray:
    """Indices of the successful episodes: systematic sampling along the trajectory order."""
    order = np.lexsort(np.concatenate([states, actions], axis=1).T[::-1])
    w = np.array([episodes[i].success_prob for i in order])
    edges = np.floor(np.concatenate([[0.0], np.cumsum(w)]) + rng.random())
    return order[np.diff(edges) > 0]
