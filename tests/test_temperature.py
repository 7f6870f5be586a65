"""Temperature vs retraining: the exact comparison, the rejection sampler, the outputs; slow: the LM quality bar."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT, recipe, recipe_args, recipe_env
from lmcoh.errors import LmcohError, RunError
from lmcoh.oracle import exact
from lmcoh.oracle.exact import acceptance_rate
from lmcoh.report.temperature import write_outputs
from lmcoh.runs.arguments import TemperatureArguments
from lmcoh.runs.temperature import (Methods, ProposalPool, break_even, check_comparison, empirical_policy,
                                    exact_comparison, rejection_sample)
from lmcoh.tasks.episodes import sample_prior_episodes
from lmcoh.tasks.library import load_task


def compare(*args, **kwargs):
    """recipes/temperature_vs_retraining.py's loop over k."""
    return recipe("temperature_vs_retraining").compare(*args, **kwargs)


def temperature_args(*argv):
    return recipe_args(*argv, script_type=TemperatureArguments)
ROW_KEYS = ["k", "exact_retrain_success", "exact_temperature_success", "exact_tv_retrain_vs_temperature",
            "exact_klrl_success", "exact_klrl_success_success", "exact_tv_temperature_vs_klrl",
            "lm_retrain_success", "lm_rejection_success", "lm_tv_retrain_vs_rejection",
            "lm_logit_temperature_success", "rejection_samples_per_episode", "retrain_seconds",
            "retrain_episodes_sampled", "retrain_gradient_steps", "rejection_seconds_per_episode"]


def prior_sampler(task):
    return lambda n, seed: sample_prior_episodes(task, n, np.random.default_rng(seed))


def gamble(task, pi):
    """Probability of `gamble` at the lottery's desk."""
    layer = task.layers[0]
    return float(pi[0][[task.action_names[a] for a in layer.actions].index("gamble")])


# ---- exact -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mountain_race", "habit", "random-tree:T=4,A=3,seed=2,stochastic=0"])
def test_deterministic_tasks_retrain_equals_temperature(name):
    task = load_task(name)
    assert task.deterministic
    assert max(exact_comparison(task, 6)["tv_retrain_vs_temperature"]) <= 1e-9


def test_example3_parts_ways_slightly_from_k2():
    ex = exact_comparison(load_task("stochastic_example"), 4)
    tv = ex["tv_retrain_vs_temperature"]
    assert tv[0] == tv[1] == 0.0
    assert tv[2] == pytest.approx(abs(25 / 61 - 7 / 17), abs=1e-12)  # 0.0019: tiny but > 0
    assert all(x > 0 for x in tv[2:])


def test_lottery_parts_ways_by_a_quarter_at_k2():
    task = load_task("lottery")
    ex = exact_comparison(task, 3)
    g2, t2 = ex["policies"]["retrain"][2], ex["policies"]["temperature"][2]
    assert gamble(task, g2) == pytest.approx(1 / 26, abs=1e-12)  # (1/6 * 0.1) / (5/6 * 0.5 + 1/6 * 0.1)
    assert gamble(task, t2) == pytest.approx(0.1 / 0.35, abs=1e-12)
    assert ex["tv_retrain_vs_temperature"][2] == pytest.approx(0.1 / 0.35 - 1 / 26, abs=1e-12)
    assert ex["success"]["retrain"][2] > ex["success"]["temperature"][2]


def test_acceptance_rate_is_expected_prod_q_to_the_alpha():
    task = load_task("lottery")
    assert acceptance_rate(task, 0) == 1.0
    assert acceptance_rate(task, 2) == pytest.approx(0.5 * 0.25 + 0.5 * 0.1)
    race = load_task("mountain_race")  # up-up 1/4 (q = 1), up-down 1/4 (q = 0), down 1/2 (q = 3/4)
    assert acceptance_rate(race, 3) == pytest.approx(0.25 + 0.5 * 0.75 ** 3)


# ---- rejection sampling ------------------------------------------------------------------------
def test_rejection_sampling_from_the_exact_prior_gives_pi_alpha_at_its_cost():
    task = load_task("lottery")
    pool = ProposalPool(prior_sampler(task), seed=3)
    target = exact.sequence(task, "temperature", 2)
    for alpha in (0, 1, 2):
        rej = rejection_sample(pool, float(alpha), 4000, 100_000)
        assert len(rej.episodes) == 4000
        assert rej.samples_per_episode == pytest.approx(1 / acceptance_rate(task, alpha), rel=0.05)
        assert gamble(task, empirical_policy(task, rej.episodes)) == pytest.approx(gamble(task, target[alpha]), abs=0.02)
        pi = empirical_policy(task, rej.episodes)
        assert exact.success(task, pi) == pytest.approx(exact.success(task, target[alpha]), abs=0.01)
    assert rejection_sample(pool, 0.0, 100, 10_000).proposals == 100  # alpha = 0 accepts everything


def test_rejection_sampling_stops_at_max_proposals():
    task = load_task("lottery")
    rej = rejection_sample(ProposalPool(prior_sampler(task), seed=0), 4.0, 1000, 500)
    assert rej.proposals == 500 and 0 < len(rej.episodes) < 1000


def test_empirical_policy_counts_per_step_and_keeps_the_prior_where_unvisited():
    task = load_task("mountain_race")
    s = task.state_index
    up = {st: next(a for a in task.actions_of(s[st]) if task.action_names[a] == "up") for st in ("start", "ridge")}
    from lmcoh.tasks.episodes import Episode
    eps = [Episode([s["start"], s["ridge"], s["gold"]], [up["start"], up["ridge"]], None, 1.0, True)] * 3
    pi = empirical_policy(task, eps)
    table = exact.policy_table(task, pi)
    assert table["start"] == {"up": 1.0, "down": 0.0} and table["ridge"] == {"up": 1.0, "down": 0.0}
    assert table["forest"] == {"up": 0.5, "down": 0.5}


def test_break_even():
    assert break_even(10.0, 0.03, 0.01) == pytest.approx(500)
    assert break_even(0.0, 0.03, 0.01) == 0.0
    assert break_even(10.0, 0.01, 0.01) == float("inf")


# ---- the whole comparison with exact stand-ins for the LM ----------------------------------------
def exact_methods(task, K):
    """Retraining exactly; logit temperature 1/k as G(p)^k renormalised (single-token actions)."""
    retrain = exact.sequence(task, "retrain", K)
    g = retrain[min(1, K)]

    def logit(k):
        if k == 0:
            return retrain[0], exact.success(task, retrain[0])
        with np.errstate(divide="ignore"):
            pi = [layer.by_state.softmax(k * np.log(p), p) for p, layer in zip(g, task.layers)]
        return pi, exact.success(task, pi)

    return Methods(prior_sampler(task), lambda k: (retrain[k], exact.success(task, retrain[k])), logit,
                   [10.0 * max(k - 1, 0) for k in range(K + 1)], [1000 * max(k - 1, 0) for k in range(K + 1)],
                   [30 * max(k - 1, 0) for k in range(K + 1)])


def test_comparison_json_report_and_plots_lottery(tmp_path):
    task = load_task("lottery")
    comparison, details = compare(task, 3, exact_methods(task, 3), rejection_episodes=3000, max_proposals=100_000)
    assert comparison["task"] == "lottery" and comparison["deterministic"] is False
    assert [list(r) for r in comparison["rows"]] == [ROW_KEYS] * 4
    row2 = comparison["rows"][2]
    assert row2["exact_tv_retrain_vs_temperature"] == pytest.approx(0.2473, abs=1e-3)
    assert row2["lm_tv_retrain_vs_rejection"] == pytest.approx(0.2473, abs=0.03)
    assert row2["rejection_samples_per_episode"] == pytest.approx(1 / 0.175, rel=0.05)
    assert details["lm"][2]["rejection_tv_to_exact"] < 0.03
    write_outputs(tmp_path, comparison, details, task)
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["rows"][2]["k"] == 2 and list(saved) == ["task", "deterministic", "rows"]
    md = (tmp_path / "report.md").read_text()
    assert "part ways from k = 2 on (TV 0.247" in md
    assert "Retraining moves towards the optimum faster: its success is higher at every k in [2, 3]" in md
    assert "temperature gives `gamble` 0.286 where retraining gives it 0.038" in md
    assert "k = 2: rejection sampling draws 5.7" in md
    for name in ("success.png", "tv.png", "cost.png", "policies_k2.png"):
        assert (tmp_path / name).stat().st_size > 1000 and f"({name})" in md


@pytest.mark.parametrize("name, fold", [("mountain_race", "the folded sequence (Def 5.7) equals retraining"),
                                        ("habit", "The prior is not uniform: Def 5.7 read literally")])
def test_comparison_on_a_deterministic_task_reads_as_equal(tmp_path, name, fold):
    task = load_task(name)
    comparison, details = compare(task, 3, exact_methods(task, 3), rejection_episodes=2000, max_proposals=50_000)
    assert max(r["exact_tv_retrain_vs_temperature"] for r in comparison["rows"]) <= 1e-9
    assert max(r["lm_tv_retrain_vs_rejection"] for r in comparison["rows"]) < 0.04
    write_outputs(tmp_path, comparison, details)
    md = (tmp_path / "report.md").read_text()
    assert "coincide at every k" in md and fold in md


# ---- config and errors -------------------------------------------------------------------------
def test_check_comparison_refuses_in_one_line(tmp_path):
    task = load_task("lottery")
    args, _, _ = temperature_args("--rounds", 4, "--rejection_episodes", 2000, "--max_proposals", 10_000)
    with pytest.raises(RunError, match="rejection sampling at alpha = 5 accepts 0.0") as err:
        check_comparison(args, str(tmp_path / "a"), task)
    assert "\n" not in str(err.value)
    args, _, _ = temperature_args()
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(LmcohError, match="already holds notes.txt; pass --overwrite"):
        check_comparison(args, str(tmp_path), task)
    args, _, _ = temperature_args("--overwrite")
    with pytest.raises(RunError, match="holds something other than an earlier comparison"):
        check_comparison(args, str(tmp_path), task)  # --overwrite replaces only an earlier comparison
    args, _, _ = temperature_args()
    args, _, _ = temperature_args("--selftrain_dir", tmp_path)
    with pytest.raises(RunError, match="holds no complete self-training round"):
        check_comparison(args, str(tmp_path / "b"), task)


def test_bad_values_fail_in_one_line():
    with pytest.raises(RunError, match="rejection_episodes must be >= 1, got 0"):
        temperature_args("--rejection_episodes", 0)


@pytest.mark.slow  # the recipe imports torch and TRL: seconds of start-up
def test_recipe_reports_bad_values_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "temperature_vs_retraining.py"),
                          "--config", str(ROOT / "recipes" / "configs" / "temperature_vs_retraining.yaml"),
                          "--rejection_episodes", "0", "--output_dir", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, env=recipe_env())
    assert run.returncode != 0
    assert run.stderr.strip() == "temperature_vs_retraining: error: rejection_episodes must be >= 1, got 0"
    assert not (tmp_path / "out").exists()


def test_recipe_config_loads():
    args, sft, _ = temperature_args("--config", ROOT / "recipes" / "configs" / "temperature_vs_retraining.yaml")
    check_comparison(args, "/nonexistent/out", load_task(args.task))
    assert args.rounds + 1 >= 2 and sft.learning_rate == 2e-3


def test_selftrain_dir_of_another_task_is_refused(tmp_path):
    st = tmp_path / "st"
    (st / "rounds" / "0").mkdir(parents=True)
    (st / "rounds" / "0" / "metrics.json").write_text("{}")
    (st / "config.yaml").write_text(yaml.safe_dump({"task": "mountain_race"}))
    args, _, _ = temperature_args("--selftrain_dir", st)
    with pytest.raises(RunError, match="self-trained task 'mountain_race', not 'lottery'"):
        check_comparison(args, str(tmp_path / "out"), load_task("lottery"))


# ---- the language model (slow) -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["lottery", "mountain_race"])
def test_lm_retraining_against_rejection_sampling(tmp_path, name, default_prior):
    """Lottery: the LM parts ways like the exact policies (TV >= 0.15 at k = 2), each method
    within 0.05 of its own exact target. Mountain race: retrained LM and rejection agree (TV <= 0.08)."""
    out = recipe("temperature_vs_retraining").main(*temperature_args(
        "--task", name, "--output_dir", tmp_path / "out", "--rounds", 1, "--rejection_episodes", 1500,
        "--episodes_per_round", 1500, "--model_name_or_path", default_prior(name), "--klrl_max_steps", 0,
        "--disable_tqdm", "true"))
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    lm = json.loads((out / "details.json").read_text())["lm"]
    assert [list(r) for r in rows] == [ROW_KEYS] * 3
    assert not (tmp_path / "out.partial").exists()
    if name == "lottery":
        assert rows[2]["exact_tv_retrain_vs_temperature"] == pytest.approx(0.2473, abs=1e-3)
        assert rows[2]["lm_tv_retrain_vs_rejection"] >= 0.15
        assert lm[2]["retrain_tv_to_exact"] <= 0.05 and lm[2]["rejection_tv_to_exact"] <= 0.05
        assert "Retraining moves towards the optimum faster" in (out / "report.md").read_text()
    else:
        assert max(r["exact_tv_retrain_vs_temperature"] for r in rows) <= 1e-9
        assert lm[1]["retrain_tv_to_exact"] <= 0.08, (
            f"the success-prompted prior is {lm[1]['retrain_tv_to_exact']:.3f} TV from G(p): "
            "pretraining did not learn goal conditioning (lmcoh.lm.pretrain), so nothing downstream can match")
        assert max(r["lm_tv_retrain_vs_rejection"] for r in rows) <= 0.08


def test_four_pressures_with_kl_rl_runs(tmp_path):
    """KL-RL runs (their metrics.jsonl) join the comparison: exact and LM success, TV and costs."""
    from lmcoh.io import write_jsonl
    from lmcoh.oracle import klrl

    task = load_task("stochastic_example")
    runs = {}
    for reward in ("log_q", "success"):
        optimum = klrl.optimum(task, 0.5, reward, epsilon=1e-3).policy
        runs[(2, reward)] = tmp_path / reward
        runs[(2, reward)].mkdir()
        write_jsonl(runs[(2, reward)] / "metrics.jsonl", [{
            "step": 300, "policy": exact.policy_table(task, optimum), "tv_to_target": 0.01, "episodes_sampled": 9600,
            "gradient_steps": 300, "train_seconds": 100.0}])
    comparison, details = compare(task, 2, exact_methods(task, 2), rejection_episodes=500, max_proposals=10_000,
                                  klrl_runs=runs, epsilon=1e-3)
    row = comparison["rows"][2]
    assert row["exact_klrl_success"] == pytest.approx(row["lm_klrl_success"], abs=1e-12)
    assert abs(row["exact_tv_temperature_vs_klrl"] - abs(7 / 17 - (2 ** 0.5 - 1))) < 1e-9
    assert [r["tv_to_exact"] for r in details["klrl_lm"]] == pytest.approx([0.0, 0.0], abs=1e-12)
    (tmp_path / "out").mkdir()
    write_outputs(tmp_path / "out", comparison, details, task)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Four pressures on stochastic_example" in md and "| 2 | KL-RL beta = 1/k, R = success |" in md
    assert "KL-RL at beta = 1/k parts ways with temperature" in md and "9600 | 300 | 100.0 |" in md
