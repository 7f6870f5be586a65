"""Task pictures: a task's decision graph under a policy, the paper's picture of the mountain race.

Two steps, so that a report can put several policies side by side and a test can read a
picture back without looking at pixels:

* `task_graph(task, policy)` lays the graph out as plain data (`TaskGraph`);
* `draw_graph(ax, graph)` draws it with matplotlib and leaves the data on the axes as
  ``ax.lmcoh_graph``. `plot_policies` puts one panel per policy into a PNG or SVG file.

The layout reads left to right in decision steps. Column t holds the states reachable at
step t, keyed like `Task.policy_keys` (``STATE``, or ``STATE@t`` for a state that recurs),
so a recurring state is drawn once per step. Each action is an edge labelled with its name
and pi(a|s) (and its own success probability q where that is below 1), as wide as that
probability. An action with several outcomes goes through a small chance node most of the
way to the next column, whose edges carry tau(s'|s, a); several start states hang off a
chance node left of column 0. Where an episode ends - a terminal, or a state reached after
the last decision - is a node coloured by its success probability q (docs/theory.md,
"Setting").

A task past `MAX_NODES` nodes shows its likeliest episodes under the policy: the ends most
probable first, each with its likeliest way there. Actions that lead out of the picture end
in a short stub, so every drawn state's action labels still sum to 1. The graph says how
many nodes it left out and how probable it is that an episode ends at one of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..oracle import exact, specs
from ..tasks.task import Task
from .plots import pyplot, save

MAX_NODES = 60     # nodes drawn at most, chance nodes included
ROW = 0.5          # vertical distance between neighbouring nodes, in columns
INCHES = 2.0       # inches per column (the axes keep x and y at the same scale)
MAX_WIDTH = 4.0    # line width, in points, of an edge of probability 1
CHANCE_X = 0.6     # how far into the step a chance node stands (room for the action's label)
LABEL_AT = {"action": 0.5, "chance": 0.4}  # where along its edge a label stands
STATE_COLOUR, CHANCE_COLOUR = "#e6ecf5", "#333333"


@dataclass
class Node:
    """A drawn node. ``kind``: ``state`` (a decision), ``end`` (a terminal, or a state reached
    after the last decision) or ``chance``; ``reach``: the probability that an episode under
    the policy passes through it; ``q``: the success probability of an end."""

    key: str
    kind: str
    label: str
    x: float
    y: float
    color: str
    reach: float
    q: float | None = None


@dataclass
class Edge:
    """A drawn edge: an ``action`` edge (``prob`` = pi(a|s)) or a ``chance`` edge (``prob`` =
    the transition or start probability). ``target`` None: it leads out of the picture.
    ``width`` (points) is `MAX_WIDTH` times the probability that an episode takes the edge
    once at its source: pi(a|s) for an action, pi(a|s) tau(s'|s, a) for an outcome, so an
    action's width splits among its outcomes. ``bend`` is matplotlib's arc3 radius (edges
    between the same two nodes bow apart); ``label_at`` lies on the drawn curve."""

    source: str
    target: str | None
    kind: str
    label: str
    prob: float
    width: float
    action: str | None = None
    start: tuple[float, float] = (0.0, 0.0)
    end: tuple[float, float] = (0.0, 0.0)
    bend: float = 0.0
    label_at: tuple[float, float] = (0.0, 0.0)


@dataclass
class TaskGraph:
    title: str
    nodes: list[Node]
    edges: list[Edge]
    total: int              # nodes of the whole graph
    left_out: int = 0       # of them not drawn
    left_out_mass: float = 0.0  # probability that an episode ends at a node not drawn
    node: dict[str, Node] = field(init=False, repr=False)

    def __post_init__(self):
        self.node = {n.key: n for n in self.nodes}

    def out_edges(self, key: str) -> list[Edge]:
        return [e for e in self.edges if e.source == key]

    @property
    def note(self) -> str:
        """What was left out, in words ('' when nothing was)."""
        if not self.left_out:
            return ""
        return (f"{self.total - self.left_out} of {self.total} nodes, the most probable; episodes end "
                f"at one left out with probability {self.left_out_mass:.3g}")


# ---- the whole graph, as arrays per column -----------------------------------------------------
class _Full:
    """Every node of the graph: (column, state) pairs with their reach under the policy.

    Column c < T holds the decision states of layer c; a column c >= 1 also holds the ends
    entered by layer c-1's transitions (terminals, and at c = T every state). Arrays, so a
    million-state tree costs a few vectors; the pruned picture looks nodes up one at a time.
    """

    def __init__(self, task: Task, policy: exact.Policy):
        self.task, self.policy = task, policy
        self.occ = exact.occupancy(task, policy)
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0))
        self.ends: list[tuple[np.ndarray, np.ndarray]] = [empty]     # per column: states, reach
        self.parents: list[tuple[np.ndarray, np.ndarray]] = [empty]  # per column: states, likeliest parent
        for t, layer in enumerate(task.layers):
            flow = layer.by_state.repeat(self.occ[t]) * policy[t]
            into = layer.by_action.repeat(flow) * np.exp(layer.trans_logp)
            ending = task.terminal[layer.trans_next] | (t == task.steps - 1)
            states, where = np.unique(layer.trans_next[ending], return_inverse=True)
            self.ends.append((states, np.bincount(where, weights=into[ending], minlength=len(states))))
            owner = layer.states[layer.seg[layer.by_action.repeat(np.arange(len(layer.actions)))]]
            order = np.lexsort((-into, layer.trans_next))
            target = layer.trans_next[order]
            first = np.concatenate([[True], target[1:] != target[:-1]])
            self.parents.append((target[first], owner[order][first]))
        branching = sum(int(np.count_nonzero(np.diff(layer.trans_start) > 1)) for layer in task.layers)
        self.total = (sum(len(layer.states) for layer in task.layers) + sum(len(s) for s, _ in self.ends)
                      + branching + (len(task.layers[0].states) > 1))
        end_columns = np.bincount(np.concatenate([s for s, _ in self.ends]), minlength=task.n_states)
        self.end_repeats = end_columns > 1
        self.keys = task.policy_keys()

    def is_decision(self, c: int, s: int) -> bool:
        return c < self.task.steps and not self.task.terminal[s]

    def index(self, c: int, s: int) -> int:
        """Where (c, s) stands in its column's decision states or ends."""
        states = self.task.layers[c].states if self.is_decision(c, s) else self.ends[c][0]
        return int(np.searchsorted(states, s))

    def reach(self, c: int, s: int) -> float:
        i = self.index(c, s)
        return float(self.occ[c][i] if self.is_decision(c, s) else self.ends[c][1][i])

    def parent(self, c: int, s: int) -> tuple[int, int] | None:
        """The decision node whose transitions carry the most probability into (c, s)."""
        if c == 0:
            return None
        states, best = self.parents[c]
        return c - 1, int(best[np.searchsorted(states, s)])

    def key(self, c: int, s: int) -> str:
        name = self.task.state_names[s]
        if self.is_decision(c, s):
            return self.keys[c][self.index(c, s)]
        return f"{name}@{c}" if self.end_repeats[s] or not self.task.terminal[s] else name

    def actions(self, c: int, s: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """(action, pi(a|s), successors) of decision node (c, s)."""
        layer = self.task.layers[c]
        i = self.index(c, s)
        return [(int(a), float(p), self.task.successors(int(a)))
                for a, p in zip(layer.actions[layer.start[i]:layer.start[i + 1]],
                                self.policy[c][layer.start[i]:layer.start[i + 1]])]

    def children(self, c: int, s: int) -> list[tuple[int, int]]:
        if not self.is_decision(c, s):
            return []
        return [(c + 1, n) for _, _, succ in self.actions(c, s) for n, _ in succ]

    def roots(self) -> list[tuple[int, int]]:
        return [(0, int(s)) for s in self.task.layers[0].states]

    def nodes(self) -> set[tuple[int, int]]:
        return ({(c, int(s)) for c, layer in enumerate(self.task.layers) for s in layer.states}
                | {(c, int(s)) for c, (states, _) in enumerate(self.ends) for s in states})


def _most_probable(full: _Full, budget: int) -> set[tuple[int, int]]:
    """Every state and end if the whole graph fits in ``budget`` nodes; else the likeliest
    episodes: ends most probable first, each with its likeliest way back to the start, while
    the nodes they need (chance nodes included) fit - the likeliest one always."""
    if full.total <= budget:
        return full.nodes()
    column = np.concatenate([np.full(len(states), c) for c, (states, _) in enumerate(full.ends)])
    states = np.concatenate([states for states, _ in full.ends])
    reach = np.concatenate([mass for _, mass in full.ends])
    kept: set[tuple[int, int]] = set()
    for i in np.argsort(-reach, kind="stable"):
        chain, node = [], (int(column[i]), int(states[i]))
        while node is not None and node not in kept:
            chain.append(node)
            node = full.parent(*node)
        if kept and _size(full, kept | set(chain)) > budget:
            break
        kept.update(chain)
    return kept


def _size(full: _Full, kept: set[tuple[int, int]]) -> int:
    """Nodes drawn for ``kept``: the states and ends, a chance node for each branching action
    with an outcome drawn, and the start's chance node."""
    chance = sum(len(succ) > 1 and any((c + 1, n) in kept for n, _ in succ)
                 for c, s in kept if full.is_decision(c, s) for _, _, succ in full.actions(c, s))
    return len(kept) + chance + (len(full.roots()) > 1)


def _columns(full: _Full, kept: set[tuple[int, int]]) -> list[list[int]]:
    """The kept states of each column, in the order their parents first reach them (so that
    a tree is drawn without crossings)."""
    columns = [[s for c, s in full.roots() if (c, s) in kept]]
    for c in range(full.task.steps):
        order = dict.fromkeys(n for s in columns[c] if full.is_decision(c, s)
                              for _, _, succ in full.actions(c, s) for n, _ in succ if (c + 1, n) in kept)
        columns.append(list(order))
    return columns


# ---- positions ---------------------------------------------------------------------------------
def _spread(want: list[float], gap: float) -> list[float]:
    """Positions top to bottom, at least ``gap`` apart, near ``want`` and with its mean."""
    out: list[float] = []
    for w in want:
        out.append(min(w, out[-1] - gap) if out else w)
    shift = (sum(want) - sum(out)) / len(out) if out else 0.0
    return [y + shift for y in out]


def _heights(full: _Full, columns: list[list[int]]) -> list[dict[int, float]]:
    """y of every kept node: the fullest column evenly spaced, each other column at the mean
    of its neighbours towards the fullest one."""
    ys = [{s: ((len(col) - 1) / 2 - i) * ROW for i, s in enumerate(col)} for col in columns]
    pivot = max(range(len(columns)), key=lambda c: len(columns[c]))

    def near(c: int, s: int, towards: int) -> list[float]:
        if towards > c:
            return [ys[towards][n] for n in dict.fromkeys(n for _, n in full.children(c, s)) if n in ys[towards]]
        return [ys[towards][p] for p in columns[towards]
                if s in {n for _, n in full.children(towards, p)}]

    for c in list(range(pivot - 1, -1, -1)) + list(range(pivot + 1, len(columns))):
        towards = c + 1 if c < pivot else c - 1
        want = [float(np.mean(m)) if (m := near(c, s, towards)) else ys[c][s] for s in columns[c]]
        ys[c] = dict(zip(columns[c], _spread(want, ROW)))
    return ys


# ---- the graph ---------------------------------------------------------------------------------
def _q_colour(q: float) -> str:
    import matplotlib
    from matplotlib.colors import to_hex

    return to_hex(matplotlib.colormaps["RdYlGn"](q))


def task_graph(task: Task, policy: exact.Policy, title: str = "", max_nodes: int = MAX_NODES) -> TaskGraph:
    """The decision graph of ``task`` under ``policy``, laid out (see the module docstring)."""
    full = _Full(task, policy)
    kept = _most_probable(full, max_nodes)
    columns = _columns(full, kept)
    ys = _heights(full, columns)
    nodes: dict[str, Node] = {}
    for c, col in enumerate(columns):
        for s in col:
            key = full.key(c, s)
            if full.is_decision(c, s):
                nodes[key] = Node(key, "state", key, c, ys[c][s], STATE_COLOUR, full.reach(c, s))
                continue
            q = math.exp(task.terminal_logq[s] if task.terminal[s] else task.timeout_logq)
            label = f"{key}\nq = {q:.3g}" if task.terminal[s] else f"{key}\nout of time\nq = {q:.3g}"
            nodes[key] = Node(key, "end", label, c, ys[c][s], _q_colour(q), full.reach(c, s), q)
    edges: list[Edge] = []
    if len(task.layers[0].states) > 1:
        roots = [(full.key(c, s) if (c, s) in kept else None, float(task.start_prob[s])) for c, s in full.roots()]
        _chance(nodes, edges, "<start>", -0.5, float(np.mean(list(ys[0].values()))), roots, 1.0, 1.0)
    for c, col in enumerate(columns[:-1]):
        for s in col:
            if full.is_decision(c, s):
                _actions(full, (c, s), kept, nodes, edges)
    _place_chance(nodes)
    _place_edges(edges, nodes)
    left_out = full.total - len(nodes)
    ended = sum(float(mass.sum()) for _, mass in full.ends) - sum(n.reach for n in nodes.values() if n.kind == "end")
    return TaskGraph(title, list(nodes.values()), edges, full.total, left_out,
                     max(ended, 0.0) if left_out else 0.0)


def _actions(full: _Full, node: tuple[int, int], kept: set, nodes: dict, edges: list) -> None:
    """The action edges of one decision node, through a chance node where an action branches."""
    c, s = node
    key = full.key(c, s)
    here = nodes[key]
    for a, p, succ in full.actions(c, s):
        name = full.task.action_names[a]
        outcomes = [(full.key(c + 1, n) if (c + 1, n) in kept else None, q) for n, q in succ]
        drawn = [nodes[t].y for t, _ in outcomes if t is not None]
        target = outcomes[0][0] if len(succ) == 1 else None
        if len(succ) > 1 and drawn:
            target = f"{key}:{name}"
            _chance(nodes, edges, target, c + CHANCE_X, (here.y + float(np.mean(drawn))) / 2, outcomes,
                    here.reach * p, p)
        q = math.exp(full.task.action_logq[a])
        label = f"{name} {p:.2f}" + (f" (q {q:.3g})" if q < 1 else "")
        edges.append(Edge(key, target, "action", label, p, MAX_WIDTH * p, name))


def _chance(nodes: dict, edges: list, key: str, x: float, y: float,
            outcomes: list[tuple[str | None, float]], reach: float, scale: float) -> None:
    """A chance node and its outcome edges, entered with probability ``scale`` from its source;
    the outcomes left out of the picture share one stub (target None) with their total."""
    nodes[key] = Node(key, "chance", "", x, y, CHANCE_COLOUR, reach)
    left = sum(q for target, q in outcomes if target is None)
    shown = [(target, q) for target, q in outcomes if target is not None] + ([(None, left)] if left else [])
    edges.extend(Edge(key, target, "chance", f"{q:.2f}", q, MAX_WIDTH * scale * q) for target, q in shown)


def _place_chance(nodes: dict[str, Node]) -> None:
    """Chance nodes sharing a half column are pushed apart; everything else stays."""
    halves: dict[float, list[Node]] = {}
    for n in nodes.values():
        if n.kind == "chance":
            halves.setdefault(n.x, []).append(n)
    for group in halves.values():
        group.sort(key=lambda n: -n.y)
        for n, y in zip(group, _spread([n.y for n in group], ROW / 3)):
            n.y = y


def _place_edges(edges: list[Edge], nodes: dict[str, Node]) -> None:
    """Each edge's ends, bend (edges between the same two nodes bow apart) and label point;
    an edge out of the picture is a short stub, fanned out with its source's other edges."""
    pairs: dict[tuple[str, str | None], list[Edge]] = {}
    fans: dict[str, list[Edge]] = {}
    for e in edges:
        pairs.setdefault((e.source, e.target), []).append(e)
        fans.setdefault(e.source, []).append(e)
    for e in edges:
        a = nodes[e.source]
        e.start = (a.x, a.y)
        if e.target is None:
            fan = fans[e.source]
            e.end = (a.x + 0.4, a.y + ((len(fan) - 1) / 2 - fan.index(e)) * ROW / 2)
        else:
            e.end = (nodes[e.target].x, nodes[e.target].y)
            twins = pairs[(e.source, e.target)]
            if len(twins) > 1:
                e.bend = 0.25 * (2 * twins.index(e) / (len(twins) - 1) - 1)
        e.label_at = _on_curve(e, LABEL_AT[e.kind])


def _on_curve(e: Edge, t: float) -> tuple[float, float]:
    """The point a share ``t`` along the edge's curve: matplotlib's arc3 is the quadratic
    Bezier through the control point midpoint + bend * (dy, -dx) (x and y share one scale)."""
    (x0, y0), (x1, y1) = e.start, e.end
    cx, cy = (x0 + x1) / 2 + e.bend * (y1 - y0), (y0 + y1) / 2 - e.bend * (x1 - x0)
    return ((1 - t) ** 2 * x0 + 2 * t * (1 - t) * cx + t ** 2 * x1,
            (1 - t) ** 2 * y0 + 2 * t * (1 - t) * cy + t ** 2 * y1)


# ---- drawing -----------------------------------------------------------------------------------
def draw_graph(ax, graph: TaskGraph) -> None:
    """Draw ``graph`` on ``ax`` and keep it there as ``ax.lmcoh_graph``.

    Nodes are drawn before edges so that each edge is clipped at the boxes it joins; an edge
    of width 0 (never taken) is a dotted hairline, so the action still shows. An end's box
    starts at its point and grows to the right, leaving the step's width to the edges.
    """
    from matplotlib.patches import FancyArrowPatch

    boxes = {}
    for n in graph.nodes:
        chance, end = n.kind == "chance", n.kind == "end"
        text = ax.text(n.x - 0.05 * end, n.y, " " if chance else n.label, ha="left" if end else "center",
                       va="center", fontsize=2 if chance else 7, zorder=3, color=_ink(n.color),
                       bbox={"boxstyle": "circle,pad=0.6" if chance else "round,pad=0.3",
                             "fc": n.color, "ec": "#555555", "lw": 0.6})
        boxes[n.key] = text.get_bbox_patch()
    for e in graph.edges:
        colour = "#23395d" if e.kind == "action" else "#777777"
        ax.add_patch(FancyArrowPatch(
            e.start, e.end, connectionstyle=f"arc3,rad={e.bend}", arrowstyle="-|>", mutation_scale=7,
            patchA=boxes[e.source], patchB=boxes.get(e.target), shrinkA=1, shrinkB=1, zorder=3.5,
            color=colour, lw=e.width if e.width > 0 else 0.5, linestyle="-" if e.width > 0 else ":"))
        ax.text(*e.label_at, e.label, ha="center", va="center", fontsize=6, color=colour, zorder=4,
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85})
        if e.target is None:
            ax.text(e.end[0] + 0.03, e.end[1], "...", ha="left", va="center", fontsize=7, color=colour)
    xs, ys = _extent(graph)
    ax.set_xlim(*xs)
    ax.set_ylim(*ys)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(graph.title + (f"\n{graph.note}" if graph.note else ""), fontsize=9)
    ax.lmcoh_graph = graph


def _ink(fill: str) -> str:
    """Black text on a light fill, white on a dark one."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(fill)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _extent(graph: TaskGraph) -> tuple[tuple[float, float], tuple[float, float]]:
    """The x and y ranges the drawing needs (node boxes, ends' boxes to their right, and stubs)."""
    xs = [n.x + 0.4 * (n.kind == "end") for n in graph.nodes] + [e.end[0] for e in graph.edges]
    ys = [n.y for n in graph.nodes] + [e.label_at[1] for e in graph.edges]
    return (min(xs) - 0.4, max(xs) + 0.4), (min(ys) - ROW / 2, max(ys) + ROW / 2)


def plot_policies(path: str | Path, task: Task, panels: list[tuple[str, exact.Policy]], *, title: str = "",
                  max_nodes: int = MAX_NODES) -> list[TaskGraph]:
    """One file (PNG or SVG, by suffix) with the decision graph under each (title, policy),
    side by side; returns the graphs drawn."""
    graphs = [task_graph(task, policy, name, max_nodes) for name, policy in panels]
    width = max(_extent(g)[0][1] - _extent(g)[0][0] for g in graphs)
    height = max(_extent(g)[1][1] - _extent(g)[1][0] for g in graphs)
    titles = 0.6 + 0.3 * bool(title)  # inches
    fig, axes = pyplot().subplots(1, len(graphs), squeeze=False, dpi=100,
                                  figsize=(width * INCHES * len(graphs), height * INCHES + titles))
    for ax, graph in zip(axes[0], graphs):
        draw_graph(ax, graph)
    if title:
        fig.suptitle(title, fontsize=10)
    save(fig, Path(path))
    return graphs


# ---- which policy ------------------------------------------------------------------------------
def policy_from_spec(task: Task, spec: str) -> tuple[str, exact.Policy]:
    """(a title, the policy) for a policy SPEC (`lmcoh.oracle.specs`); ``model:DIR`` is a language
    model prompted with <success>, tabulated."""
    directory = specs.model_dir(spec)
    if directory is None:
        return specs.exact_policy(task, spec)
    from ..lm.loading import open_for_task  # torch: only for an LM policy
    from ..lm.tabulate import tabulate

    loaded, layout = open_for_task(directory, task)
    return f"LM {directory} prompted with <success>", tabulate(loaded, task, "success", layout=layout).policy
