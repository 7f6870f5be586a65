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
from tqdm import tqdm

from .. import faults
from ..oracle import exact
from ..tasks.task import Task, _ranges
from .rollout import rollout
from . import memory
from .scoring import ActionTokens, Codec, Context, check_finite, first_tokens, open_context, score_contexts
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
    return _tabulate_histories(loaded.model, task, codec, temperature, batch_size, n, progress)


def _tabulate_markov(model, task, codec, temperature, batch_size) -> LMPolicy:
    contexts, choices = [], []
    for t, layer in enumerate(task.layers):  # every (step, state) at once: their common header runs once
        contexts += [codec.prompt([int(s)] * (t + 1), []) for s in layer.states]
        choices += codec.choices_of(layer.states, t)
    logp = score_contexts(model, contexts, [c for _, c in choices], [b for b, _ in choices], temperature, batch_size)
    bounds = np.cumsum([0] + [len(layer.states) for layer in task.layers])
    policy = [np.exp(np.concatenate(logp[lo:hi])) for lo, hi in zip(bounds[:-1], bounds[1:])]
    occ = exact.occupancy(task, policy)
    return LMPolicy(policy, occ, sum(len(layer.states) for layer in task.layers), True,
                    exact.success(task, policy), 0.0, codec.action_tokens,
                    [np.zeros_like(p) for p in policy])


class _Tabulation:
    """Depth-first walk over the history tree, each block of histories carrying its KV cache.
    Expanding a block costs one forward per group of its histories: every (history, action,
    next state) row appends the action chunk and the next state's chunk to its parent's cache,
    and the same forward scores the action. A group holds whole histories in at most ``rows``
    rows, so its actions renormalise at once and its children are walked before the next group
    runs: one block stays open per depth. Every token of every history is run once.
    """

    def __init__(self, model, task: Task, codec: Codec, temperature: float, rows: int, bar):
        self.model, self.task, self.codec = model, task, codec
        self.temperature, self.rows, self.bar = temperature, rows, bar
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
        for lo in range(0, len(start), self.rows):
            s = start[lo:lo + self.rows]
            ctx = open_context(self.model, [self.codec.prompt([int(x)], []) for x in s], self.temperature,
                               then=first_tokens(self.codec.choices_of(s, 0)))
            self._expand(0, ctx, s, np.log(task.start_prob[s]), np.zeros(len(s)))
            faults.point("evaluate")

    def _expand(self, t: int, ctx: Context, cur: np.ndarray, logw: np.ndarray, logq: np.ndarray) -> None:
        task, layer = self.task, self.task.layers[t]
        # (history, action) pairs, then one row per live next state (or one scoring-only row),
        # ordered by pair so that each history's rows are contiguous
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
        order = np.argsort(row_pair, kind="stable")
        row_pair = row_pair[order]
        row_next = np.concatenate([nxt[live], np.full(int(lonely.sum()), -1)])[order]
        row_tau = np.concatenate([task.trans_prob[tr[live]], np.ones(int(lonely.sum()))])[order]
        # every action as the model reads it after its state (taking back `back` tokens of the state),
        # then the next state's tokens after the action (taking back `follow` tokens of the action)
        choices = self.codec.choices_of(cur, t)
        pair_back = np.repeat([b for b, _ in choices], hi_a - lo_a)
        action_ids = [chunk for _, chunks in choices for chunk in chunks]
        pair_start = np.concatenate([[0], np.cumsum(hi_a - lo_a)])
        row_start = np.searchsorted(row_pair, pair_start)  # history h's rows: row_start[h]:row_start[h + 1]
        # episodes that end here: a terminal, or out of decisions
        end = ~live
        end_logq = np.where(task.terminal[nxt[end]], task.terminal_logq[nxt[end]], task.timeout_logq)
        with np.errstate(divide="ignore"):
            end_logw = np.log(task.trans_prob[tr[end]]) + end_logq
        h0 = 0
        while h0 < len(cur):  # a group: as many whole histories as fit in `rows` rows
            h1 = max(h0 + 1, int(np.searchsorted(row_start, row_start[h0] + self.rows, side="right")) - 1)
            rows = slice(row_start[h0], row_start[h1])
            rp, rn, tau = row_pair[rows], row_next[rows], row_tau[rows]
            live_rows = np.flatnonzero(rn >= 0)
            follows = dict(zip(live_rows.tolist(), self.codec.follow_of(pair_act[rp[live_rows]], rn[live_rows], t + 1)))
            chunks = []
            for i, p in enumerate(rp):
                ids = action_ids[p]
                if i in follows:
                    back, state = follows[i]
                    chunks.append(list(ids[:len(ids) - back]) + list(state))
                else:
                    chunks.append(list(ids[:-1] or ids))
            child = ctx.take(pair_row[rp])
            then = first_tokens(self.codec.choices_of(rn[live_rows], t + 1)) if len(live_rows) else ()
            row_logp = child.extend(chunks, targets=[action_ids[p] for p in rp], back=pair_back[rp], then=then)
            # renormalise over each history's actions; aggregate by visit weight
            pairs = slice(pair_start[h0], pair_start[h1])
            logp = np.zeros(pair_start[h1] - pair_start[h0])
            logp[rp - pair_start[h0]] = row_logp
            check_finite(logp)
            hist = pair_row[pairs]
            starts = pair_start[h0:h1] - pair_start[h0]
            top = np.maximum.reduceat(logp, starts)
            logpi = logp - (np.log(np.add.reduceat(np.exp(logp - top[hist - h0]), starts)) + top)[hist - h0]
            np.add.at(self.visits[t], self.where[t][cur[h0:h1]], np.exp(logw[h0:h1]))
            slot = layer.start[self.where[t][cur[hist]]] + (pair_act[pairs] - lo_a[hist])
            np.add.at(self.mass[t], slot, np.exp(logw[hist] + logpi))
            pair_logw = logw[hist] + logpi
            pair_logq = logq[hist] + task.action_logq[pair_act[pairs]]
            ended = (tr_pair[end] >= pair_start[h0]) & (tr_pair[end] < pair_start[h1])
            at = tr_pair[end][ended] - pair_start[h0]
            self.success += float(np.sum(np.exp(pair_logw[at] + pair_logq[at] + end_logw[ended])))
            if self.bar is not None:
                self.bar.update(h1 - h0)
            # the children, depth first
            if len(live_rows):
                child = child.take(live_rows) if len(live_rows) < len(child) else child
                p = rp[live_rows] - pair_start[h0]
                self._expand(t + 1, child, rn[live_rows], pair_logw[p] + np.log(tau[live_rows]), pair_logq[p])
            del child
            memory.reclaim()
            h0 = h1

    def result(self, n_histories: int) -> LMPolicy:
        policy = []
        for t, layer in enumerate(self.task.layers):
            counts = np.diff(layer.start)
            visit = np.repeat(self.visits[t], counts)
            with np.errstate(invalid="ignore", divide="ignore"):
                policy.append(np.where(visit > 0, self.mass[t] / visit, 1.0 / np.repeat(counts, counts)))
        return LMPolicy(policy, self.visits, n_histories, True, self.success, 0.0, self.codec.action_tokens,
                        [np.zeros_like(p) for p in policy])


def _tabulate_histories(model, task, codec, temperature, batch_size, n_histories, progress) -> LMPolicy:
    footprint = memory.Footprint.of(model)
    prompts, state, action = codec.lengths()
    memory.check_context(footprint, prompts[-1] + action, f"the longest history of {task.name}")
    # the rows of one history: one per (action, next state), at least one per action
    per_action = np.maximum(np.diff(task.trans_ptr), 1)
    written = np.concatenate([[0], np.cumsum(per_action)])
    least = int((written[task.action_ptr[1:]] - written[task.action_ptr[:-1]]).max(initial=1))
    rows = memory.fit_rows(footprint, memory.tabulation_row(footprint, prompts, state, action), max(batch_size, least),
                           least, f"one history of {task.name} ({least} rows of up to {prompts[-1] + action} tokens)")
    with tqdm(total=n_histories, unit="history", disable=not progress, desc=f"tabulating {task.name}",
              leave=False) as bar:
        walk = _Tabulation(model, task, codec, temperature, rows, bar)
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
