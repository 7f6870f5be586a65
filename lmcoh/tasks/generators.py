"""Tasks built by code from a spec string, accepted anywhere a task file is.

* ``random-tree:T=6,A=3,seed=0,stochastic=0,prior=uniform`` - a complete A-ary tree of depth T;
* ``gridworld:size=5,slip=0.1,horizon=8,seed=0`` - a grid with a goal, pits and slippery moves;
* ``gym:FrozenLake-v1,is_slippery=1,horizon=10`` - a gymnasium toy-text environment, read from
  its ``P[s][a] = [(prob, next, reward, done)]`` transition table.

Random trees are built straight into the `Task` arrays (no per-state Python objects), so
``random-tree:T=10,A=4,stochastic=1`` (1.4 million states) takes seconds.
"""

from __future__ import annotations

import math
import warnings
from collections import deque

import numpy as np

from ..errors import first_line
from . import budget
from .task import Task, TaskError
from .task import safe_log as _log

GENERATORS = ("random-tree", "gridworld", "gym")
EXAMPLES = (
    "random-tree:T=3,A=2,seed=0,stochastic=0",
    "random-tree:T=6,A=3,seed=0,stochastic=1,prior=dirichlet",
    "gridworld:size=5,slip=0.1,horizon=8,seed=0",
    "gym:FrozenLake-v1,is_slippery=1,horizon=10",
    "gym:CliffWalking-v1,horizon=15",
    "gym:Taxi-v4,horizon=20",
)


def is_spec(ref: str) -> bool:
    """Whether ``ref`` names a generator (``KIND:...``) rather than a file or built-in task."""
    return ref.split(":", 1)[0] in GENERATORS and ":" in ref


def generate(spec: str) -> Task:
    """Build the task a spec string describes; a bad spec is a one-line `TaskError`."""
    kind, _, rest = spec.partition(":")
    if kind == "random-tree":
        return random_tree(**_params(spec, rest, _TREE_PARAMS))
    if kind == "gridworld":
        return gridworld(**_params(spec, rest, _GRID_PARAMS))
    if kind == "gym":
        env_id, _, rest = rest.partition(",")
        if not env_id or "=" in env_id:
            raise TaskError(f"{spec}: expected gym:ENV_ID[,key=value...], e.g. {EXAMPLES[3]}")
        return gym_task(env_id, **_params(spec, rest, None))
    raise TaskError(f"{spec}: unknown generator {kind!r}; choose one of {', '.join(GENERATORS)}")


# ---- spec parsing -----------------------------------------------------------------------------

_TREE_PARAMS = {"T": (int, 6), "A": (int, 3), "seed": (int, 0), "stochastic": (bool, False),
                "prior": (("uniform", "dirichlet"), "uniform")}
_GRID_PARAMS = {"size": (int, 5), "slip": (float, 0.1), "horizon": (int, 8), "seed": (int, 0)}


def _params(spec: str, text: str, schema: dict | None) -> dict:
    """Parse ``k=v,k=v`` against ``schema`` {key: (type or choices, default)}; None = free keys."""
    out = {} if schema is None else {k: default for k, (_, default) in schema.items()}
    given = set()
    for item in text.split(",") if text else ():
        key, eq, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or not key or not raw:
            raise TaskError(f"{spec}: malformed parameter {item!r}; expected key=value")
        if key in given:
            raise TaskError(f"{spec}: parameter {key!r} given twice")
        given.add(key)
        if schema is None:
            out[key] = _auto(raw)
            continue
        if key not in schema:
            raise TaskError(f"{spec}: unknown parameter {key!r}; known: {', '.join(schema)}")
        kind = schema[key][0]
        out[key] = _convert(spec, key, raw, kind)
    return out


def _convert(spec: str, key: str, raw: str, kind):
    if isinstance(kind, tuple):
        if raw not in kind:
            raise TaskError(f"{spec}: {key} must be one of {', '.join(kind)}, got {raw!r}")
        return raw
    try:
        if kind is bool:
            if raw not in ("0", "1", "true", "false"):
                raise ValueError
            return raw in ("1", "true")
        return kind(raw)
    except ValueError:
        what = {int: "an integer", float: "a number", bool: "0 or 1"}[kind]
        raise TaskError(f"{spec}: {key} must be {what}, got {raw!r}") from None


def _auto(raw: str):
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw.lower(), raw)


# ---- random trees ----------------------------------------------------------------------------

def random_tree(T: int = 6, A: int = 3, seed: int = 0, stochastic: bool = False,
                prior: str = "uniform") -> Task:
    """A complete A-ary tree of depth T with random success probabilities.

    Nodes are numbered breadth first (node k's children are ``A*k + 1 .. A*k + A``), named
    ``n<k>``. Action i of a node leads to child i, or with ``stochastic`` to a random
    distribution over the node's children concentrated on child i. Leaves are terminals with
    q ~ U(0, 1), a fifth of them q = 0; a fifth of the actions cost q ~ U(0.5, 1).
    ``prior``: uniform, or Dirichlet(1) per state.
    """
    if T < 1 or A < 1:
        raise TaskError(f"random-tree: need T >= 1 and A >= 1, got T={T}, A={A}")
    n_inner = (A ** T - 1) // (A - 1) if A > 1 else T
    n_leaves = A ** T
    n = n_inner + n_leaves
    n_act = n_inner * A
    budget.check(f"random-tree:T={T},A={A} ({float(n):.3g} states)",
                 budget.task_bytes(n, n_act, n_act * (A if stochastic else 1)))
    rng = np.random.default_rng(seed)

    leaf_q = rng.uniform(0.0, 1.0, n_leaves)
    leaf_q[rng.uniform(size=n_leaves) < 0.2] = 0.0
    act_q = np.where(rng.uniform(size=n_act) < 0.2, rng.uniform(0.5, 1.0, n_act), 1.0)
    if prior == "dirichlet":
        weights = rng.gamma(1.0, size=(n_inner, A))
        prior_p = (weights / weights.sum(axis=1, keepdims=True)).ravel()
    else:
        prior_p = np.full(n_act, 1.0 / A)

    children = np.arange(1, n_act + 1, dtype=np.int64)  # action a = k*A + i leads to child A*k + i + 1
    if stochastic:
        conc = np.full((n_act, A), 0.5)
        conc[np.arange(n_act), np.arange(n_act) % A] = 2.0 * A
        probs = rng.gamma(conc)
        probs /= probs.sum(axis=1, keepdims=True)
        trans_next = np.repeat(children - np.arange(n_act) % A, A) + np.tile(np.arange(A), n_act)
        trans_prob = probs.ravel()
        trans_ptr = np.arange(0, n_act * A + 1, A, dtype=np.int64)
    else:
        trans_next, trans_prob = children, np.ones(n_act)
        trans_ptr = np.arange(n_act + 1, dtype=np.int64)

    terminal = np.zeros(n, dtype=bool)
    terminal[n_inner:] = True
    terminal_logq = np.zeros(n)
    terminal_logq[n_inner:] = _log(leaf_q)
    start = np.zeros(n)
    start[0] = 1.0
    action_ptr = np.concatenate([np.arange(0, n_act + 1, A), np.full(n_leaves, n_act)]).astype(np.int64)
    name = f"random-tree:T={T},A={A},seed={seed},stochastic={int(stochastic)},prior={prior}"
    return Task(
        name=name, horizon=T, state_names=[f"n{k}" for k in range(n)], state_texts=[""] * n,
        terminal=terminal, terminal_logq=terminal_logq, start_prob=start, action_ptr=action_ptr,
        action_names=[f"a{i}" for i in range(A)] * n_inner, action_logq=_log(act_q), prior=prior_p,
        trans_ptr=trans_ptr, trans_next=trans_next, trans_prob=trans_prob,
        description=f"A random {A}-ary tree of depth {T}" + (" with stochastic moves." if stochastic else "."),
        source=name)


# ---- gridworld -----------------------------------------------------------------------------

MOVES = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}
_PERPENDICULAR = {"north": ("east", "west"), "south": ("east", "west"),
                  "east": ("north", "south"), "west": ("north", "south")}


def gridworld(size: int = 5, slip: float = 0.1, horizon: int = 8, seed: int = 0) -> Task:
    """A size x size grid: start top-left, goal (q = 1) bottom-right, seeded pits (q = 0).

    A move goes the intended way with probability 1 - slip and to each perpendicular side with
    slip / 2; moving into the outer wall leaves you in place. Running out of time fails.
    Pits are redrawn (deterministically from the seed) until the goal is reachable within the
    horizon.
    """
    if not 2 <= size <= 20:
        raise TaskError(f"gridworld: size must be in 2..20, got {size}")
    if not 0.0 <= slip <= 1.0:
        raise TaskError(f"gridworld: slip must be in [0, 1], got {slip}")
    if horizon < 1:
        raise TaskError(f"gridworld: horizon must be >= 1, got {horizon}")
    if 2 * (size - 1) > horizon:
        raise TaskError(f"gridworld: the goal is {2 * (size - 1)} moves away; horizon {horizon} is too short")
    cells = [(r, c) for r in range(size) for c in range(size)]
    start, goal = cells[0], cells[-1]
    rng = np.random.default_rng(seed)
    n_pits = max(1, size * size // 8)
    for _ in range(1000):
        picks = rng.choice(len(cells) - 2, size=n_pits, replace=False) + 1
        pits = {cells[i] for i in picks}
        if _shortest_path(size, pits, start, goal) <= horizon:
            break
    else:
        raise TaskError(f"gridworld: found no pit layout with the goal within {horizon} moves")

    def name(cell):
        return f"r{cell[0]}c{cell[1]}"

    def step(cell, move):
        r, c = cell[0] + MOVES[move][0], cell[1] + MOVES[move][1]
        return (r, c) if 0 <= r < size and 0 <= c < size else cell

    states, terminals = {}, {}
    for cell in cells:
        if cell == goal:
            terminals[name(cell)] = {"text": "You reach the goal.", "logq": 0.0}
        elif cell in pits:
            terminals[name(cell)] = {"text": "You fall into a pit.", "logq": -math.inf}
        else:
            actions = {}
            for move in MOVES:
                nxt: dict[str, float] = {}
                outcomes = [(move, 1.0 - slip)] + [(side, slip / 2) for side in _PERPENDICULAR[move]]
                for m, p in outcomes:
                    if p > 0:
                        target = name(step(cell, m))
                        nxt[target] = nxt.get(target, 0.0) + p
                actions[move] = {"next": nxt, "logq": 0.0, "prior": 0.25}
            text = f"You are at row {cell[0]}, column {cell[1]} of a {size} by {size} grid."
            states[name(cell)] = {"text": text, "actions": actions}
    spec = f"gridworld:size={size},slip={slip:g},horizon={horizon},seed={seed}"
    return Task.from_spec({
        "name": spec, "horizon": horizon, "timeout_logq": -math.inf, "start": {name(start): 1.0},
        "states": states, "terminals": terminals,
        "description": f"Reach the far corner of a {size}x{size} grid past {n_pits} pit{'s' * (n_pits > 1)}; moves slip "
                       f"sideways with probability {slip:g}."}, source=spec)


def _shortest_path(size: int, pits: set, start: tuple, goal: tuple) -> float:
    dist = {start: 0}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            return dist[cell]
        for dr, dc in MOVES.values():
            nxt = (cell[0] + dr, cell[1] + dc)
            if 0 <= nxt[0] < size and 0 <= nxt[1] < size and nxt not in pits and nxt not in dist:
                dist[nxt] = dist[cell] + 1
                queue.append(nxt)
    return math.inf


# ---- gymnasium toy-text -------------------------------------------------------------------------

GYM_ACTIONS = {
    "FrozenLake": ("left", "down", "right", "up"),
    "CliffWalking": ("up", "right", "down", "left"),
    "Taxi": ("south", "north", "east", "west", "pickup", "dropoff"),
}
GYM_HORIZON = {"FrozenLake": 10, "CliffWalking": 15, "Taxi": 20}
TAXI_PENALTY_Q = 0.9  # success factor for an illegal pickup or dropoff (reward -10 in Taxi)


def gym_task(env_id: str, horizon: int | None = None, **kwargs) -> Task:
    """A task from a gymnasium toy-text environment's transition table.

    FrozenLake: the goal is a terminal with q = 1, holes terminals with q = 0. CliffWalking:
    stepping off the cliff (reward -100) is a terminal with q = 0, the goal q = 1. Taxi: a
    correct dropoff is a terminal with q = 1, an illegal pickup/dropoff costs q = 0.9. Running
    out of decisions fails. Only states reachable from the start distribution are kept.
    """
    family = env_id.split("-")[0].removeprefix("tabular/")
    family = next((f for f in GYM_ACTIONS if family.startswith(f)), None)
    if family is None:
        raise TaskError(f"gym:{env_id}: unsupported environment; use FrozenLake, CliffWalking or Taxi")
    if kwargs.get("fickle_passenger"):
        raise TaskError(f"gym:{env_id}: fickle_passenger is not in the transition table; leave it off")
    if horizon is None:
        horizon = GYM_HORIZON[family]
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise TaskError(f"gym:{env_id}: horizon must be an integer >= 1, got {horizon!r}")

    import gymnasium

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env = gymnasium.make(env_id, **kwargs).unwrapped
    except (gymnasium.error.Error, ImportError) as err:
        known = sorted(k for k in gymnasium.registry if k.startswith(tuple(GYM_ACTIONS)))
        raise TaskError(f"gym:{env_id}: {first_line(err)} (installed: {', '.join(known)})") from None
    except (TypeError, ValueError) as err:
        raise TaskError(f"gym:{env_id}: bad environment argument: {first_line(err)}") from None
    table, start_p = env.P, np.asarray(env.initial_state_distrib, dtype=float)
    describe = _GYM_TEXT[family](env)

    def outcome(nxt: int, reward: float, done: bool) -> str:
        if family == "CliffWalking" and reward <= -100:
            return "cliff"
        if done:
            return {"FrozenLake": "goal" if reward > 0 else "hole", "CliffWalking": "goal",
                    "Taxi": "delivered"}[family]
        return f"s{nxt}"

    states, seen = {}, set()
    queue = deque(int(s) for s in np.flatnonzero(start_p))
    seen.update(queue)
    while queue:
        s = queue.popleft()
        actions = {}
        for a, name in enumerate(GYM_ACTIONS[family]):
            nxt: dict[str, float] = {}
            penalty = False
            for prob, target, reward, done in table[s][a]:
                if prob <= 0:
                    continue
                key = outcome(int(target), reward, bool(done))
                nxt[key] = nxt.get(key, 0.0) + float(prob)
                penalty |= family == "Taxi" and reward <= -10
                if key.startswith("s") and int(target) not in seen:
                    seen.add(int(target))
                    queue.append(int(target))
            total = math.fsum(nxt.values())
            nxt = {k: p / total for k, p in nxt.items()}
            actions[name] = {"next": nxt, "logq": math.log(TAXI_PENALTY_Q) if penalty else 0.0,
                             "prior": 1.0 / len(GYM_ACTIONS[family])}
        states[f"s{s}"] = {"text": describe(s), "actions": actions}
    ends = {"goal": ("You reach the goal.", 0.0), "hole": ("You fall into a hole.", -math.inf),
            "cliff": ("You fall off the cliff.", -math.inf),
            "delivered": ("The passenger is delivered.", 0.0)}
    used = {k for st in states.values() for act in st["actions"].values() for k in act["next"]}
    terminals = {k: {"text": text, "logq": logq} for k, (text, logq) in ends.items() if k in used}
    args = "".join(f",{k}={v}" for k, v in kwargs.items())
    name = f"gym:{env_id}{args},horizon={horizon}"
    start = {f"s{s}": float(p) for s, p in enumerate(start_p) if p > 0}
    env.close()
    return Task.from_spec({
        "name": name, "horizon": horizon, "timeout_logq": -math.inf, "start": start,
        "states": dict(sorted(states.items(), key=lambda kv: int(kv[0][1:]))), "terminals": terminals,
        "description": f"gymnasium {env_id} ({len(states)} reachable states), success = reaching the goal."},
        source=name)



def _frozen_lake_text(env):
    desc = [b"".join(row).decode() for row in env.desc.tolist()]
    ncol = env.ncol

    def text(s: int) -> str:
        r, c = divmod(s, ncol)
        return f"You are on the ice at row {r}, column {c}. The lake: {'/'.join(desc)}."
    return text


def _cliff_text(env):
    rows, cols = env.shape

    def text(s: int) -> str:
        r, c = divmod(s, cols)
        return f"You are at row {r}, column {c}; the cliff runs along row {rows - 1}."
    return text


def _taxi_text(env):
    places = ("red", "green", "yellow", "blue")

    def text(s: int) -> str:
        row, col, passenger, dest = env.decode(s)
        where = "in the taxi" if passenger == 4 else f"waiting at {places[passenger]}"
        return f"The taxi is at row {row}, column {col}. The passenger is {where} and wants to go to {places[dest]}."
    return text


_GYM_TEXT = {"FrozenLake": _frozen_lake_text, "CliffWalking": _cliff_text, "Taxi": _taxi_text}
