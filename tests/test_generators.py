"""Generated tasks: sizes, probability tables, determinism, seeds, and the gymnasium mapping."""

import math

import numpy as np
import pytest

from lmcoh.oracle import exact
from lmcoh.tasks.generators import generate
from lmcoh.tasks.task import TaskError


def _check_tables(task):
    """Every action's transitions and every state's prior sum to 1; start sums to 1."""
    np.testing.assert_allclose(np.add.reduceat(task.trans_prob, task.trans_ptr[:-1]), 1.0, atol=1e-12)
    decision = np.flatnonzero(~task.terminal)
    np.testing.assert_allclose(np.add.reduceat(task.prior, task.action_ptr[decision]), 1.0, atol=1e-12)
    assert np.all(np.diff(task.action_ptr)[decision] > 0)
    assert np.all(np.diff(task.action_ptr)[task.terminal] == 0)
    assert math.isclose(task.start_prob.sum(), 1.0)
    assert np.all(task.action_logq <= 0) and np.all(task.terminal_logq <= 0)


def test_random_tree_shape():
    task = generate("random-tree:T=3,A=2,seed=0,stochastic=0")
    assert task.n_states == 15 and task.n_actions == 14 and task.horizon == 3
    assert int(task.terminal.sum()) == 8
    assert [len(layer.states) for layer in task.layers] == [1, 2, 4]
    assert task.deterministic and not task.recurring
    assert task.state_names[0] == "n0" and task.action_names[:2] == ["a0", "a1"]
    assert [task.state_names[n] for n, _ in task.successors(1)] == ["n2"]  # node 0, action a1 -> child 2
    _check_tables(task)


@pytest.mark.parametrize("spec", ["random-tree:T=4,A=3,seed=2,stochastic=1,prior=dirichlet",
                                  "random-tree:T=5,A=2,seed=3,stochastic=1"])
def test_random_tree_stochastic(spec):
    task = generate(spec)
    assert not task.deterministic
    _check_tables(task)
    for a in range(task.n_actions):  # action i goes to the node's children, mostly to child i
        succ = task.successors(a)
        s = int(task.action_state[a])
        A = len(succ)
        assert [n for n, _ in succ] == list(range(A * s + 1, A * s + A + 1))
    mass = [task.successors(a)[a - int(task.action_ptr[task.action_state[a]])][1] for a in range(task.n_actions)]
    assert np.mean(mass) > 0.5


def test_random_tree_rewards_and_seeds():
    a = generate("random-tree:T=5,A=3,seed=7")
    b = generate("random-tree:T=5,A=3,seed=7")
    c = generate("random-tree:T=5,A=3,seed=8")
    np.testing.assert_array_equal(a.terminal_logq, b.terminal_logq)
    np.testing.assert_array_equal(a.action_logq, b.action_logq)
    assert not np.array_equal(a.terminal_logq, c.terminal_logq)
    leaves = a.terminal_logq[a.terminal]
    assert np.any(leaves == -np.inf) and np.any((leaves > -np.inf) & (leaves < 0))
    assert np.any(a.action_logq < 0) and np.any(a.action_logq == 0)
    assert 0 < exact.optimal_success(a) <= 1
    d = generate("random-tree:T=3,A=3,seed=1,prior=dirichlet")
    assert not np.allclose(d.prior, 1 / 3)
    _check_tables(d)


def test_random_tree_large_is_array_built():
    task = generate("random-tree:T=10,A=4,seed=0,stochastic=1")
    assert task.n_states == (4 ** 11 - 1) // 3 == 1_398_101
    assert len(task.trans_prob) == 4 * task.n_actions


def test_gridworld():
    task = generate("gridworld:size=5,slip=0.1,horizon=8,seed=0")
    assert task.n_states == 25 and task.horizon == 8 and not task.deterministic and task.recurring
    _check_tables(task)
    assert task.terminal_logq[task.state_index["r4c4"]] == 0.0 and task.terminal[task.state_index["r4c4"]]
    pits = [n for s, n in enumerate(task.state_names) if task.terminal[s] and task.terminal_logq[s] == -np.inf]
    assert len(pits) == 3 and "r0c0" not in pits
    corner = task.state_index["r0c0"]
    north = next(a for a in task.actions_of(corner) if task.action_names[a] == "north")
    # intended north hits the wall (stay), slipping west stays too, slipping east moves
    assert dict((task.state_names[n], p) for n, p in task.successors(north)) == pytest.approx(
        {"r0c0": 0.95, "r0c1": 0.05})
    assert exact.optimal_success(task) > 0.5
    assert generate("gridworld:size=5,slip=0.1,horizon=8,seed=0").state_names == task.state_names


def test_gridworld_without_slip_is_deterministic():
    task = generate("gridworld:size=4,slip=0,horizon=6,seed=1")
    assert task.deterministic
    assert exact.optimal_success(task) == 1.0


def test_frozen_lake():
    slippery = generate("gym:FrozenLake-v1,is_slippery=1,horizon=10")
    assert not slippery.deterministic
    _check_tables(slippery)
    assert slippery.action_names[:4] == ["left", "down", "right", "up"]
    assert {slippery.state_names[s] for s in np.flatnonzero(slippery.terminal)} == {"goal", "hole"}
    assert 0 < exact.optimal_success(slippery) < 1
    plain = generate("gym:FrozenLake-v1,is_slippery=0,horizon=6")
    assert plain.deterministic and exact.optimal_success(plain) == 1.0
    assert exact.optimal_success(generate("gym:FrozenLake-v1,is_slippery=0,horizon=5")) == 0.0


def test_cliff_walking_needs_thirteen_moves():
    task = generate("gym:CliffWalking-v1,horizon=13")
    assert task.deterministic and task.action_names[:4] == ["up", "right", "down", "left"]
    assert exact.optimal_success(task) == 1.0
    assert exact.optimal_success(generate("gym:CliffWalking-v1,horizon=12")) == 0.0
    start = task.state_index["s36"]
    right = task.actions_of(start)[1]
    assert task.state_names[task.successors(right)[0][0]] == "cliff"


def test_taxi():
    task = generate("gym:Taxi-v4,horizon=4")
    assert (~task.terminal).sum() == 400  # passenger not yet at the destination
    _check_tables(task)
    penalised = {task.action_names[a] for a in np.flatnonzero(task.action_logq < 0)}
    assert penalised == {"pickup", "dropoff"}
    assert np.allclose(task.action_logq[task.action_logq < 0], math.log(0.9))


@pytest.mark.parametrize("spec,message", [
    ("maze:size=3", "unknown generator 'maze'"),
    ("random-tree:T=3,B=2", "unknown parameter 'B'"),
    ("random-tree:T=x", "T must be an integer"),
    ("random-tree:T=3,,A=2", "malformed parameter"),
    ("random-tree:T=3,", "malformed parameter"),
    ("random-tree:T", "malformed parameter"),
    ("random-tree:T=3,T=4", "given twice"),
    ("random-tree:stochastic=2", "0 or 1"),
    ("random-tree:prior=flat", "uniform, dirichlet"),
    ("random-tree:T=0", "need T >= 1 and A >= 1, got T=0"),
    ("gridworld:slip=1.5", "slip"),
    ("gridworld:size=5,horizon=3", "too short"),
    ("gym:", "expected gym:ENV_ID"),
    ("gym:Blackjack-v1", "unsupported environment"),
    ("gym:FrozenLake-v9", "FrozenLake-v1"),
    ("gym:FrozenLake-v1,colour=red", "bad environment argument"),
    ("gym:FrozenLake-v1,horizon=0", "horizon"),
])
def test_bad_specs(spec, message):
    with pytest.raises(TaskError) as info:
        generate(spec)
    assert message in str(info.value) and "\n" not in str(info.value)
