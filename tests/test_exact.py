"""The exact oracle against the paper's numbers and an independent brute-force enumeration."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from lmcoh.errors import LmcohError
from lmcoh.io import dumps
from lmcoh.oracle import exact as E
from lmcoh.tasks.task import Task


def _act(nxt, q=1.0, prior=None):
    return {"next": nxt if isinstance(nxt, dict) else {nxt: 1.0},
            "logq": math.log(q) if q > 0 else -math.inf, "prior": prior}


def _spec(name, horizon, start, states, terminals, timeout=0.0):
    for st in states.values():
        n = len(st["actions"])
        for a in st["actions"].values():
            if a["prior"] is None:
                a["prior"] = 1.0 / n
    return {"name": name, "horizon": horizon, "start": start, "states": states,
            "timeout_logq": math.log(timeout) if timeout > 0 else -math.inf,
            "terminals": {k: {"logq": math.log(v) if v > 0 else -math.inf} for k, v in terminals.items()}}


MOUNTAIN = Task.from_spec(_spec(
    "mountain_race", 2, {"start": 1.0},
    {"start": {"actions": {"up": _act("ridge"), "down": _act("forest")}},
     "ridge": {"actions": {"up": _act("gold"), "down": _act("chasm")}},
     "forest": {"actions": {"up": _act("silver"), "down": _act("silver")}}},
    {"gold": 1.0, "chasm": 0.0, "silver": 0.75}))

EXAMPLE3 = Task.from_spec(_spec(
    "example3", 1, {"root": 1.0},
    {"root": {"actions": {"a1": _act({"s1": 0.75, "s2": 0.25}), "a2": _act({"s1": 0.5, "s2": 0.5})}}},
    {"s1": 1 / 3, "s2": 2 / 3}))


def random_task(seed, stochastic=True, prior="dirichlet", recurring=True):
    """A small random MDP: states may recur at several steps, q = 0 happens, timeouts count."""
    rng = np.random.default_rng(seed)
    n_dec, n_term = int(rng.integers(2, 5)), int(rng.integers(1, 4))
    names = [f"s{i}" for i in range(n_dec)]
    terms = [f"end{i}" for i in range(n_term)]
    states = {}
    for i, s in enumerate(names):
        actions = {}
        n_act = int(rng.integers(1, 4))
        pri = rng.dirichlet(np.ones(n_act)) if prior == "dirichlet" else np.full(n_act, 1 / n_act)
        for j in range(n_act):
            pool = (names if recurring else names[i + 1:]) + terms
            k = int(rng.integers(1, 3)) if stochastic else 1
            nxt = rng.choice(pool, size=min(k, len(pool)), replace=False)
            probs = rng.dirichlet(np.ones(len(nxt)))
            q = float(rng.choice([0.0, 0.5, 0.9, 1.0], p=[0.15, 0.25, 0.3, 0.3]))
            actions[f"a{j}"] = _act(dict(zip(nxt, probs)), q, float(pri[j]))
        states[s] = {"actions": actions}
    tq = {t: float(rng.choice([0.0, 0.3, 1.0])) for t in terms}
    start = {"s0": 1.0} if not stochastic else dict(zip(names[:2], rng.dirichlet(np.ones(2))))
    return Task.from_spec(_spec(f"random{seed}", int(rng.integers(1, 4)), start, states, tq,
                                timeout=float(rng.choice([0.0, 0.5]))))


# ---- brute force: enumerate every trajectory -------------------------------------------------
def _index(task):
    return [{int(s): i for i, s in enumerate(layer.states)} for layer in task.layers]


def trajectories(task, policy, alpha=1.0):
    """Yield (prob, weight = prod q**alpha, [(t, s, a)], log-return) over all trajectories."""
    idx = _index(task)

    def walk(s, t, prob, w, path, ret):
        if task.terminal[s]:
            q = math.exp(task.terminal_logq[s])
            yield prob, w * q ** alpha, path, ret + task.terminal_logq[s]
            return
        if t == task.horizon:
            q = math.exp(task.timeout_logq)
            yield prob, w * q ** alpha, path, ret + task.timeout_logq
            return
        layer, i = task.layers[t], idx[t][s]
        for j in range(layer.start[i], layer.start[i + 1]):
            a, pa = int(layer.actions[j]), float(policy[t][j])
            if pa == 0:
                continue
            q = math.exp(task.action_logq[a])
            for n, pn in task.successors(a):
                yield from walk(n, t + 1, prob * pa * pn, w * q ** alpha, path + [(t, s, a)],
                                ret + task.action_logq[a])

    for s in np.flatnonzero(task.start_prob):
        yield from walk(int(s), 0, float(task.start_prob[s]), 1.0, [], 0.0)


def brute_condition(task, policy, alpha=1.0):
    """pi(a | s, t, O^alpha = 1) by counting over whole trajectories; NaN where undefined
    (the state is only reached by trajectories that have already failed)."""
    num, den = {}, {}
    for prob, w, path, _ in trajectories(task, policy, alpha):
        for t, s, a in path:
            num[(t, a)] = num.get((t, a), 0.0) + prob * w
            den[(t, s)] = den.get((t, s), 0.0) + prob * w
    out = []
    for t, layer in enumerate(task.layers):
        new = np.full(len(policy[t]), np.nan)
        for j, a in enumerate(layer.actions):
            s = int(layer.states[layer.seg[j]])
            if den.get((t, s), 0.0) > 0:
                new[j] = num.get((t, int(a)), 0.0) / den[(t, s)]
        out.append(new)
    return out


def assert_policy_close(a, b, tol=1e-9):
    """Equal wherever ``b`` is defined (not NaN)."""
    for x, y in zip(a, b):
        ok = ~np.isnan(y)
        np.testing.assert_allclose(x[ok], y[ok], atol=tol, rtol=0)


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


# ---- paper numbers --------------------------------------------------------------------------
def test_mountain_race_retrain_numbers():
    seq = E.sequence(MOUNTAIN, "retrain", 3)
    ups = [float(pi[0][0]) for pi in seq[1:]]
    assert ups == pytest.approx([2 / 5, 8 / 17, 32 / 59], abs=1e-12)
    for k, pi in enumerate(seq):
        assert pi[0][0] == pytest.approx(1 / (1 + 2 * 0.75 ** k) if k else 0.5, abs=1e-12)
    assert E.success(MOUNTAIN, seq[0]) == pytest.approx(5 / 8)
    assert E.success(MOUNTAIN, seq[1]) == pytest.approx(17 / 20)
    assert E.optimal_success(MOUNTAIN) == pytest.approx(1.0)


def test_mountain_race_boltzmann_iteration_reaches_coherent_policy():
    seq = E.boltzmann_iteration(MOUNTAIN, delta=1.0)
    assert seq[1][0] == pytest.approx([2 / 5, 3 / 5])
    assert seq[2][0] == pytest.approx([4 / 7, 3 / 7])
    assert E.incoherence(MOUNTAIN, seq[2]) == pytest.approx(0.0, abs=1e-12)
    assert E.incoherence(MOUNTAIN, seq[1]) > 0.01


def test_mountain_race_incoherence_infinite_for_prior_with_finite_part():
    p = E.prior_policy(MOUNTAIN)
    assert E.incoherence(MOUNTAIN, p) == math.inf
    # start: KL((1/2,1/2) || (2/5,3/5)) is the only finite term (forest is coherent)
    kl = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)
    assert E.incoherence_finite_part(MOUNTAIN, p) == pytest.approx(kl, abs=1e-12)
    assert E.expected_return(MOUNTAIN, p) == -math.inf


def test_example3_retrain_fold_and_temperature():
    retrain = [float(pi[0][0]) for pi in E.sequence(EXAMPLE3, "retrain", 2)]
    assert retrain == pytest.approx([1 / 2, 5 / 11, 25 / 61], abs=1e-12)
    for kind in ("fold", "fold_ratio"):
        assert [float(pi[0][0]) for pi in E.sequence(EXAMPLE3, kind, 2)] == pytest.approx(retrain, abs=1e-12)
    assert E.temperature_policy(EXAMPLE3, 2.0)[0][0] == pytest.approx(7 / 17, abs=1e-12)
    assert Fraction(7, 17) != Fraction(25, 61)


def test_analyse_json_shape_and_infinities():
    out = E.analyse(MOUNTAIN, steps=2, policies=True)
    assert set(out["sequences"]) == set(E.ALL_SEQUENCES)
    first = out["sequences"]["retrain"][0]
    assert first["return"] == -math.inf and first["incoherence"] == math.inf
    written = json.loads(dumps(out))["sequences"]["retrain"][0]  # lmcoh.io's JSON convention
    assert written["return"] == "-inf" and written["incoherence"] == "inf"
    assert out["sequences"]["retrain"][1]["policy"]["start"]["up"] == pytest.approx(0.4)
    assert out["deterministic"] is True


@pytest.mark.parametrize("seed", range(3))
def test_policy_table_reads_back_through_json(seed):
    task = random_task(seed)  # recurring states: keys STATE@t
    pi = E.sequence(task, "retrain", 2)[2]
    back = E.policy_from_table(task, json.loads(dumps(E.policy_table(task, pi))))
    assert all(np.array_equal(a, b) for a, b in zip(pi, back))
    table = E.policy_table(task, pi)
    del table[next(iter(table))]
    with pytest.raises(LmcohError, match="the policy table has no probability for"):
        E.policy_from_table(task, table)


# ---- brute force on random tasks -------------------------------------------------------------
@pytest.mark.parametrize("seed", range(25))
def test_dp_matches_brute_force(seed):
    task = random_task(seed)
    rng = np.random.default_rng(seed + 100)
    pi = [np.concatenate([[]] + [rng.dirichlet(np.ones(n)) for n in np.diff(layer.start)]) for layer in task.layers]
    trajs = list(trajectories(task, pi))
    S = sum(p * w for p, w, _, _ in trajs)
    assert E.success(task, pi) == pytest.approx(S, abs=1e-9)
    J = -math.inf if any(p > 0 and r == -math.inf for p, _, _, r in trajs) else sum(p * r for p, _, _, r in trajs)
    assert E.expected_return(task, pi) == pytest.approx(J, abs=1e-9)
    occ = E.occupancy(task, pi)
    for t, layer in enumerate(task.layers):
        for i, s in enumerate(layer.states):
            d = sum(p for p, _, path, _ in trajs if len(path) > t and path[t][1] == s)
            assert occ[t][i] == pytest.approx(d, abs=1e-9)
    assert_policy_close(E.goal_condition(task, pi), brute_condition(task, pi))
    p = E.prior_policy(task)
    for alpha in (0.0, 0.5, 2.0, 3.0):
        assert_policy_close(E.temperature_policy(task, alpha), brute_condition(task, p, alpha))


@pytest.mark.parametrize("seed", range(10))
def test_incoherence_matches_brute_force_q(seed):
    """kappa from Q computed by enumerating suffixes: Q(s,a) = log P(success | s, a, then pi)."""
    task = random_task(seed, prior="uniform")
    pi = E.goal_condition(task, E.prior_policy(task))
    idx = _index(task)
    occ = E.occupancy(task, pi)
    total = 0.0
    for t, layer in enumerate(task.layers):
        for i, s in enumerate(layer.states):
            if occ[t][i] == 0:
                continue
            lo, hi = layer.start[i], layer.start[i + 1]
            qs = np.array([_suffix_success(task, pi, t, int(s), int(a), idx) for a in layer.actions[lo:hi]])
            p = pi[t][lo:hi]
            pd = qs / qs.sum() if qs.sum() > 0 else p
            with np.errstate(divide="ignore", invalid="ignore"):
                kl = float(np.sum(np.where(p > 0, p * (np.log(p) - np.log(pd)), 0.0)))
            total += occ[t][i] * kl
    assert E.incoherence(task, pi) == pytest.approx(total, abs=1e-9) if math.isfinite(total) else \
        E.incoherence(task, pi) == math.inf


def _suffix_success(task, pi, t, s, a, idx):
    """P(success | at step t in s, take a, then follow pi), by recursion over successors."""
    q = math.exp(task.action_logq[a])
    return q * sum(pn * _state_success(task, pi, t + 1, n, idx) for n, pn in task.successors(a))


def _state_success(task, pi, t, s, idx):
    if task.terminal[s]:
        return math.exp(task.terminal_logq[s])
    if t == task.horizon:
        return math.exp(task.timeout_logq)
    layer, i = task.layers[t], idx[t][s]
    return sum(float(pi[t][j]) * _suffix_success(task, pi, t, s, int(layer.actions[j]), idx)
               for j in range(layer.start[i], layer.start[i + 1]))


# ---- Theorem 5.9 and Prop 5.4 / 5.5 ---------------------------------------------------------
def random_tree(seed, depth=3, width=2, stochastic=False, dirichlet=False):
    rng = np.random.default_rng(seed)
    states, terms = {}, {}

    def node(name, d):
        if d == depth:
            terms[name] = float(rng.choice([0.0, rng.uniform(0.05, 1.0)], p=[0.2, 0.8]))
            return
        children = [f"{name}.{i}" for i in range(width)]
        pri = rng.dirichlet(np.ones(width)) if dirichlet else np.full(width, 1 / width)
        actions = {}
        for i in range(width):
            nxt = {children[i]: 1.0}
            if stochastic:
                probs = rng.dirichlet(np.ones(width) * 0.5 + np.eye(width)[i] * 2)
                nxt = dict(zip(children, probs))
            actions[f"a{i}"] = _act(nxt, float(rng.uniform(0.5, 1.0)), float(pri[i]))
        states[name] = {"actions": actions}
        for c in children:
            node(c, d + 1)

    node("r", 0)
    return Task.from_spec(_spec(f"tree{seed}", depth, {"r": 1.0}, states, terms))


@pytest.mark.parametrize("seed", range(12))
def test_theorem_5_9_deterministic_uniform(seed):
    task = random_tree(seed, depth=3, width=int(2 + seed % 2))
    K = 5
    retrain, temp, fold, cum = (E.sequence(task, k, K) for k in ("retrain", "temperature", "fold", "cumulative"))
    for k in range(K + 1):
        assert max_diff(retrain[k], temp[k]) < 1e-9
        assert max_diff(retrain[k], fold[k]) < 1e-9
    for k in range(1, K + 1):  # cumulative folding doubles alpha: pi^H_k = pi_{alpha = 2^(k-1)}
        assert max_diff(cum[k], E.temperature_policy(task, 2.0 ** (k - 1))) < 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_theorem_5_9_stochastic_fold_equals_retrain_not_temperature(seed):
    task = random_tree(seed, depth=3, stochastic=True)
    retrain, temp, fold = (E.sequence(task, k, 4) for k in ("retrain", "temperature", "fold"))
    for k in range(5):
        assert max_diff(retrain[k], fold[k]) < 1e-9
    assert max_diff(retrain[1], temp[1]) < 1e-9  # alpha = 1 is G(p) by definition
    assert max(max_diff(retrain[k], temp[k]) for k in (2, 3, 4)) > 1e-4


@pytest.mark.parametrize("seed", range(6))
def test_nonuniform_prior_fold_ratio_is_retrain_literal_fold_is_not(seed):
    task = random_tree(seed, depth=3, dirichlet=True)
    retrain, fold, ratio = (E.sequence(task, k, 4) for k in ("retrain", "fold", "fold_ratio"))
    for k in range(5):
        assert max_diff(retrain[k], ratio[k]) < 1e-9
    assert max_diff(retrain[2], fold[2]) > 1e-4


@pytest.mark.parametrize("seed", range(10))
def test_return_monotone_and_converges_to_optimum(seed):
    task = random_tree(seed, depth=3, stochastic=seed % 2 == 1)
    seq = E.sequence(task, "retrain", 300)
    succ = [E.success(task, pi) for pi in seq]
    rets = [E.expected_return(task, pi) for pi in seq]
    assert all(b >= a - 1e-12 for a, b in zip(rets, rets[1:]))
    assert all(b >= a - 1e-12 for a, b in zip(succ, succ[1:]))
    assert succ[-1] == pytest.approx(E.optimal_success(task), abs=1e-2)


def test_sequences_start_from_any_prior(mountain):
    """G^k of a given policy (e.g. a language model's own), not only of the task's prior."""
    p = [np.array([0.8, 0.2]), np.array([0.3, 0.7, 0.5, 0.5])]
    retrain = E.sequence(mountain, "retrain", 2, prior=p)
    assert retrain[0] is p and np.allclose(retrain[1][0], E.goal_condition(mountain, p)[0])
    # pi_1(up | start) = 0.8 * S(up) / (0.8 * S(up) + 0.2 * S(down)), S(up) = 0.3 (ridge: up w.p. 0.3)
    assert retrain[1][0][0] == pytest.approx(0.8 * 0.3 / (0.8 * 0.3 + 0.2 * 0.75))
    assert E.sequence(mountain, "retrain", 1)[1][0][0] == pytest.approx(2 / 5)


def test_rounding_never_makes_a_kl_negative_or_a_probability_exceed_one():
    """The study once printed kappa(G^256(p)) = -3.17e-55 on habit at delta 0.01, and gym:Taxi-v4 an
    optimal success of 1.0000000000000002: a KL is clipped at 0, a probability kept within [0, 1]."""
    from lmcoh.tasks.library import load_task

    habit = load_task("habit")
    pi = E.sequence(habit, "retrain", 256)[-1]
    assert min(float(kl.min()) for kl in E.incoherence_terms(habit, pi, 0.01)) >= 0.0
    assert E.incoherence(habit, pi, 0.01) >= 0.0
    taxi = load_task("gym:Taxi-v4,horizon=20")
    assert E.optimal_success(taxi) == 1.0 and 0.0 <= E.acceptance_rate(taxi, 2.0) <= 1.0
    assert E.probability(1.0000000000000002) == 1.0 and E.probability(-1e-17) == 0.0
