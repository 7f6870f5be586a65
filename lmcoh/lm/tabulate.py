"""A language model as a policy: tabulation over histories.

Because the transcript shows the whole history, the LM policy is a policy over histories.
`tabulate` enumerates every reachable history step by step (all histories of one step
batched), scores them (lmcoh.lm.scoring), and aggregates pi(.|h) into one distribution per
(step, state), weighting each history by its probability under the LM and the dynamics;
beyond ``max_histories`` it estimates the same table by Monte Carlo with confidence
intervals. Markov prompts (a `Layout` with ``mode="markov"``) show only the current state and
step, so the policy is Markov and one prompt per (step, state) suffices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import faults
from ..oracle import exact
from ..tasks.task import Task, _ranges
from .rollout import rollout
from .scoring import ActionTokens, Codec, Context, check_finite, score_contexts
from .text import Layout

@dataclass
class LMPolicy:
    """An LM policy as an `exact.Policy` per (step, state), aggregated over histories.

    ``visits[t]`` is the visit weight of each layer state (its occupancy when exact, its
    visit count under Monte Carlo); ``ci[t]`` the 95% half-width of each action probability
    (zeros when exact). ``success`` is the LM's own success probability (over histories, so
    it can differ from ``exact.success`` of the aggregated table for history prompts).
    ``action_tokens[a]`` are the tokens the model reads for action a, for token-level incoherence.
    """

    policy: exact.Policy
    visits: list[np.ndarray]
    histories: int
    exact: bool
    success: float
    success_ci: float
    action_tokens: ActionTokens
    ci: list[np.ndarray] = field(default_factory=list)
    episodes: int = 0


def count_histories(task: Task) -> int:
    """Number of reachable histories (s_0, a_0, ..., s_t) over all decision steps t."""
    count = np.where(task.terminal, 0.0, (task.start_prob > 0).astype(float))
    total = 0.0
    for layer in task.layers:
        total += float(count[layer.states].sum())
        per_action = count[task.action_state[layer.actions]]
        lo, hi = task.trans_ptr[layer.actions], task.trans_ptr[layer.actions + 1]
        idx = _ranges(lo, hi)
        count = np.bincount(task.trans_next[idx], weights=np.repeat(per_action, hi - lo),
                            minlength=task.n_states)
        count[task.terminal] = 0.0
    return int(total) if total < 2 ** 62 else 2 ** 62


def tabulate(loaded, task: Task, goal: str = "success", temperature: float = 1.0,
             layout: Layout = Layout(), max_histories: int = 200_000, *, batch_size: int = 256,
             mc_episodes: int = 4000, seed: int = 0, progress: bool = False) -> LMPolicy:
    """The LM policy over every reachable history, aggregated per (step, state)."""
    codec = Codec(loaded.tokenizer, task, layout, goal)
    if layout.mode == "markov":
        return _tabulate_markov(loaded.model, task, codec, temperature, batch_size)
    n = count_histories(task)
    if n > max_histories:
        return _monte_carlo(loaded, task, goal, temperature, layout, n, mc_episodes, seed,
                            batch_size, progress, codec)
    return _tabulate_histories(loaded.model, task, codec, temperature, batch_size, n)


def _tabulate_markov(model, task, codec, temperature, batch_size) -> LMPolicy:
    policy = []
    for t, layer in enumerate(task.layers):
        contexts = [codec.prompt([int(s)] * (t + 1), []) for s in layer.states]
        choices = codec.choices_of(layer.states, t)
        logp = score_contexts(model, contexts, [c for _, c in choices], [b for b, _ in choices],
                              temperature, batch_size)
        policy.append(np.exp(np.concatenate(logp)))
    occ = exact.occupancy(task, policy)
    return LMPolicy(policy, occ, sum(len(layer.states) for layer in task.layers), True,
                    exact.success(task, policy), 0.0, codec.action_tokens,
                    [np.zeros_like(p) for p in policy])


class _Tabulation:
    """Depth-first walk over the history tree, a block of at most ``batch_size`` histories at a
    time, each block carrying its KV cache. Expanding a block costs one forward per group of
    children: every (history, action, next state) row appends the action chunk and the next
    state's chunk to its parent's cache, and the same forward scores the action. So every token
    of every history is run once, and all histories of one step go through in large batches.
    """

    def __init__(self, model, task: Task, codec: Codec, temperature: float, batch_size: int):
        self.model, self.task, self.codec = model, task, codec
        self.temperature, self.batch_size = temperature, batch_size
        self.mass = [np.zeros(len(layer.actions)) for layer in task.layers]
        self.visits = [np.zeros(len(layer.states)) for layer in task.layers]
        self.where = []
        for layer in task.layers:
            where = np.full(task.n_states, -1, dtype=np.int64)
            where[layer.states] = np.arange(len(layer.states))
            self.where.append(where)
        self.success = 0.0

    def run(self) -> None:
        task = self.task
        start = np.flatnonzero(task.start_prob > 0)
        ends = task.terminal[start]
        self.success += float(np.sum(task.start_prob[start[ends]] * np.exp(task.terminal_logq[start[ends]])))
        start = start[~ends]
        for lo in range(0, len(start), self.batch_size):
            s = start[lo:lo + self.batch_size]
            ctx = Context(self.model, len(s), self.temperature)
            ctx.extend([self.codec.prompt([int(x)], []) for x in s])
            self._expand(0, ctx, s, np.log(task.start_prob[s]), np.zeros(len(s)))
            faults.point("evaluate")

    def _expand(self, t: int, ctx: Context, cur: np.ndarray, logw: np.ndarray, logq: np.ndarray) -> None:
        task, layer = self.task, self.task.layers[t]
        # (history, action) pairs, then one row per live next state (or one scoring-only row)
        lo_a, hi_a = task.action_ptr[cur], task.action_ptr[cur + 1]
        pair_row = np.repeat(np.arange(len(cur)), hi_a - lo_a)
        pair_act = _ranges(lo_a, hi_a)
        lo_t, hi_t = task.trans_ptr[pair_act], task.trans_ptr[pair_act + 1]
        tr = _ranges(lo_t, hi_t)
        tr_pair = np.repeat(np.arange(len(pair_act)), hi_t - lo_t)
        nxt = task.trans_next[tr]
        live = ~task.terminal[nxt] & (t + 1 < task.steps)
        lonely = np.ones(len(pair_act), dtype=bool)
        lonely[tr_pair[live]] = False
        # A scoring-only row need not run its action's last token: its log-prob is read off the
        # logits of the token before.
        row_pair = np.concatenate([tr_pair[live], np.flatnonzero(lonely)])
        row_next = np.concatenate([nxt[live], np.full(int(lonely.sum()), -1)])
        row_tau = np.concatenate([task.trans_prob[tr[live]], np.ones(int(lonely.sum()))])
        # every action as the model reads it after its state (taking back `back` tokens of the state),
        # then the next state's tokens after the action (taking back `follow` tokens of the action)
        choices = self.codec.choices_of(cur, t)
        pair_back = np.repeat([b for b, _ in choices], hi_a - lo_a)
        action_ids = [chunk for _, chunks in choices for chunk in chunks]
        pair_logp = np.zeros(len(pair_act))
        groups = []
        for g in range(0, len(row_pair), self.batch_size):
            pairs, nexts = row_pair[g:g + self.batch_size], row_next[g:g + self.batch_size]
            live_rows = np.flatnonzero(nexts >= 0)
            follows = dict(zip(live_rows.tolist(), self.codec.follow_of(pair_act[pairs[live_rows]], nexts[live_rows],
                                                                        t + 1)))
            chunks = []
            for i, p in enumerate(pairs):
                ids = action_ids[p]
                if i in follows:
                    back, state = follows[i]
                    chunks.append(list(ids[:len(ids) - back]) + list(state))
                else:
                    chunks.append(list(ids[:-1] or ids))
            child = ctx.take(pair_row[pairs])
            pair_logp[pairs] = child.extend(chunks, targets=[action_ids[p] for p in pairs], back=pair_back[pairs])
            groups.append((child, pairs, nexts, row_tau[g:g + self.batch_size]))
        check_finite(pair_logp)
        # renormalise over each history's actions; aggregate by visit weight
        starts = np.concatenate([[0], np.cumsum(hi_a - lo_a)])
        top = np.maximum.reduceat(pair_logp, starts[:-1])
        norm = np.log(np.add.reduceat(np.exp(pair_logp - top[pair_row]), starts[:-1])) + top
        logpi = pair_logp - norm[pair_row]
        w = np.exp(logw)
        idx = self.where[t][cur]
        np.add.at(self.visits[t], idx, w)
        slot = layer.start[idx][pair_row] + (pair_act - lo_a[pair_row])
        np.add.at(self.mass[t], slot, w[pair_row] * np.exp(logpi))
        # episodes that end here: a terminal, or out of decisions
        pair_logw = logw[pair_row] + logpi
        pair_logq = logq[pair_row] + task.action_logq[pair_act]
        end = ~live
        end_logq = np.where(task.terminal[nxt[end]], task.terminal_logq[nxt[end]], task.timeout_logq)
        with np.errstate(divide="ignore"):
            self.success += float(np.sum(np.exp(pair_logw[tr_pair[end]] + np.log(task.trans_prob[tr[end]])
                                                + pair_logq[tr_pair[end]] + end_logq)))
        # the children, group by group (depth first)
        for child, pairs, nexts, tau in groups:
            keep = np.flatnonzero(nexts >= 0)
            if len(keep) == 0:
                continue
            p = pairs[keep]
            self._expand(t + 1, child.take(keep) if len(keep) < len(child) else child, nexts[keep],
                         pair_logw[p] + np.log(tau[keep]), pair_logq[p])

    def result(self, n_histories: int) -> LMPolicy:
        policy = []
        for t, layer in enumerate(self.task.layers):
            counts = np.diff(layer.start)
            visit = np.repeat(self.visits[t], counts)
            with np.errstate(invalid="ignore", divide="ignore"):
                policy.append(np.where(visit > 0, self.mass[t] / visit, 1.0 / np.repeat(counts, counts)))
        return LMPolicy(policy, self.visits, n_histories, True, self.success, 0.0, self.codec.action_tokens,
                        [np.zeros_like(p) for p in policy])


def _tabulate_histories(model, task, codec, temperature, batch_size, n_histories) -> LMPolicy:
    walk = _Tabulation(model, task, codec, temperature, batch_size)
    walk.run()
    return walk.result(n_histories)


def _monte_carlo(loaded, task, goal, temperature, layout, n_histories, episodes, seed,
                 batch_size, progress, codec) -> LMPolicy:
    """Estimate the aggregated table from sampled episodes, averaging the exact pi(.|h)."""
    total = [np.zeros(len(layer.actions)) for layer in task.layers]
    square = [np.zeros(len(layer.actions)) for layer in task.layers]
    visits = [np.zeros(len(layer.states)) for layer in task.layers]
    where = [{int(s): i for i, s in enumerate(layer.states)} for layer in task.layers]
    success = []
    for episode, dists in rollout(loaded, task, episodes, goal=goal, seed=seed,
                                  temperature=temperature, batch_size=batch_size, layout=layout,
                                  progress=progress, codec=codec):
        success.append(episode.success_prob)
        for t, (s, dist) in enumerate(zip(episode.states, dists)):
            layer, i = task.layers[t], where[t][s]
            lo, hi = layer.start[i], layer.start[i + 1]
            total[t][lo:hi] += dist
            square[t][lo:hi] += dist ** 2
            visits[t][i] += 1
    policy, ci = [], []
    for t, layer in enumerate(task.layers):
        counts = np.diff(layer.start)
        n = np.repeat(visits[t], counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, total[t] / n, 1.0 / np.repeat(counts, counts))
            var = np.where(n > 1, (square[t] - n * mean ** 2) / (n - 1), np.inf)
        policy.append(mean)
        ci.append(1.96 * np.sqrt(np.maximum(var, 0.0) / np.maximum(n, 1)))
    success = np.asarray(success)
    half = 1.96 * float(success.std(ddof=1)) / math.sqrt(len(success)) if len(success) > 1 else math.inf
    return LMPolicy(policy, visits, n_histories, False, float(success.mean()), half, codec.action_tokens,
                    ci, episodes)
