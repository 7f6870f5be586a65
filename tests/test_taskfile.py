"""Task files: strict validation (through the real CLI) and YAML round trips."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmcoh import cli
from lmcoh.oracle import exact
from lmcoh.tasks import library, taskfile
from lmcoh.tasks.task import Task, TaskError

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
horizon: 2
start: start
states:
  start:
    actions:
      up: {next: gold}
      down: {next: gold, success: 0.5}
terminals:
  gold: {}
"""


def _edit(old, new):
    assert old in GOOD
    return GOOD.replace(old, new)


def _task(states, extra=""):
    return f"horizon: 2\nstart: start\n{extra}states:\n{states}"


BAD = {  # file name -> (contents, a piece of the expected message)
    "typo_top": (_edit("horizon: 2", "horizn: 2"), "did you mean 'horizon'"),
    "typo_action": (_edit("success: 0.5", "succes: 0.5"), "did you mean 'success'"),
    "missing_horizon": (_edit("horizon: 2\n", ""), "missing key 'horizon'"),
    "missing_next": (_edit("{next: gold}", "{success: 1.0}"), "missing key 'next'"),
    "q_above_one": (_edit("success: 0.5", "success: 1.5"), "down.success"),
    "q_negative": (_edit("success: 0.5", "success: -0.1"), "down.success"),
    "reward_positive": (_edit("success: 0.5", "reward: 0.5"), "must be <= 0"),
    "reward_nan": (_edit("success: 0.5", "reward: .nan"), "NaN"),
    "success_and_reward": (_edit("success: 0.5", "success: 0.5, reward: -1.0"), "not both"),
    "bool_success": (_edit("success: 0.5", "success: true"), "boolean"),
    "string_success": (_edit("success: 0.5", 'success: "0.5"'), "expected a number"),
    "unknown_next": (_edit("{next: gold}", "{next: gld}"), "did you mean 'gold'"),
    "unknown_start": (_edit("start: start", "start: nowhere"), "unknown state 'nowhere'"),
    "terminal_start": (_edit("start: start", "start: gold"), "is a terminal"),
    "sum_below_one": (_edit("{next: gold}", "{next: {gold: 0.5, start: 0.4}}"), "sum to 0.9"),
    "prob_out_of_range": (_edit("{next: gold}", "{next: {gold: 1.5, start: -0.5}}"), "[0, 1]"),
    "start_sum": (_edit("start: start", "start: {start: 0.5}"), "sum to 0.5"),
    "horizon_zero": (_edit("horizon: 2", "horizon: 0"), "horizon"),
    "horizon_float": (_edit("horizon: 2", "horizon: 2.5"), "integer"),
    "horizon_bool": (_edit("horizon: 2", "horizon: true"), "boolean"),
    "timeout_range": (_edit("horizon: 2", "horizon: 2\ntimeout_success: 2"), "timeout_success"),
    "no_actions": (_task("  start:\n    actions: {}\n"), "at least one action"),
    "null_actions": (_task("  start:\n    actions:\n"), "at least one action"),
    "state_not_mapping": (_task("  start: [up, down]\n"), "expected a mapping"),
    "no_states": ("horizon: 2\nstart: start\nstates: {}\n", "no states"),
    "state_and_terminal": (_task("  start:\n    actions:\n      up: {next: start}\n")
                           + "terminals:\n  start: {}\n", "both as a state and a terminal"),
    "duplicate_key": (_task("  start:\n    actions:\n      up: {next: start}\n      up: {next: start}\n"),
                      "duplicate key 'up'"),
    "prior_unknown_action": (_task("  start:\n    actions:\n      up: {next: start}\n",
                                   "prior: {start: {up: 0.5, left: 0.5}}\n"), "unknown action 'left'"),
    "prior_sum": (_task("  start:\n    actions:\n      up: {next: start}\n      down: {next: start}\n",
                        "prior: {start: {up: 0.5}}\n"), "sum to 0.5"),
    "prior_unknown_state": (_task("  start:\n    actions:\n      up: {next: start}\n",
                                  "prior: {moon: {up: 1.0}}\n"), "unknown state 'moon'"),
    "prior_misspelled": (_task("  start:\n    actions:\n      up: {next: start}\n", "prior: uniforn\n"),
                         "'uniform'"),
    "action_name_marker": (_task('  start:\n    actions:\n      "go <eoa> up": {next: start}\n'),
                           "action names"),
    "action_name_bracket": (_task('  start:\n    actions:\n      "go [up]": {next: start}\n'),
                            "action names"),
    "action_name_bool": (_task("  start:\n    actions:\n      yes: {next: start}\n"), "quote it"),
    "state_name_space": (_task('  "my state":\n    actions:\n      up: {next: start}\n'), "spaces"),
    "text_not_string": (_task("  start:\n    text: [a]\n    actions:\n      up: {next: start}\n"),
                        "expected a string"),
    "syntax_error": ("horizon: 2\nstart: [start\n", "YAML syntax error"),
    "bad_indent": ("horizon: 2\n  start: x\n", "line 2"),
    "top_level_list": ("- a\n- b\n", "top level"),
    "empty": ("", "empty"),
    "only_comment": ("# nothing here\n", "empty"),
    "binary": (b"\x00\x01\x02binary", "binary"),
    "latin1": (b"name: caf\xe9\n", "UTF-8"),
}


SUBPROCESS_CASES = ("typo_top", "unknown_next", "sum_below_one", "syntax_error", "empty", "binary",
                    "latin1", "missing_file")  # the real entry point, one per kind of failure


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    paths = {}
    for name, (content, _) in BAD.items():
        path = root / f"{name}.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        paths[name] = path
    paths["missing_file"] = root / "missing.yaml"
    (root / "a_directory.yaml").mkdir()
    paths["directory"] = root / "a_directory.yaml"
    return paths


def _expected(name):
    return {"missing_file": "no such file", "directory": "directory"}.get(name) or BAD[name][1]


@pytest.mark.parametrize("name", [*BAD, "missing_file", "directory"])
def test_bad_file_gives_one_line(bad_files, name, capsys):
    assert cli.main(["exact", str(bad_files[name])]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"lmcoh: error: {bad_files[name]}: ")
    assert _expected(name) in err


def test_bad_files_through_python_m_lmcoh(bad_files):
    """`python -m lmcoh exact BAD`: exit 2, exactly one line on stderr, nothing on stdout."""
    procs = {name: subprocess.Popen([sys.executable, "-m", "lmcoh", "exact", str(bad_files[name])],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in SUBPROCESS_CASES}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (name, err)
        assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert err.startswith(f"lmcoh: error: {bad_files[name]}: ") and _expected(name) in err


def test_good_file_normalises(tmp_path):
    spec = taskfile.parse(GOOD, "good.yaml", default_name="good")
    assert spec["name"] == "good" and spec["horizon"] == 2
    assert spec["start"] == {"start": 1.0}
    down = spec["states"]["start"]["actions"]["down"]
    assert down == {"next": {"gold": 1.0}, "logq": math.log(0.5), "prior": 0.5}
    assert spec["terminals"]["gold"]["logq"] == 0.0
    assert spec["timeout_logq"] == -math.inf


def test_yaml_details():
    text = _edit("success: 0.5", "success: 1e-3") + "timeout_success: 0.25\n"
    spec = taskfile.parse(text, "x")
    assert spec["states"]["start"]["actions"]["down"]["logq"] == math.log(1e-3)
    assert spec["timeout_logq"] == math.log(0.25)
    spec = taskfile.parse(_edit("success: 0.5", "reward: -.inf"), "x")
    assert spec["states"]["start"]["actions"]["down"]["logq"] == -math.inf
    spec = taskfile.parse(_edit("{next: gold}", "{next: {gold: 0.25, start: 0.75}}"), "x")
    assert spec["states"]["start"]["actions"]["up"]["next"] == {"gold": 0.25, "start": 0.75}


def test_prior_and_multiword_actions():
    task = library.load_task("habit")
    assert list(task.prior) == [0.8, 0.2, 0.9, 0.1, 0.5, 0.5]
    task = library.load_task("expedition")
    assert "climb the ridge" in task.action_names


def _same(a: Task, b: Task) -> None:
    assert a.name == b.name and a.horizon == b.horizon and a.description == b.description
    assert a.state_names == b.state_names and a.state_texts == b.state_texts
    assert a.action_names == b.action_names and a.timeout_logq == b.timeout_logq
    for field in ("terminal", "terminal_logq", "start_prob", "action_ptr", "action_logq", "prior",
                  "trans_ptr", "trans_next", "trans_prob"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


@pytest.mark.parametrize("ref", library.builtin_tasks() + [
    "random-tree:T=3,A=3,seed=1,stochastic=1,prior=dirichlet", "gridworld:size=4,slip=0.2,horizon=7,seed=2",
    "gym:FrozenLake-v1,is_slippery=1,horizon=6"])
def test_dump_load_round_trip(ref):
    task = library.load_task(ref)
    again = Task.from_spec(taskfile.parse(taskfile.dump(task), "dumped"))
    _same(task, again)


def test_load_file_errors_are_task_errors(tmp_path):
    with pytest.raises(TaskError, match="no such file"):
        taskfile.load(tmp_path / "nope.yaml")
    with pytest.raises(TaskError, match="unknown task 'mountain_rac': did you mean 'mountain_race'"):
        library.load_task("mountain_rac")


def _start_policy(task, kind, steps):
    return [exact.policy_table(task, pi)[task.state_names[0]] for pi in exact.sequence(task, kind, steps)]


def test_builtin_tasks_show_what_they_claim():
    lottery = library.load_task("lottery")
    assert [p["gamble"] for p in _start_policy(lottery, "retrain", 2)] == pytest.approx([1 / 2, 1 / 6, 1 / 26])
    assert _start_policy(lottery, "temperature", 2)[2]["gamble"] == pytest.approx(2 / 7)
    ridge = library.load_task("long_ridge")
    g = exact.policy_table(ridge, exact.sequence(ridge, "retrain", 1)[1])
    assert g["trailhead"]["ridge"] == pytest.approx(1 / 9) and g["ridge1"]["forward"] == 1.0
    assert exact.incoherence(ridge, exact.sequence(ridge, "retrain", 1)[1]) > 0.5
    assert _start_policy(ridge, "fold", 2)[2]["ridge"] == pytest.approx(1 / 65)
    assert _start_policy(ridge, "fold_ratio", 2)[2]["ridge"] == pytest.approx(1 / 5)
    habit = library.load_task("habit")
    fold, ratio, retrain = (_start_policy(habit, kind, 2)[2]["shortcut"] for kind in ("fold", "fold_ratio", "retrain"))
    assert ratio == pytest.approx(retrain) and abs(fold - retrain) > 0.1
    assert library.load_task("mountain_race").deterministic and not library.load_task("expedition").deterministic
