"""Task pictures: the graph's structure, probabilities read back from the drawn figure, pruning,
policy specs and `lmcoh show --plot`."""

import os
import re
import subprocess
import sys
from collections import defaultdict

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_hex

from conftest import ROOT, tiny_llama
from lmcoh import cli
from lmcoh.errors import LmcohError
from lmcoh.oracle import exact
from lmcoh.report.plots import pyplot
from lmcoh.report.taskgraph import (MAX_NODES, MAX_WIDTH, draw_graph, plot_policies, policy_from_spec,
                                    task_graph)
from lmcoh.tasks.library import load_task


def action_probs(graph) -> dict[str, dict[str, float]]:
    """{state key: {action: probability}} as the graph's action edges carry them."""
    table = defaultdict(dict)
    for e in graph.edges:
        if e.kind == "action":
            table[e.source][e.action] = e.prob
    return dict(table)


# ---- structure ---------------------------------------------------------------------------------
def test_mountain_race_is_the_papers_picture(mountain):
    graph = task_graph(mountain, exact.sequence(mountain, "retrain", 1)[1], "G(p)")
    kinds = {n.key: (n.kind, n.x) for n in graph.nodes}
    assert kinds == {"start": ("state", 0), "ridge": ("state", 1), "forest": ("state", 1),
                     "gold": ("end", 2), "chasm": ("end", 2), "silver": ("end", 2)}
    assert graph.total == 6 and graph.left_out == 0 and graph.note == ""
    assert {e.label for e in graph.out_edges("start")} == {"up 0.40", "down 0.60"}
    assert action_probs(graph)["start"]["up"] == pytest.approx(2 / 5, abs=1e-12)
    ends = {n.key: n for n in graph.nodes if n.kind == "end"}
    assert [ends[k].q for k in ("gold", "silver", "chasm")] == pytest.approx([1, 0.75, 0])
    assert all(n.color == to_hex(matplotlib.colormaps["RdYlGn"](n.q)) for n in ends.values())
    forest = graph.out_edges("forest")  # both actions lead to silver: the two edges bow apart
    assert [e.target for e in forest] == ["silver", "silver"] and forest[0].bend == -forest[1].bend != 0
    assert forest[0].label_at != forest[1].label_at


def test_coherent_policy_and_edge_widths(mountain):
    title, pi = policy_from_spec(mountain, "boltzmann")
    graph = task_graph(mountain, pi, title)
    start = {e.action: e for e in graph.out_edges("start")}
    assert start["up"].prob == pytest.approx(4 / 7) and start["down"].prob == pytest.approx(3 / 7)
    assert all(e.width == pytest.approx(MAX_WIDTH * e.prob) for e in graph.edges)
    assert {n.key: n.reach for n in graph.nodes}["gold"] == pytest.approx(4 / 7)


def test_a_recurring_state_is_drawn_once_per_step(ring):
    graph = task_graph(ring, exact.prior_policy(ring))
    states = [n.key for n in graph.nodes if n.kind == "state"]
    assert sorted(states) == sorted(k for keys in ring.policy_keys() for k in keys)
    assert {"left@0", "left@1", "left@2", "right@0", "right@1", "right@2"} <= set(states)
    node = graph.node
    assert [node[f"left@{t}"].x for t in range(3)] == [0, 1, 2]
    start = graph.out_edges("<start>")  # two start states hang off a chance node
    assert node["<start>"].kind == "chance"
    assert {(e.target, e.prob) for e in start} == {("left@0", 0.7), ("right@0", 0.3)}
    out_of_time = [n for n in graph.nodes if n.kind == "end" and "out of time" in n.label]
    assert {n.key for n in out_of_time} == {"left@3", "right@3"} and all(n.q == pytest.approx(0.4) for n in out_of_time)
    assert {n.key for n in graph.nodes if n.kind == "end" and n.q == 1.0} == {"exit@1", "exit@2", "exit@3"}


# ---- a held-out task with multi-word actions and stochastic moves, drawn and read back -----------
def test_trie_probabilities_read_back_from_the_drawn_figure(trie_task, tmp_path):
    pi = exact.sequence(trie_task, "retrain", 2)[2]
    path = tmp_path / "trie.svg"
    plot_policies(path, trie_task, [("G^2(p)", pi)])
    fig, ax = pyplot().subplots()
    draw_graph(ax, task_graph(trie_task, pi, "G^2(p)"))
    graph = ax.lmcoh_graph
    # every edge is drawn once, as wide as its data says, with its label
    arrows = [p for p in ax.patches if type(p).__name__ == "FancyArrowPatch"]
    assert len(arrows) == len(graph.edges)
    assert [a.get_linewidth() for a in arrows] == [e.width if e.width > 0 else 0.5 for e in graph.edges]
    texts = [t.get_text() for t in ax.texts]
    pyplot().close(fig)
    assert all(e.label in texts for e in graph.edges)
    # each state's action labels sum to 1 and equal the policy's values
    table = exact.policy_table(trie_task, pi)
    labels = defaultdict(list)
    for e in graph.edges:
        if e.kind == "action":
            name, number = re.fullmatch(r"(.+) (\d\.\d\d)( \(q 0\.\d+\))?", e.label).groups()[:2]
            assert name == e.action
            labels[e.source].append(float(number))
    assert set(labels) == set(table) == {"base", "ridge", "low"}
    for key, probs in action_probs(graph).items():
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
        assert probs == pytest.approx(table[key], abs=1e-12)
        assert sum(labels[key]) == pytest.approx(1.0, abs=0.005 * len(labels[key]))
    assert "climb the ridge" in action_probs(graph)["ridge"] and "climb the wall" in action_probs(graph)["ridge"]
    rest = next(e for e in graph.out_edges("base") if e.action == "rest")  # an action's own q shows
    assert rest.label.endswith(" (q 0.6)")
    # the stochastic move branches through a chance node carrying tau
    wall = next(e for e in graph.out_edges("ridge") if e.action == "climb the wall")
    assert graph.node[wall.target].kind == "chance"
    outcomes = {e.target: e for e in graph.out_edges(wall.target)}
    assert {t: e.prob for t, e in outcomes.items()} == {"top": 0.5, "fall": 0.5}
    assert outcomes["top"].width == pytest.approx(MAX_WIDTH * wall.prob * 0.5)
    # the written SVG keeps its labels as text
    svg = path.read_text()
    assert all(e.label in svg for e in graph.edges if e.kind == "action")
    assert path.stat().st_size < 200_000


# ---- big tasks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["random-tree:T=6,A=3,seed=0", "random-tree:T=4,A=3,seed=1,stochastic=1",
                                  "slippery_grid"])
def test_big_tasks_show_their_likeliest_episodes_and_say_what_is_left_out(spec):
    task = load_task(spec)
    pi = exact.sequence(task, "retrain", 2)[2]
    graph = task_graph(task, pi)
    assert len(graph.nodes) <= MAX_NODES and graph.left_out == graph.total - len(graph.nodes) > 0
    ends = sum(n.reach for n in graph.nodes if n.kind == "end")
    assert 0 < ends and graph.left_out_mass == pytest.approx(1 - ends, abs=1e-9)
    assert f"{len(graph.nodes)} of {graph.total} nodes" in graph.note
    for key, probs in action_probs(graph).items():  # stubs keep every state's labels summing to 1
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
    for n in graph.nodes:
        if n.kind == "chance":
            assert sum(e.prob for e in graph.out_edges(n.key)) == pytest.approx(1.0, abs=1e-9)
        elif n.x > 0:  # connected: everything but the start hangs off a drawn edge
            assert any(e.target == n.key for e in graph.edges)
    assert any(e.target is None for e in graph.edges)


def test_the_likeliest_episode_is_drawn_whole():
    task = load_task("random-tree:T=6,A=3,seed=0")
    pi = exact.sequence(task, "retrain", 4)[4]
    whole = task_graph(task, pi, max_nodes=10 ** 6)
    assert whole.left_out == 0 and len(whole.nodes) == whole.total == 1093
    best = max((n for n in whole.nodes if n.kind == "end"), key=lambda n: n.reach)
    graph = task_graph(task, pi)
    key, path = best.key, []
    while key != "n0":  # back to the start along drawn edges
        key = next(e.source for e in graph.edges if e.target == key)
        path.append(key)
    assert graph.node[best.key].reach == pytest.approx(best.reach) and len(path) == task.horizon


# ---- policy specs --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ("p", lambda t: exact.prior_policy(t)),
    ("retrain:3", lambda t: exact.sequence(t, "retrain", 3)[3]),
    ("temperature:2.5", lambda t: exact.temperature_policy(t, 2.5)),
    ("fold:2", lambda t: exact.sequence(t, "fold", 2)[2]),
    ("fold_ratio:2", lambda t: exact.sequence(t, "fold_ratio", 2)[2]),
    ("cumulative:2", lambda t: exact.sequence(t, "cumulative", 2)[2]),
    ("boltzmann", lambda t: exact.boltzmann_iteration(t)[-1])])
def test_policy_specs(spec, expected):
    task = load_task("habit")
    _, pi = policy_from_spec(task, spec)
    assert all(np.allclose(a, b) for a, b in zip(pi, expected(task)))


@pytest.mark.parametrize("spec", ["retrain:x", "retrain:-1", "temperature:inf", "unknown:1", "p:1", "model:",
                                  "boltzmann:2", ""])
def test_bad_specs_raise_one_line(mountain, spec):
    with pytest.raises(LmcohError) as err:
        policy_from_spec(mountain, spec)
    assert "\n" not in str(err.value) and repr(spec) in str(err.value)


def test_model_spec_tabulates_the_lm(mountain, tmp_path):
    from lmcoh.lm.loading import save_model
    from lmcoh.lm.tabulate import tabulate

    lm = tiny_llama(mountain, seed=3)
    save_model(lm.model, lm.tokenizer, tmp_path / "model", {})
    title, pi = policy_from_spec(mountain, f"model:{tmp_path / 'model'}")
    want = tabulate(lm, mountain, "success").policy
    assert "<success>" in title and all(np.allclose(a, b, atol=1e-5) for a, b in zip(pi, want))
    assert cli.main(["show", "mountain_race", "--plot", str(tmp_path / "lm.png"),
                     "--policy", f"model:{tmp_path / 'model'}"]) == 0
    assert (tmp_path / "lm.png").stat().st_size > 1000


# ---- the command line ------------------------------------------------------------------------------
def test_show_plot_writes_the_picture(tmp_path, capsys):
    path = tmp_path / "race.svg"
    assert cli.main(["show", "mountain_race", "--plot", str(path), "--policy", "retrain:1"]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: mountain_race under retrain:1 (G(p)), 6 nodes"
    svg = path.read_text()
    assert "up 0.40" in svg and "down 0.60" in svg and svg.lstrip().startswith("<?xml")
    assert [p.name for p in tmp_path.iterdir()] == ["race.svg"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600
    assert cli.main(["show", "random-tree:T=6,A=3,seed=0", "--plot", str(tmp_path / "tree.png")]) == 0
    out = capsys.readouterr().out
    assert "1093 nodes, the most probable; episodes end at one left out with probability" in out
    assert (tmp_path / "tree.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--plot", "{tmp}/x.svg", "--policy", "retrain:x"], "policy 'retrain:x': 'x' is not a whole number >= 0"),
    (["--plot", "{tmp}/x.svg", "--policy", "unknown:1"], "policy 'unknown:1': choose one of p, retrain:K"),
    (["--plot", "{tmp}/x.svg", "--policy", "model:{tmp}/missing"], "missing: no such model directory"),
    (["--plot", "{tmp}/x.pdf"], "x.pdf: the picture must be a .png or .svg file"),
    (["--plot", "{tmp}/nowhere/x.png"], "no such directory"),
    (["--policy", "p"], "--policy chooses the policy of the picture: give --plot FILE too")])
def test_show_plot_errors_are_one_line(tmp_path, capsys, args, message):
    argv = ["show", "mountain_race"] + [a.format(tmp=tmp_path) for a in args]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and message in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_show_plot_imports_no_torch(tmp_path):
    code = ("import sys, io, contextlib; from lmcoh.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    main(['show', 'lottery', '--plot', {str(tmp_path / 'x.png')!r}, '--policy', 'boltzmann'])\n"
            "sys.exit('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x.png").is_file()
