"""The KL-RL optimum (lmcoh.oracle.klrl) against docs/theory.md's numbers and a brute force that
enumerates trajectories and computes J_beta = E[R] - beta KL(pi || p) with no dynamic programming."""

import dataclasses
import json
import math

import numpy as np
import pytest
from test_exact import EXAMPLE3, MOUNTAIN, max_diff, random_task

from lmcoh import cli
from lmcoh.errors import LmcohError
from lmcoh.oracle import exact
from lmcoh.oracle import klrl
from lmcoh.tasks.generators import gridworld, random_tree

EPS = klrl.EPSILON


# ---- the numbers of docs/theory.md ------------------------------------------------------------
@pytest.mark.parametrize("task, reward, beta, want", [
    (MOUNTAIN, "log_q", 1.0, [2 / 5, 1.0]),
    (MOUNTAIN, "log_q", 0.5, [8 / 17, 1.0]),
    (MOUNTAIN, "success", 1.0, [0.46757, math.e / (1 + math.e)]),
    (MOUNTAIN, "success", 0.5, [0.48345, math.e ** 2 / (1 + math.e ** 2)]),
    (EXAMPLE3, "log_q", 1.0, [0.45679]),
    (EXAMPLE3, "log_q", 0.5, [math.sqrt(2) - 1]),
    (EXAMPLE3, "success", 1.0, [0.47918]),
    (EXAMPLE3, "success", 0.5, [0.45843]),
])
def test_theory_numbers(task, reward, beta, want):
    pi = klrl.optimum(task, beta, reward).policy
    got = [pi[0][0]] + ([pi[1][0]] if len(want) > 1 else [])  # pi(up|start), pi(up|ridge); pi(a1|root)
    rounded = [w for w in want if round(w, 5) == w]  # the 5-digit numbers are checked to their digits
    assert got == pytest.approx(want, abs=5e-6 if rounded else 1e-9)


def test_closed_forms_to_1e_9():
    """The 5-digit numbers of docs/theory.md from their closed forms, to 1e-9."""
    # mountain race, R = success: V(ridge) = beta log((e^(1/beta) + 1) / 2), Q(down) = 3/4
    for beta in (1.0, 0.5):
        v_ridge = beta * math.log((math.exp(1 / beta) + 1) / 2)
        up = 1 / (1 + math.exp((0.75 - v_ridge) / beta))
        assert klrl.optimum(MOUNTAIN, beta, "success").policy[0][0] == pytest.approx(up, abs=1e-9)
    # Example 3: Q(a1) = E[log q] = 3/4 log 1/3 + 1/4 log 2/3 (log_q); E[q] = 5/12 (success); Q(a2) likewise
    for reward, q1, q2 in (("log_q", 0.75 * math.log(1 / 3) + 0.25 * math.log(2 / 3), 0.5 * math.log(2 / 9)),
                           ("success", 5 / 12, 0.5)):
        for beta in (1.0, 0.5):
            a1 = 1 / (1 + math.exp((q2 - q1) / beta))
            assert klrl.optimum(EXAMPLE3, beta, reward).policy[0][0] == pytest.approx(a1, abs=1e-9)
    assert klrl.optimum(EXAMPLE3, 1.0, "log_q").policy[0][0] != pytest.approx(5 / 11, abs=1e-3)  # not G(p)


def test_example3_three_pressures_differ_at_k_2():
    """Retraining 25/61, temperature 7/17, KL-RL sqrt(2) - 1 (docs/theory.md)."""
    seqs = {kind: exact.sequence(EXAMPLE3, kind, 2) for kind in ("retrain", "temperature", "klrl")}
    assert seqs["retrain"][2][0][0] == pytest.approx(25 / 61, abs=1e-12)
    assert seqs["temperature"][2][0][0] == pytest.approx(7 / 17, abs=1e-12)
    assert seqs["klrl"][2][0][0] == pytest.approx(math.sqrt(2) - 1, abs=1e-12)
    assert seqs["klrl"][0][0][0] == 0.5  # k = 0 is the prior


def test_exact_json_has_both_sequences(capsys):
    assert cli.main(["exact", "stochastic_example", "--steps", "2", "--json", "--epsilon", "1e-6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] == 1e-6 and out["notes"] == {}
    klrl_seq, success_seq = out["sequences"]["klrl"], out["sequences"]["klrl_success"]
    assert [e["k"] for e in klrl_seq] == [0, 1, 2] and klrl_seq[0]["beta"] == "inf" and klrl_seq[2]["beta"] == 0.5
    assert klrl_seq[2]["policy"]["root"]["a1"] == pytest.approx(math.sqrt(2) - 1, abs=1e-9)
    assert success_seq[1]["policy"]["root"]["a1"] == pytest.approx(1 / (1 + math.exp(0.5 - 5 / 12)), abs=1e-9)
    for entry in klrl_seq + success_seq:
        assert {"success", "return", "incoherence", "causal_entropy", "objective"} <= set(entry)
    assert cli.main(["exact", "mountain_race", "--steps", "2"]) == 0
    table = capsys.readouterr().out
    assert "klrl_success: max E[success]" in table and "0.483451" in table


# ---- brute force: J_beta by enumerating trajectories -----------------------------------------
def brute_objective(task, choose, beta, reward, prior=None, eps=EPS):
    """(J_beta, success) of the policy ``choose(t, s, path)`` (probabilities over task.actions_of(s);
    ``path`` the tuple of (state, action) so far), by walking every trajectory."""
    floor = math.log(eps)
    p = exact.prior_policy(task) if prior is None else prior
    where = [{int(s): i for i, s in enumerate(layer.states)} for layer in task.layers]
    total = [0.0, 0.0]

    def end(prob, logq, r, kl):
        value = math.exp(logq) if reward == "success" else r
        total[0] += prob * (value - (beta * kl if math.isfinite(beta) else 0.0))
        total[1] += prob * math.exp(logq)

    def walk(s, t, prob, path, logq, r, kl):
        if task.terminal[s]:
            return end(prob, logq + task.terminal_logq[s], r + max(task.terminal_logq[s], floor), kl)
        if t == task.steps:
            return end(prob, logq + task.timeout_logq, r + max(task.timeout_logq, floor), kl)
        layer, i = task.layers[t], where[t][s]
        ref = p[t][layer.start[i]:layer.start[i + 1]]
        for j, (a, pa) in enumerate(zip(task.actions_of(s), choose(t, s, path))):
            if pa == 0:
                continue
            for n, pn in task.successors(a):
                walk(n, t + 1, prob * pa * pn, path + ((s, a),), logq + task.action_logq[a],
                     r + max(task.action_logq[a], floor), kl + math.log(pa / ref[j]))

    for s in np.flatnonzero(task.start_prob):
        walk(int(s), 0, float(task.start_prob[s]), (), 0.0, 0.0, 0.0)
    return total


def markov_choice(task, policy):
    where = [{int(s): i for i, s in enumerate(layer.states)} for layer in task.layers]

    def choose(t, s, path):
        layer, i = task.layers[t], where[t][s]
        return policy[t][layer.start[i]:layer.start[i + 1]]
    return choose


def history_choice(task, opt):
    """The optimum's own choice at a history: on the unrolled task when it has one, found by walking
    the unrolled task alongside the history (its copies mirror the task's actions and transitions)."""
    if opt.unrolled is None:
        return markov_choice(task, opt.policy)
    u, upi = opt.unrolled, opt.unrolled_policy
    where = [{int(s): i for i, s in enumerate(layer.states)} for layer in u.layers]
    first = {int(s): i for i, s in enumerate(task.layers[0].states)}  # start copies come first, in order

    def copy_at(path, s):
        c = first[path[0][0] if path else s]
        for k, (state, a) in enumerate(path):
            nxt = path[k + 1][0] if k + 1 < len(path) else s
            ua = u.actions_of(c)[a - int(task.action_ptr[state])]
            c = u.successors(ua)[[n for n, _ in task.successors(a)].index(nxt)][0]
        return c

    def choose(t, s, path):
        layer, i = u.layers[t], where[t][copy_at(path, s)]
        return upi[t][layer.start[i]:layer.start[i + 1]]
    return choose


def perturbed(choose, rng, h, direction=None):
    """softmax(log pi + h g) with g drawn once per (history, action): a history-dependent direction
    (``direction``, a dict filled as histories are met, lets two calls share g)."""
    direction = {} if direction is None else direction

    def out(t, s, path):
        pi = np.asarray(choose(t, s, path), dtype=float)
        g = direction.setdefault((t, s, path), rng.normal(size=len(pi)))
        with np.errstate(divide="ignore"):
            logits = np.log(pi) + h * g
        w = np.exp(logits - np.max(logits))
        return w / w.sum()
    return out


def directional_derivative(task, choose, beta, reward, seed, h=1e-5):
    rng, g = np.random.default_rng(seed), {}
    j_plus = brute_objective(task, perturbed(choose, rng, h, g), beta, reward)[0]
    j_minus = brute_objective(task, perturbed(choose, rng, -h, g), beta, reward)[0]
    return (j_plus - j_minus) / (2 * h)


CASES = ([("tree", seed, st) for seed in range(4) for st in (False, True)]
         + [("random", seed, True) for seed in range(10)])


def _case(kind, seed, stochastic):
    if kind == "tree":
        return random_tree(T=3, A=2, seed=seed, stochastic=stochastic)
    return random_task(seed)  # recurring states, q = 0 on actions, timeouts


@pytest.mark.parametrize("kind, seed, stochastic", CASES)
@pytest.mark.parametrize("reward", ["log_q", "success"])
def test_optimum_beats_every_other_policy(kind, seed, stochastic, reward):
    task = _case(kind, seed, stochastic)
    rng = np.random.default_rng(seed)
    for beta in (1.0, 0.5, 1 / 3):
        opt = klrl.optimum(task, beta, reward)
        choose = history_choice(task, opt)
        best, succ = brute_objective(task, choose, beta, reward)
        assert opt.value == pytest.approx(best, abs=1e-9)
        assert opt.summary(task)["success"] == pytest.approx(succ, abs=1e-9)
        for trial in range(3):  # perturbed (history-dependent) and random policies do worse
            worse = perturbed(choose, rng, 0.3)
            assert brute_objective(task, worse, beta, reward)[0] <= best + 1e-12
            dirichlet = [np.concatenate([rng.dirichlet(np.ones(n)) for n in np.diff(layer.start)])
                         for layer in task.layers]
            assert brute_objective(task, markov_choice(task, dirichlet), beta, reward)[0] <= best + 1e-12
        assert abs(directional_derivative(task, choose, beta, reward, seed)) < 1e-6


def test_the_gradient_check_can_fail():
    """At a policy that is not the optimum (temperature 2 on Example 3) the derivative is not 0."""
    pi = exact.temperature_policy(EXAMPLE3, 2.0)
    assert abs(directional_derivative(EXAMPLE3, markov_choice(EXAMPLE3, pi), 0.5, "log_q", 0)) > 1e-4


def test_success_reward_is_history_dependent_only_where_w_differs():
    assert klrl.optimum(MOUNTAIN, 1.0, "success").unrolled is None  # q only on terminals
    assert klrl.optimum(random_tree(T=3, A=2, seed=0), 1.0, "success").unrolled is None  # a tree
    grid = gridworld(size=3, slip=0.2, horizon=5, seed=0)
    even = dataclasses.replace(grid, action_logq=np.full(grid.n_actions, math.log(0.9)))
    assert klrl.optimum(even, 1.0, "success").unrolled is None  # w depends on the step alone
    costs = np.log(np.random.default_rng(0).uniform(0.5, 1.0, grid.n_actions))
    costly = dataclasses.replace(grid, action_logq=costs)
    opt = klrl.optimum(costly, 1.0, "success")
    assert opt.unrolled is not None  # two paths to a cell collect different q
    # the aggregated table at step 0 is the policy itself (one history per start state)
    assert np.allclose(opt.policy[0], opt.unrolled_policy[0])
    assert all(np.allclose(layer.by_state.sum(p), 1.0) for p, layer in zip(opt.policy, costly.layers))
    assert max_diff(opt.policy, klrl.optimum(costly, 1.0, "log_q").policy) > 1e-3


def test_too_many_histories_is_left_out_with_the_reason(monkeypatch):
    task = next(random_task(s) for s in range(10) if klrl._collected(random_task(s)) is None)
    monkeypatch.setattr(klrl, "MAX_HISTORIES", 2)
    with pytest.raises(klrl.TooManyHistories, match="unrolled by history has more than 2"):
        klrl.optimum(task, 1.0, "success")
    out = exact.analyse(task, steps=1)
    assert "klrl_success" not in out["sequences"] and out["notes"]["klrl_success"].startswith("left out: ")
    monkeypatch.undo()
    out = exact.analyse(task, steps=1)
    assert "klrl_success" in out["sequences"] and "unrolled by history" in out["notes"]["klrl_success"]


# ---- temperature on deterministic tasks, not on stochastic ones --------------------------------
def floored(task, q_min=0.05):
    """The task with every q at least ``q_min``: where q = 0 the two differ by convention (a state
    whose every action fails keeps p under temperature; KL-RL ranks them by floored rewards)."""
    low = math.log(q_min)
    return dataclasses.replace(task, action_logq=np.maximum(task.action_logq, low),
                               terminal_logq=np.maximum(task.terminal_logq, low),
                               timeout_logq=max(task.timeout_logq, low))


@pytest.mark.parametrize("task", [random_tree(T=4, A=3, seed=s) for s in range(3)]
                         + [floored(gridworld(size=4, slip=0.0, horizon=8, seed=0))]
                         + [floored(random_task(s, stochastic=False)) for s in range(6)], ids=lambda t: t.name)
def test_klrl_equals_temperature_on_deterministic_tasks(task):
    assert task.deterministic
    K = 5
    kl, temp = exact.sequence(task, "klrl", K), exact.sequence(task, "temperature", K)
    for k in range(K + 1):
        assert max_diff(kl[k], temp[k]) < 1e-9  # the trees' q = 0 leaves, floored at 1e-12, move pi by eps^k


@pytest.mark.parametrize("seed", range(4))
def test_klrl_differs_from_temperature_and_retraining_on_stochastic_trees(seed):
    task = random_tree(T=3, A=2, seed=seed, stochastic=True)
    kl, temp, ret = (exact.sequence(task, kind, 3) for kind in ("klrl", "temperature", "retrain"))
    assert max_diff(kl[1], temp[1]) > 1e-4 and max_diff(kl[2], temp[2]) > 1e-4 and max_diff(kl[2], ret[2]) > 1e-4


def test_klrl_from_any_prior_and_bad_epsilon(mountain):
    p = [np.array([0.8, 0.2]), np.array([0.3, 0.7, 0.5, 0.5])]
    pi = klrl.optimum(mountain, 1.0, "log_q", prior=p).policy
    # V(ridge) = log(0.3 * 1 + 0.7 * eps), Q(down) = log 3/4: pi(up) proportional to 0.8 * 0.3
    assert pi[0][0] == pytest.approx(0.8 * 0.3 / (0.8 * 0.3 + 0.2 * 0.75), abs=1e-9)
    with pytest.raises(LmcohError, match="epsilon"):
        klrl.optimum(mountain, 1.0, "log_q", epsilon=0.0)
