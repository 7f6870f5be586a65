import json
from collections import Counter

import numpy as np
import pytest

from lmcoh.lm.text import Writer, episode_record
from lmcoh.tasks.episodes import (Episode, episode_logq, sample_outcome_balanced, sample_prior_episodes,
                            step_environment)
from lmcoh.tasks.generators import generate
from lmcoh.tasks.library import load_task
from lmcoh.tasks.task import TaskError


def names(task, episode):
    return tuple(task.action_names[a] for a in episode.actions)


def test_mountain_race_data_set_is_exactly_balanced(mountain):
    episodes = sample_prior_episodes(mountain, 8000, np.random.default_rng(0))
    counts = Counter((names(mountain, e), e.success) for e in episodes)
    # Uniform prior: 2000 episodes per path; outcomes split exactly by q (1, 0, 3/4, 3/4).
    assert counts == {(("up", "up"), True): 2000, (("up", "down"), False): 2000,
                      (("down", "up"), True): 1500, (("down", "up"), False): 500,
                      (("down", "down"), True): 1500, (("down", "down"), False): 500}
    successes = [e for e in episodes if e.success]
    assert sum(names(mountain, e)[0] == "up" for e in successes) / len(successes) == 2 / 5


def test_outcome_balanced_episodes_keep_each_conditional():
    from lmcoh.oracle import exact

    task = generate("random-tree:T=3,A=2,seed=0,stochastic=1")  # S(p) = 0.22: successes are rare
    episodes = sample_outcome_balanced(task, 2000, np.random.default_rng(0))
    wins = [e for e in episodes if e.success]
    assert len(wins) == 1000 and len(episodes) == 2000
    g = exact.goal_condition(task, exact.prior_policy(task))[0]  # p(a | root, O = 1)
    assert np.mean([e.actions[0] == 0 for e in wins]) == pytest.approx(g[0], abs=0.01)
    success = exact.success(task, exact.prior_policy(task))
    p_fail = (0.5 - g[0] * success) / (1 - success)  # p(a | root, O = 0)
    assert np.mean([e.actions[0] == 0 for e in episodes if not e.success]) == pytest.approx(p_fail, abs=0.01)


def test_outcome_balanced_when_success_is_impossible():
    from conftest import task_from_yaml

    hopeless = task_from_yaml("horizon: 1\nstart: s\nstates:\n  s:\n    actions:\n"
                              "      a: {next: end, success: 0}\n      b: {next: end, success: 0}\n"
                              "terminals:\n  end: {}\n", "hopeless")
    episodes = sample_outcome_balanced(hopeless, 10, np.random.default_rng(0), max_draws=3)
    assert len(episodes) == 10 and not any(e.success for e in episodes)


def test_episode_fields(mountain):
    e = sample_prior_episodes(mountain, 5, np.random.default_rng(1))[0]
    assert len(e.states) == len(e.actions) + 1 == mountain.horizon + 1
    assert mountain.terminal[e.states[-1]]
    assert e.logprobs == pytest.approx([np.log(0.5)] * 2)
    assert e.success_prob == pytest.approx(np.exp(episode_logq(mountain, e.states, e.actions)))


def test_counts_stay_within_one_of_expectation_on_stochastic_tree():
    task = generate("random-tree:T=3,A=2,seed=0,stochastic=1")
    n = 3001
    episodes = sample_prior_episodes(task, n, np.random.default_rng(0))
    first = Counter((e.actions[0], e.states[1]) for e in episodes)
    for a in task.actions_of(0):
        assert abs(sum(c for (b, _), c in first.items() if b == a) - n / 2) <= 1
        total = sum(c for (b, _), c in first.items() if b == a)
        for nxt, p in task.successors(a):
            assert abs(first[(a, nxt)] - total * p) <= 1
    by_path = Counter()
    for e in episodes:
        by_path[tuple(e.states)] += 1
    for path, count in by_path.items():
        hits = [e for e in episodes if tuple(e.states) == path]
        assert abs(sum(e.success for e in hits) - count * hits[0].success_prob) < 1 + 1e-9


def test_outcomes_are_unbiased_over_seeds():
    # Each episode alone is an exact draw: the success rate over many seeds matches S(p).
    task = load_task("stochastic_example")
    from lmcoh.oracle import exact

    rates = [np.mean([e.success for e in sample_prior_episodes(task, 7, np.random.default_rng(s))])
             for s in range(500)]
    assert np.mean(rates) == pytest.approx(exact.success(task, exact.prior_policy(task)), abs=0.01)


def test_sampling_is_seeded(mountain):
    a = sample_prior_episodes(mountain, 50, np.random.default_rng(3))
    b = sample_prior_episodes(mountain, 50, np.random.default_rng(3))
    c = sample_prior_episodes(mountain, 50, np.random.default_rng(4))
    assert a == b and a != c


def test_step_environment_frequencies():
    task = load_task("stochastic_example")
    rng = np.random.default_rng(0)
    s0 = int(np.flatnonzero(task.start_prob)[0])
    a = task.actions_of(s0)[0]
    draws = Counter(step_environment(task, s0, a, rng) for _ in range(5000))
    for nxt, p in task.successors(a):
        assert draws[nxt] / 5000 == pytest.approx(p, abs=0.03)


def test_json_round_trip(mountain):
    for e in sample_prior_episodes(mountain, 20, np.random.default_rng(0)):
        e.goal = "success"
        d = episode_record(Writer(mountain), e)
        assert d["text"].startswith("[start] ") and " <success> " in d["text"]
        assert d["outcome"] == ("success" if e.success else "failure")
        assert Episode.from_json(mountain, json.loads(json.dumps(d))) == e


def test_json_that_does_not_fit_the_task(mountain):
    d = sample_prior_episodes(mountain, 1, np.random.default_rng(0))[0].to_json(mountain)
    with pytest.raises(TaskError, match="no action 'left'"):
        Episode.from_json(mountain, {**d, "actions": ["left", "up"]})
    with pytest.raises(TaskError, match="unknown state"):
        Episode.from_json(mountain, {**d, "states": ["nowhere"] + d["states"][1:]})
