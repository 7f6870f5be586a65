"""Batched rollouts sample exactly the tabulated LM policy, reproducibly."""

import math

import numpy as np
import pytest

from conftest import tiny_gpt2, tiny_llama
from lmcoh.lm import rollout, scoring, tabulate, text
from lmcoh.tasks.episodes import episode_logq

# 99.9% quantiles of chi-square with df degrees of freedom, df = 1..12
CHI2_999 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91]


def chi_square(observed, expected):
    keep = expected > 0
    assert np.all(observed[~keep] == 0)
    stat = float(np.sum((observed[keep] - expected[keep]) ** 2 / expected[keep]))
    return stat, int(keep.sum()) - 1


def assert_matches_table(task, episodes, table):
    """Per step, the (state, action) counts against n * visit weight * pi, plus 'ended'."""
    n = len(episodes)
    for t, layer in enumerate(task.layers):
        observed = np.zeros(len(layer.actions) + 1)
        slot = {int(a): j for j, a in enumerate(layer.actions)}
        for ep in episodes:
            if len(ep.actions) > t:
                observed[slot[ep.actions[t]]] += 1
            else:
                observed[-1] += 1
        flow = table.visits[t][layer.seg] * table.policy[t]
        expected = n * np.append(flow, max(0.0, 1.0 - flow.sum()))
        stat, df = chi_square(observed, expected)
        if df > 0:
            assert stat < CHI2_999[df - 1], (t, stat, df)


def test_frequencies_match_tabulation_mountain_race(mountain):
    lm = tiny_llama(mountain, seed=11)
    # sharpen the random model so the two actions differ clearly
    episodes = rollout.sample_episodes(lm, mountain, 3000, seed=3, temperature=0.2, progress=False)
    table = tabulate.tabulate(lm, mountain, temperature=0.2)
    assert_matches_table(mountain, episodes, table)
    # whole trajectories: P(a0, a1) = pi(a0 | start) pi(a1 | s1) on this tree
    observed, expected = np.zeros(4), np.zeros(4)
    for ep in episodes:
        observed[2 * (ep.actions[0] - 0) + (ep.actions[1] - mountain.action_ptr[ep.states[1]])] += 1
    p0, p1 = table.policy[0], table.policy[1]
    expected[:] = 3000 * np.array([p0[0] * p1[0], p0[0] * p1[1], p0[1] * p1[2], p0[1] * p1[3]])
    stat, df = chi_square(observed, expected)
    assert stat < CHI2_999[df - 1]


def test_frequencies_match_tabulation_history_dependent(ring):
    lm = tiny_llama(ring, seed=12)
    episodes = rollout.sample_episodes(lm, ring, 2000, goal="failure", seed=4, temperature=0.3,
                                       batch_size=300, progress=False)
    assert_matches_table(ring, episodes, tabulate.tabulate(lm, ring, goal="failure", temperature=0.3))
    rate = np.mean([ep.success for ep in episodes])
    mean = np.mean([ep.success_prob for ep in episodes])
    assert abs(rate - mean) < 4 * math.sqrt(mean * (1 - mean) / len(episodes))


def test_markov_prompts(ring):
    lm = tiny_llama(ring, seed=13)
    markov = text.Layout(mode="markov")
    episodes = rollout.sample_episodes(lm, ring, 1000, goal="none", seed=5, layout=markov,
                                       temperature=0.3, progress=False)
    assert_matches_table(ring, episodes, tabulate.tabulate(lm, ring, goal="none", layout=markov,
                                                          temperature=0.3))


def test_episode_records(expedition):
    lm = tiny_gpt2(expedition, seed=14)
    episodes = rollout.sample_episodes(lm, expedition, 6, goal="success", seed=6, batch_size=4,
                                       progress=False)
    for ep in episodes:
        assert ep.goal == "success" and len(ep.states) == len(ep.actions) + 1
        assert ep.success_prob == pytest.approx(math.exp(episode_logq(expedition, ep.states, ep.actions)))
        for t, (s, a) in enumerate(zip(ep.states, ep.actions)):
            logp = scoring.action_logprobs(lm, expedition, [(ep.states[:t + 1], ep.actions[:t])])[0]
            assert ep.logprobs[t] == pytest.approx(logp[a - expedition.action_ptr[s]], abs=1e-5)
        line = text.episode_record(text.Writer(expedition), ep)
        assert line["text"].startswith("[base_camp]") and " <success> " in line["text"]


def test_seeded_and_independent_of_batch_size(ring):
    lm = tiny_llama(ring, seed=15)

    def run(seed, batch_size):
        return [(e.states, e.actions, e.success) for e in
                rollout.sample_episodes(lm, ring, 40, seed=seed, batch_size=batch_size, progress=False)]

    first = run(7, 16)
    assert first == run(7, 16) == run(7, 40)
    assert first != run(8, 16)


@pytest.mark.parametrize("name, mode", [("mountain", "history"), ("ring", "markov")])
def test_a_tabulated_policy_gives_the_episodes_rollouts_give(name, mode, mountain, ring):
    """Where the policy is one distribution per (step, state), `sample_episodes` draws from the
    tabulated policy instead of running the model per episode: the very episodes the rollouts draw."""
    task = {"mountain": mountain, "ring": ring}[name]
    lm = tiny_llama(task, seed=16)
    layout = text.Layout(mode=mode)
    fast = rollout.sample_episodes(lm, task, 300, seed=9, temperature=0.3, layout=layout, progress=False,
                                   rows=range(50, 300))
    slow = [e for e, _ in rollout.rollout(lm, task, 300, seed=9, temperature=0.3, layout=layout, progress=False,
                                          rows=range(50, 300))]
    assert [(e.states, e.actions, e.success, e.goal) for e in fast] == \
        [(e.states, e.actions, e.success, e.goal) for e in slow]
    assert np.allclose(np.concatenate([e.logprobs for e in fast]), np.concatenate([e.logprobs for e in slow]),
                       atol=1e-5)
