"""The `Task`: a finite-horizon MDP with success probabilities, stored as flat arrays.

Layout (CSR style, so a 1.4-million-state tree costs a few arrays, not a million dicts):

* states ``0..S-1``; ``terminal[s]`` marks absorbing states carrying ``terminal_logq[s]``;
* the actions of state ``s`` are ``action_ptr[s]:action_ptr[s+1]`` in the flat action arrays
  (terminals have none). Action ``a`` belongs to ``action_state[a]``, is written
  ``action_names[a]``, earns ``action_logq[a] = log q(s, a) <= 0`` and has prior ``prior[a]``;
* the transitions of action ``a`` are ``trans_ptr[a]:trans_ptr[a+1]`` in ``trans_next`` /
  ``trans_prob`` (zero-probability transitions are dropped).

An episode starts in ``s ~ start``, takes at most ``horizon`` decisions and ends when it
enters a terminal (success ``q(terminal)``) or runs out of decisions (``timeout_logq``).
P(success | trajectory) = product of all q met on the way (docs/theory.md, "Setting").

Because a state may recur at several decision steps, everything that depends on time is
indexed by (step, state); `layers` lists which non-terminal states are reachable at each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..errors import TaskError
from .segments import Segments

__all__ = ["Layer", "Task", "TaskError", "safe_log"]


@dataclass(frozen=True, eq=False)
class Layer:
    """The reachable non-terminal states at one decision step and their actions, flattened.

    ``states[i]`` owns the actions ``actions[start[i]:start[i+1]]``; ``seg[j]`` is the index
    in ``states`` of the state owning ``actions[j]``. The transitions of ``actions[j]`` are
    ``trans[trans_start[j]:trans_start[j+1]]`` (indices into the task's transition arrays).
    """

    states: np.ndarray
    actions: np.ndarray
    start: np.ndarray
    seg: np.ndarray
    trans: np.ndarray
    trans_start: np.ndarray
    trans_next: np.ndarray
    trans_logp: np.ndarray

    @cached_property
    def by_state(self) -> Segments:
        """The actions grouped by owning state."""
        return Segments(np.diff(self.start))

    @cached_property
    def by_action(self) -> Segments:
        """The transitions grouped by action."""
        return Segments(np.diff(self.trans_start))


@dataclass(frozen=True, eq=False)
class Task:
    name: str
    horizon: int
    state_names: list[str]
    state_texts: list[str]
    terminal: np.ndarray
    terminal_logq: np.ndarray
    start_prob: np.ndarray
    action_ptr: np.ndarray
    action_names: list[str]
    action_logq: np.ndarray
    prior: np.ndarray
    trans_ptr: np.ndarray
    trans_next: np.ndarray
    trans_prob: np.ndarray
    timeout_logq: float = -np.inf
    description: str = ""
    source: str = ""
    extra: dict = field(default_factory=dict)

    # ---- sizes and lookups -------------------------------------------------------------
    @property
    def n_states(self) -> int:
        return len(self.terminal)

    @property
    def n_actions(self) -> int:
        return len(self.action_logq)

    @cached_property
    def action_state(self) -> np.ndarray:
        counts = np.diff(self.action_ptr)
        return np.repeat(np.arange(self.n_states), counts)

    @cached_property
    def state_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.state_names)}

    def actions_of(self, s: int) -> range:
        return range(int(self.action_ptr[s]), int(self.action_ptr[s + 1]))

    def successors(self, a: int) -> list[tuple[int, float]]:
        lo, hi = self.trans_ptr[a], self.trans_ptr[a + 1]
        return [(int(n), float(p)) for n, p in zip(self.trans_next[lo:hi], self.trans_prob[lo:hi])]

    @cached_property
    def deterministic(self) -> bool:
        """Whether the dynamics are deterministic: every action leads to one next state. The start
        may still be random (`random_start`): Theorem 5.9 and the claims built on it are about the
        moves, which a random start leaves deterministic (each start state's episodes are reweighted
        on their own, and policies are per state)."""
        return bool(np.all(np.diff(self.trans_ptr) == 1))

    @cached_property
    def random_start(self) -> bool:
        """Whether episodes start in more than one state."""
        return bool(np.count_nonzero(self.start_prob) > 1)

    @cached_property
    def uniform_prior(self) -> bool:
        """Whether the prior is uniform over each state's actions."""
        counts = np.diff(self.action_ptr)
        return bool(np.allclose(self.prior, 1.0 / np.repeat(counts, counts), atol=1e-12))

    # ---- reachability by step ------------------------------------------------------------
    @cached_property
    def layers(self) -> list[Layer]:
        """Reachable non-terminal states at decision steps 0, 1, ... (from the start distribution),
        until every episode has ended or the horizon is reached: a horizon longer than any
        path costs nothing.

        Built under the memory limit (lmcoh.tasks.budget): the layers' size is counted as they
        are built, and once the reachable set repeats (states recurring in a cycle) the rest of
        the horizon is projected, so a huge horizon over a cycle is refused at once.
        """
        from . import budget

        limit, used, sizes = budget.limit_bytes(), 0.0, []
        seen: dict[bytes, int] | None = {}  # small reachable sets -> the step they were first seen
        layers = []
        alive = np.flatnonzero((self.start_prob > 0) & ~self.terminal)
        while len(layers) < self.horizon and (not layers or len(alive)):
            if seen is not None and len(alive) <= 4096:
                key = alive.tobytes()
                if key in seen:  # the layers repeat from here: project the rest of the horizon once
                    cycle = sizes[seen[key]:]
                    projected = used + sum(cycle) * (self.horizon - len(layers)) / len(cycle)
                    budget.check(f"task {self.name!r} over its horizon of {self.horizon} steps", projected)
                    seen = None
                else:
                    seen[key] = len(layers)
            layer = self._layer(alive)
            size = budget.LAYER_OVERHEAD + budget.LAYER_BYTES * (len(layer.states) + len(layer.actions)
                                                                 + len(layer.trans))
            used += size
            sizes.append(size)
            if used > limit:
                budget.check(f"task {self.name!r} after {len(layers) + 1} of its {self.horizon} steps", used)
            layers.append(layer)
            nxt = np.unique(self.trans_next[layer.trans])
            alive = nxt[~self.terminal[nxt]]
        return layers

    @property
    def steps(self) -> int:
        """Decision steps that some episode can reach: ``len(layers)`` (at most the horizon)."""
        return len(self.layers)

    def _layer(self, states: np.ndarray) -> Layer:
        states = np.asarray(states, dtype=np.int64)
        lo, hi = self.action_ptr[states], self.action_ptr[states + 1]
        counts = hi - lo
        actions = _ranges(lo, hi)
        tlo, thi = self.trans_ptr[actions], self.trans_ptr[actions + 1]
        trans = _ranges(tlo, thi)
        return Layer(states, actions, _offsets(counts), np.repeat(np.arange(len(states)), counts),
                     trans, _offsets(thi - tlo), self.trans_next[trans], safe_log(self.trans_prob[trans]))

    @cached_property
    def oracle_cache(self) -> dict:
        """Scratch space for the exact oracle's policy-independent intermediate arrays."""
        return {}

    @cached_property
    def recurring(self) -> bool:
        """True when some state is reachable at more than one decision step."""
        seen = np.concatenate([layer.states for layer in self.layers])
        return len(seen) != len(np.unique(seen))

    def policy_keys(self) -> list[list[str]]:
        """The display key of every (step, reachable state): ``STATE``, or ``STATE@t`` if it recurs."""
        count = np.zeros(self.n_states, dtype=np.int64)
        for layer in self.layers:
            count[layer.states] += 1
        return [[self.state_names[s] if count[s] == 1 else f"{self.state_names[s]}@{t}"
                 for s in layer.states] for t, layer in enumerate(self.layers)]

    # ---- construction from a validated, normalised spec ------------------------------------
    @classmethod
    def from_spec(cls, spec: dict, source: str = "") -> "Task":
        """Build from the normalised dict form (see `lmcoh.taskfile.parse`).

        ``spec = {name, description, horizon, timeout_logq, start: {state: prob},
        states: {name: {text, actions: {action: {next: {state: prob}, logq, prior}}}},
        terminals: {name: {text, logq}}}``
        """
        names = list(spec["states"]) + list(spec["terminals"])
        index = {n: i for i, n in enumerate(names)}
        n_dec = len(spec["states"])
        texts, action_ptr, action_names, logq, prior = [], [0], [], [], []
        trans_ptr, trans_next, trans_prob = [0], [], []
        for sname, st in spec["states"].items():
            texts.append(st.get("text", ""))
            for aname, act in st["actions"].items():
                action_names.append(aname)
                logq.append(act["logq"])
                prior.append(act["prior"])
                for nxt, p in act["next"].items():
                    if p > 0:
                        trans_next.append(index[nxt])
                        trans_prob.append(p)
                trans_ptr.append(len(trans_next))
            action_ptr.append(len(action_names))
        for tname, term in spec["terminals"].items():
            texts.append(term.get("text", ""))
            action_ptr.append(len(action_names))
        terminal = np.zeros(len(names), dtype=bool)
        terminal[n_dec:] = True
        terminal_logq = np.zeros(len(names))
        terminal_logq[n_dec:] = [t["logq"] for t in spec["terminals"].values()]
        start_prob = np.zeros(len(names))
        for s, p in spec["start"].items():
            start_prob[index[s]] = p
        return cls(
            name=spec["name"], horizon=int(spec["horizon"]), state_names=names, state_texts=texts,
            terminal=terminal, terminal_logq=terminal_logq, start_prob=start_prob,
            action_ptr=np.asarray(action_ptr, dtype=np.int64), action_names=action_names,
            action_logq=np.asarray(logq, dtype=float), prior=np.asarray(prior, dtype=float),
            trans_ptr=np.asarray(trans_ptr, dtype=np.int64),
            trans_next=np.asarray(trans_next, dtype=np.int64),
            trans_prob=np.asarray(trans_prob, dtype=float),
            timeout_logq=float(spec.get("timeout_logq", -np.inf)),
            description=spec.get("description", ""), source=source,
        )

    def to_spec(self) -> dict:
        """The normalised dict form; `Task.from_spec(task.to_spec())` rebuilds an equal task."""
        states, terminals = {}, {}
        for s, name in enumerate(self.state_names):
            if self.terminal[s]:
                terminals[name] = {"text": self.state_texts[s], "logq": float(self.terminal_logq[s])}
                continue
            actions = {}
            for a in self.actions_of(s):
                actions[self.action_names[a]] = {
                    "next": {self.state_names[n]: p for n, p in self.successors(a)},
                    "logq": float(self.action_logq[a]), "prior": float(self.prior[a])}
            states[name] = {"text": self.state_texts[s], "actions": actions}
        start = {self.state_names[s]: float(self.start_prob[s]) for s in np.flatnonzero(self.start_prob)}
        return {"name": self.name, "description": self.description, "horizon": self.horizon,
                "timeout_logq": self.timeout_logq, "start": start, "states": states,
                "terminals": terminals}


def safe_log(x: np.ndarray) -> np.ndarray:
    """log with log 0 = -inf and no warning (success probabilities of 0 are ordinary here)."""
    with np.errstate(divide="ignore"):
        return np.log(x)


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(lo[i], hi[i])`` for all i, vectorised."""
    counts = hi - lo
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return np.arange(total, dtype=np.int64) + offsets
