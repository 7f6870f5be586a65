"""Exact action scoring and tabulation against naive one-sequence-at-a-time computations."""

import math

import numpy as np
import pytest

from conftest import RING, brute_logprobs, random_standin, task_from_yaml, tiny_gpt2, tiny_llama
from lmcoh.lm import scoring, tabulate
from lmcoh.lm.text import Layout
from lmcoh.oracle import exact
from lmcoh.tasks.library import load_task


def naive_logprobs(loaded, task, goal, states, actions, temperature=1.0, layout=Layout()):
    """log pi(a | history): one full forward per (prompt + action) text, renormalised."""
    return brute_logprobs(loaded, task, layout, goal, states, actions, temperature)


def histories(task):
    """Every reachable (states, actions, probability factor of the dynamics) by brute force."""
    frontier = [([int(s)], [], float(p)) for s, p in enumerate(task.start_prob)
                if p > 0 and not task.terminal[s]]
    for t in range(task.horizon):
        yield t, frontier
        nxt = []
        for states, actions, w in frontier:
            for a in task.actions_of(states[-1]):
                for n, p in task.successors(a):
                    if not task.terminal[n] and t + 1 < task.horizon:
                        nxt.append((states + [n], actions + [a], w * p))
        frontier = nxt


def test_scores_match_one_sequence_at_a_time(mountain):
    lm = tiny_llama(mountain, seed=1)
    histories = [([0], []), ([0, 1], [0]), ([0, 2], [1])]
    for goal in ("success", "none"):
        got = scoring.action_logprobs(lm, mountain, histories, goal, temperature=0.7)
        for (states, actions), g in zip(histories, got):
            np.testing.assert_allclose(g, naive_logprobs(lm, mountain, goal, states, actions, 0.7), atol=1e-5)


def test_bpe_model_multi_token_actions(expedition):
    lm = tiny_gpt2(expedition, seed=2)
    codec = scoring.Codec(lm.tokenizer, expedition, goal="failure")
    assert min(len(codec.action_tokens[a]) for a in range(expedition.n_actions)) >= 4
    for t, frontier in histories(expedition):
        for states, actions, _ in frontier:
            # chunk-wise token ids equal the tokenisation of the whole prompt
            back, chunks = codec.choices(states[-1], t)
            assert back == 0 and codec.prompt(states, actions) == codec.encode(
                codec.writer.prompt("failure", states, actions))
    got = scoring.action_logprobs(lm, expedition, [([0, 1], [0])], "failure", temperature=1.3)[0]
    np.testing.assert_allclose(got, naive_logprobs(lm, expedition, "failure", [0, 1], [0], 1.3), atol=1e-5)


def _history_weights(lm, task, goal, layout=Layout()):
    """Brute-force aggregated policy and LM success probability over histories."""
    num = [np.zeros(len(layer.actions)) for layer in task.layers]
    den = [np.zeros(len(layer.states)) for layer in task.layers]
    success = 0.0
    frontier = [([int(s)], [], float(p), 0.0) for s, p in enumerate(task.start_prob)
                if p > 0 and not task.terminal[s]]
    for t, layer in enumerate(task.layers):
        nxt = []
        for states, actions, w, logq in frontier:
            s = states[-1]
            i = int(np.flatnonzero(layer.states == s)[0])
            pi = np.exp(naive_logprobs(lm, task, goal, states, actions, layout=layout))
            den[t][i] += w
            num[t][layer.start[i]:layer.start[i + 1]] += w * pi
            for k, a in enumerate(task.actions_of(s)):
                for n, p in task.successors(a):
                    lq = logq + task.action_logq[a]
                    if task.terminal[n] or t + 1 == task.horizon:
                        end = task.terminal_logq[n] if task.terminal[n] else task.timeout_logq
                        success += w * pi[k] * p * math.exp(lq + end)
                    else:
                        nxt.append((states + [n], actions + [a], w * pi[k] * p, lq))
        frontier = nxt
    table = [n / np.repeat(d, np.diff(layer.start)) for n, d, layer in zip(num, den, task.layers)]
    return table, success, den


@pytest.mark.parametrize("ref", ["mountain_race", "stochastic_example",
                                 "random-tree:T=3,A=2,stochastic=1,seed=3", "ring"])
def test_tabulate_equals_brute_force_over_histories(ref):
    task = task_from_yaml(RING, "ring") if ref == "ring" else load_task(ref)
    lm = tiny_llama(task, seed=4)
    _assert_tabulation_is_brute_force(lm, task, Layout())


@pytest.mark.parametrize("family, fmt", [("gpt2", "natural"), ("llama", "compact"), ("llama", "chat")])
def test_tabulate_equals_brute_force_with_pretrained_tokenizers(family, fmt, ring, gpt2_tokenizer, llama_tokenizer):
    """Recurring states and stochastic moves, read through BPE, SentencePiece and a chat template."""
    lm = random_standin(family, {"gpt2": gpt2_tokenizer, "llama": llama_tokenizer}[family], seed=4)
    _assert_tabulation_is_brute_force(lm, ring, Layout(fmt))


def _assert_tabulation_is_brute_force(lm, task, layout):
    got = tabulate.tabulate(lm, task, goal="success", layout=layout, batch_size=7)
    table, success, visits = _history_weights(lm, task, "success", layout)
    assert got.exact and got.histories == tabulate.count_histories(task)
    for p, q in zip(got.policy, table):
        np.testing.assert_allclose(p, q, atol=1e-6)
    for v, w in zip(got.visits, visits):
        np.testing.assert_allclose(v, w, atol=1e-6)
    assert got.success == pytest.approx(success, abs=1e-6)


@pytest.mark.parametrize("ref", ["stochastic_example", "gridworld:size=3,slip=0.2,horizon=5,seed=1",
                                 "random-tree:T=4,A=3,stochastic=1"])
def test_count_histories_matches_enumeration(ref):
    task = load_task(ref)
    assert tabulate.count_histories(task) == sum(len(f) for _, f in histories(task))


def test_markov_prompts_give_a_markov_policy(ring):
    task = ring
    assert task.recurring
    lm = tiny_llama(task, seed=5)
    markov = Layout(mode="markov")
    got = tabulate.tabulate(lm, task, goal="none", layout=markov)
    for t, layer in enumerate(task.layers):
        for i, s in enumerate(layer.states):
            want = np.exp(naive_logprobs(lm, task, "none", [int(s)] * (t + 1), [], layout=markov))
            np.testing.assert_allclose(got.policy[t][layer.start[i]:layer.start[i + 1]], want, atol=1e-6)
    assert got.success == pytest.approx(exact.success(task, got.policy), abs=1e-12)


def test_monte_carlo_fallback_within_its_confidence_intervals(ring):
    task = ring
    lm = tiny_llama(task, seed=6)
    full = tabulate.tabulate(lm, task, goal="success")
    mc = tabulate.tabulate(lm, task, goal="success", max_histories=10, mc_episodes=500, seed=1)
    assert not mc.exact and mc.episodes == 500 and mc.histories == full.histories
    assert abs(mc.success - full.success) <= 1.5 * mc.success_ci
    for t in range(len(task.layers)):
        seen = np.repeat(mc.visits[t] >= 30, np.diff(task.layers[t].start))
        err = np.abs(mc.policy[t] - full.policy[t])[seen]
        assert np.all(err <= 4 * mc.ci[t][seen] + 1e-6)


def test_temperature_flattens_and_sharpens(mountain):
    lm = tiny_llama(mountain, seed=7)
    ent = []
    for temperature in (0.25, 1.0, 4.0):
        p = tabulate.tabulate(lm, mountain, temperature=temperature).policy[0]
        ent.append(-np.sum(p * np.log(p)))
    assert ent[0] < ent[1] < ent[2]
    with pytest.raises(ValueError):
        tabulate.tabulate(lm, mountain, temperature=0.0)
