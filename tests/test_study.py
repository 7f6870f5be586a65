"""The study's verdicts are computed: each claim holds on its own tasks and fails when an input is flipped."""

import json
import math

import numpy as np
import pytest

from lmcoh.oracle import exact
from lmcoh.study import claims as study
from lmcoh.study import report as study_report
from lmcoh.cli import main
from lmcoh.errors import LmcohError
from lmcoh.io import jsonable
from lmcoh.tasks.generators import random_tree
from lmcoh.tasks.library import load_task


@pytest.fixture(scope="module")
def tasks():
    return {name: load_task(name) for name in ("mountain_race", "long_ridge", "stochastic_example", "lottery", "habit")}


def test_paper_examples_reproduce_the_fractions(tasks):
    sec = study.paper_examples(tasks["mountain_race"])
    assert sec["verdict"] == study.HOLDS
    assert [r["paper"] for r in sec["rows"][:2]] == ["2/5", "8/17"]
    assert sec["rows"][1]["computed"] == pytest.approx(8 / 17, abs=1e-12)
    pictured = sec["plot"]["policies"]  # the paper's figure: p, G(p) and the coherent policy
    assert [pictured[k]["start"]["up"] for k in pictured] == pytest.approx([1 / 2, 2 / 5, 4 / 7], abs=1e-12)


def test_theorem_5_9_holds_on_deterministic_trees_and_fails_on_a_stochastic_one():
    det = [random_tree(T=3, A=2, seed=s) for s in (0, 1)]
    fam = study.Family("trees", True, det)
    assert study.fold_equalities([fam], steps=3)["verdict"] == study.HOLDS
    flipped = study.Family("trees", True, det + [random_tree(T=3, A=2, seed=0, stochastic=True)])
    sec = study.fold_equalities([flipped], steps=3)
    assert sec["verdict"] == study.FAILS
    assert sec["checks"][0]["verdict"] == study.FAILS  # retrain = temperature broke
    stoch = study.Family("stochastic", False, [random_tree(T=3, A=2, seed=0, stochastic=True)])
    assert study.fold_equalities([stoch], steps=3)["verdict"] == study.HOLDS


def test_literal_fold_differs_only_where_trajectories_have_unequal_prior(tasks):
    assert study.uniform_over_trajectories(tasks["mountain_race"])
    assert study.uniform_over_trajectories(random_tree(T=3, A=3, seed=0))
    assert not study.uniform_over_trajectories(tasks["long_ridge"])
    sec = study.fold_equalities([study.Family("built-in", True, [tasks["mountain_race"], tasks["long_ridge"]])], 3)
    assert sec["checks"][1]["verdict"] == study.CAVEAT and "long_ridge" in sec["checks"][1]["evidence"]


def test_convergence_fails_with_a_zero_mass_prior_and_the_break_shows(tasks):
    broken = study.zero_best_start_action(tasks["mountain_race"])
    assert study.support_optimum(broken) == pytest.approx(0.75)
    sec = study.retraining_improves([tasks["mountain_race"]], [tasks["mountain_race"]], [broken], steps=4, rounds=60)
    assert sec["verdict"] == study.HOLDS
    flipped = study.retraining_improves([], [broken], [tasks["mountain_race"]], steps=4, rounds=60)
    assert [c["verdict"] for c in flipped["checks"]] == [study.FAILS, study.FAILS]


def test_rate_printed_term_is_k_times_J_prime_and_misses_the_increments():
    tree = study.floor_q(random_tree(T=3, A=3, seed=0), 0.05)
    sec = study.convergence_rate([tree], steps=4)
    for r in sec["rows"]:
        assert r["printed term"] == pytest.approx(r["k J'(k)"], rel=1e-5)
        assert abs(r["J' + H'/k"]) < 1e-6
    assert sec["verdict"] == study.FAILS
    # a finite-difference derivative matches the exact increment over a tiny step
    d = study.path_derivatives(tree, 2.0)
    J = lambda a: exact.expected_return(tree, exact.temperature_policy(tree, a))  # noqa: E731
    assert (J(2.001) - J(1.999)) / 0.002 == pytest.approx(d["J'"], rel=1e-5)


def test_incoherence_vanishes_only_as_delta_goes_to_zero(tasks):
    chosen = [tasks["lottery"], tasks["stochastic_example"], tasks["mountain_race"]]
    sec = study.incoherence_limits(chosen, deltas=(1.0, 0.01), ks=(0, 1, 16, 64))
    assert [c["verdict"] for c in sec["checks"]] == [study.HOLDS, study.HOLDS]
    assert sec["observations"][0]["verdict"] == study.FAILS  # at delta = 1 it does not vanish
    flipped = study.incoherence_limits(chosen, deltas=(1.0,), ks=(0, 16, 64))
    assert flipped["checks"][0]["verdict"] == study.FAILS


def test_effective_horizon_and_correlation():
    mountain = load_task("mountain_race")
    assert study.effective_horizon(mountain) == 1  # greedy on Q^uniform takes the safe forest
    mdps = study.random_mdps(8, seed=0)
    assert all(0 <= study.effective_horizon(t) < t.horizon for t in mdps)
    sec = study.horizon_correlation(mdps)
    assert sec["verdict"] in (study.HOLDS, study.CAVEAT, study.FAILS)
    assert math.isfinite(sec["plot"]["stats"]["kappa(G(p))"]["r"])
    constant = study.horizon_correlation([mountain] * 5)  # no spread: r undefined
    assert constant["verdict"] == study.SKIPPED
    r, lo, hi = study.pearson([1, 2, 3, 4, 5], [2, 4, 6, 8, 11])
    assert lo < r < hi and r == pytest.approx(np.corrcoef([1, 2, 3, 4, 5], [2, 4, 6, 8, 11])[0, 1])


def test_stochastic_divergence_needs_stochastic_tasks(tasks):
    grid = lambda slip: study._grid(3, slip, 0)  # noqa: E731
    sec = study.stochastic_divergence(tasks["stochastic_example"], tasks["lottery"], [grid(0.0), grid(0.2)], steps=2)
    assert sec["verdict"] == study.HOLDS
    assert sec["rows"][0]["retrain"] == pytest.approx(25 / 61) and sec["rows"][0]["temperature"] == pytest.approx(7 / 17)
    flipped = study.stochastic_divergence(tasks["stochastic_example"], tasks["lottery"], [grid(0.0)], steps=2)
    assert flipped["checks"][-1]["verdict"] == study.FAILS


def test_klrl_equals_temperature_only_on_deterministic_tasks(tasks):
    det = study.Family("deterministic", True, [tasks["mountain_race"], random_tree(T=3, A=2, seed=0)])
    stoch = study.Family("stochastic", False, [tasks["stochastic_example"], study._grid(3, 0.2, 0)])
    sec = study.klrl_pressures([det, stoch], steps=2)
    assert sec["verdict"] == study.HOLDS and sec["id"] == 9
    example3 = next(r for r in sec["rows"] if r["task"] == "stochastic_example")
    assert example3["S klrl"] == pytest.approx(exact.success(tasks["stochastic_example"],
                                                             [np.array([math.sqrt(2) - 1, 2 - math.sqrt(2)])]))
    slippery = sec["observations"][1]["evidence"]  # which pressure is the more successful, and by how much
    assert "most successful: klrl, by" in slippery or "most successful: retrain, by" in slippery
    assert "tasks" in sec["observations"][-1]["evidence"] and sec["observations"][-1]["verdict"] == study.HOLDS
    flipped = study.klrl_pressures([study.Family("deterministic", True, [tasks["stochastic_example"]]),
                                    study.Family("stochastic", False, [tasks["mountain_race"]])], steps=2)
    assert [c["verdict"] for c in flipped["checks"]] == [study.FAILS, study.FAILS]


def test_prior_folds_flip_to_a_uniform_prior(tasks):
    assert study.prior_folds([tasks["habit"]], steps=3)["verdict"] == study.HOLDS
    flipped = study.prior_folds([tasks["mountain_race"]], steps=3)
    assert flipped["checks"][1]["verdict"] == study.FAILS


def _run_dir(path, gap):
    path.mkdir()
    lines = [{"round": k, "success": t + gap, "target_success": t, "incoherence": 0.1, "target_incoherence": 0.0,
              "tv_to_target": gap} for k, t in enumerate((0.6, 0.8, 0.9))]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (path / "config.yaml").write_text("task: mountain_race\n")
    return path


def test_selftrain_runs_verdict(tmp_path):
    good = ("good", *study.read_run(_run_dir(tmp_path / "good", 0.01)))
    bad = ("bad", *study.read_run(_run_dir(tmp_path / "bad", 0.3)))
    assert good[1] == "mountain_race"
    assert study.selftrain_runs([good])["verdict"] == study.HOLDS
    assert study.selftrain_runs([good, bad])["verdict"] == study.FAILS
    assert study.selftrain_runs([])["verdict"] == study.SKIPPED
    rows = study.selftrain_runs([good])["rows"]
    assert rows[1]["exact increment"] == pytest.approx(0.2)


def test_report_has_the_paper_numbers_and_is_written_atomically(tmp_path, tasks, umask_002):
    sections = [study.paper_examples(tasks["mountain_race"]),
                study.horizon_correlation(study.random_mdps(6, seed=1)),
                study.stochastic_divergence(tasks["stochastic_example"], tasks["lottery"], [], steps=2)]
    result = jsonable({"config": {"seed": 0, "quick": True}, "thresholds": study.THRESHOLDS,
                        "sections": sections, "seconds": 1.0})
    out = study_report.write(result, tmp_path / "study")
    text = (out / "report.md").read_text()
    for number in ("2/5", "8/17", "25/61", "7/17", "-0.02", "0.32", "0.038", "0.286"):
        assert number in text
    assert json.loads((out / "study.json").read_text())["sections"][0]["verdict"] == study.HOLDS
    assert (out / "section5_scatter.png").stat().st_size > 1000
    assert (out / "mountain_race.png").stat().st_size > 1000 and "(mountain_race.png)" in text
    with pytest.raises(LmcohError, match="already holds mountain_race.png, report.md, section5_scatter.png and 1 more; "
                                         "pass --overwrite"):
        study_report.write(result, out)
    study_report.write(result, out, overwrite=True)  # an earlier study is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]
    assert out.stat().st_mode & 0o777 == 0o775 and (out / "report.md").stat().st_mode & 0o777 == 0o664  # the umask
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(study.TaskError, match="holds something other than an earlier study"):
        study_report.write(result, other, overwrite=True)


def test_cli_bad_run_dir_is_one_line(tmp_path, capsys):
    assert main(["study", "--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmcoh: error:") and "metrics.jsonl" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_theorem_5_9_holds_with_a_random_start_over_deterministic_moves():
    """gym:Taxi-v4 starts at random, every move is deterministic: it joins the deterministic family, and there
    retraining equals temperature exactly (policies are per state; each start's episodes reweight on their own)."""
    taxi = load_task("gym:Taxi-v4,horizon=20")
    assert taxi.deterministic and taxi.random_start and taxi.uniform_prior
    sec = study.fold_equalities([study.Family("taxi", True, [taxi])], steps=3)
    assert sec["checks"][0]["verdict"] == study.HOLDS and sec["rows"][0]["dynamics"] == "deterministic"
    assert sec["rows"][0]["retrain vs temperature"] < 1e-12
