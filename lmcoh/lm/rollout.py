"""Batched rollouts of an LM policy with the environment in the loop.

All live episodes of a batch step together on one KV cache (`lmcoh.lm.scoring.Context`): at each
decision one forward scores every legal action of every live episode (the candidates' tokens
through the token trie, teacher-forced on a copy of the cache), the action is drawn from the
renormalised scores, so samples follow exactly the distribution `lmcoh.lm.tabulate.tabulate` computes, and
one more forward appends the chosen action and the next state's text to the cache. Episodes
that end leave the batch.

Randomness: episode i uses row i of one table of uniforms drawn from ``seed`` up front (start,
then action and transition at each step, then the outcome), so results do not depend on the
batch size and a run is reproducible. ``rows`` samples only some episodes of that table: the
processes of a data-parallel run each take their share of one table, so together they draw
the very episodes one process would.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from tqdm import tqdm

from .. import faults
from ..tasks.episodes import Episode, _pick, episode_logq
from ..tasks.task import Task
from . import memory
from .scoring import Codec, first_tokens, open_context, renormalise
from .text import Layout


def sample_episodes(loaded, task: Task, n: int, *, goal: str = "success", seed: int = 0,
                    temperature: float = 1.0, batch_size: int = 256, layout: Layout = Layout(),
                    progress: bool = True, rows: range | None = None) -> list[Episode]:
    """``n`` episodes from the LM policy prompted with ``goal``, outcomes drawn w.p. prod q
    (only episodes ``rows`` of the ``n``, when given).

    When the policy is one distribution per (step, state) (Markov prompts, or a task where
    each step's state has a single history) and there are fewer such distributions than
    episodes, the policy is tabulated once (lmcoh.lm.tabulate) and the episodes drawn from the
    table with the same uniforms: the same episodes as rollouts, without running the model per
    episode."""
    from .tabulate import count_histories, tabulate

    decisions = sum(len(layer.states) for layer in task.layers)
    if (layout.mode == "markov" or count_histories(task) == decisions) and decisions <= n:
        policy = tabulate(loaded, task, goal, temperature, layout, batch_size=batch_size).policy
        uniforms = np.random.default_rng(seed).random((n, 2 * task.steps + 2))
        episodes = _from_table(task, policy, goal, uniforms if rows is None else uniforms[rows.start:rows.stop])
        faults.point("sample")
        return episodes
    return [episode for episode, _ in rollout(loaded, task, n, goal=goal, seed=seed,
                                              temperature=temperature, batch_size=batch_size,
                                              layout=layout, progress=progress, rows=rows)]


def _from_table(task: Task, policy: list[np.ndarray], goal: str, u: np.ndarray) -> list[Episode]:
    """Episodes drawn from a per-(step, state) ``policy`` as `_batch` draws them from the model."""
    where = []
    for layer in task.layers:
        index = np.full(task.n_states, -1, dtype=np.int64)
        index[layer.states] = np.arange(len(layer.states))
        where.append(index)
    out = []
    for row in u:
        states, actions, logprobs = [_pick(task.start_prob, row[0])], [], []
        for t in range(task.steps):
            s = states[-1]
            if task.terminal[s]:
                break
            layer, i = task.layers[t], where[t][s]
            p = policy[t][layer.start[i]:layer.start[i + 1]]
            k = _pick(p, row[1 + 2 * t])
            a = int(layer.actions[layer.start[i] + k])
            lo, hi = task.trans_ptr[a], task.trans_ptr[a + 1]
            states.append(int(task.trans_next[lo + _pick(task.trans_prob[lo:hi], row[2 + 2 * t])]))
            actions.append(a)
            logprobs.append(float(np.log(p[k])))
        prob = float(np.exp(episode_logq(task, states, actions)))
        out.append(Episode(states, actions, logprobs, prob, bool(row[-1] < prob), goal))
    return out


def rollout(loaded, task: Task, n: int, *, goal: str = "success", seed: int = 0,
            temperature: float = 1.0, batch_size: int = 256, layout: Layout = Layout(),
            progress: bool = True, codec: Codec | None = None, rows: range | None = None
            ) -> Iterator[tuple[Episode, list[np.ndarray]]]:
    """Each episode with the action distribution pi(.|h) it was drawn from at every step."""
    codec = Codec(loaded.tokenizer, task, layout, goal) if codec is None else codec
    footprint = memory.Footprint.of(loaded.model)
    prompts, state, action = codec.lengths()
    memory.check_context(footprint, max(prompts) + action, f"the longest history of {task.name}")
    actions = int(np.diff(task.action_ptr).max(initial=1))
    batch_size = memory.fit_rows(footprint, memory.rollout_row(footprint, prompts, state, action, actions), batch_size,
                                 1, f"one episode of {task.name} (up to {max(prompts) + action} tokens)")
    uniforms = np.random.default_rng(seed).random((n, 2 * task.steps + 2))
    if rows is not None:
        uniforms = uniforms[rows.start:rows.stop]
    with tqdm(total=len(uniforms), unit="ep", disable=not progress, desc="sampling") as bar:
        for lo in range(0, len(uniforms), batch_size):
            yield from _batch(loaded.model, task, codec, temperature, uniforms[lo:lo + batch_size], bar)
            faults.point("sample")


def _batch(model, task: Task, codec: Codec, temperature: float, u: np.ndarray,
           bar) -> list[tuple[Episode, list[np.ndarray]]]:
    n = len(u)
    states = [[_pick(task.start_prob, u[i, 0])] for i in range(n)]
    actions = [[] for _ in range(n)]
    logprobs = [[] for _ in range(n)]
    dists = [[] for _ in range(n)]
    alive = [i for i in range(n) if not task.terminal[states[i][0]]]
    bar.update(n - len(alive))
    ctx = None
    for t in range(task.steps):
        if not alive:
            break
        cur = [states[i][-1] for i in alive]
        choices = codec.choices_of(cur, t)
        if ctx is None:
            ctx = open_context(model, [codec.prompt(states[i], actions[i]) for i in alive], temperature,
                               then=first_tokens(choices))
        scores, branch = ctx.score([c for _, c in choices], [b for b, _ in choices])
        offset = np.cumsum([0] + [len(x) for x in scores])
        keep, survivors = [], []
        for row, (i, s, logp) in enumerate(zip(alive, cur, scores)):
            logp = renormalise(logp)
            p = np.exp(logp)
            k = _pick(p, u[i, 1 + 2 * t])
            a = task.action_ptr[s] + k
            lo, hi = task.trans_ptr[a], task.trans_ptr[a + 1]
            nxt = int(task.trans_next[lo + _pick(task.trans_prob[lo:hi], u[i, 2 + 2 * t])])
            states[i].append(nxt)
            actions[i].append(int(a))
            logprobs[i].append(float(logp[k]))
            dists[i].append(p)
            if not task.terminal[nxt] and t + 1 < task.steps:
                keep.append(offset[row] + k)  # this episode's branch continued by its action
                survivors.append(i)
        bar.update(len(alive) - len(survivors))
        alive = survivors
        if not alive:
            break
        # markov prompts show only the new state: the next step starts a fresh context
        ctx = None if codec.layout.mode == "markov" else branch.take(keep)
        del branch
        memory.reclaim()
        if ctx is not None:
            follows = codec.follow_of([actions[i][-1] for i in alive], [states[i][-1] for i in alive], t + 1)
            ctx.extend([list(c) for _, c in follows], back=[b for b, _ in follows],
                       then=first_tokens(codec.choices_of([states[i][-1] for i in alive], t + 1)))
    out = []
    for i in range(n):
        prob = float(np.exp(episode_logq(task, states[i], actions[i])))
        episode = Episode(states[i], actions[i], logprobs[i], prob, bool(u[i, -1] < prob), codec.goal)
        out.append((episode, dists[i]))
    return out
