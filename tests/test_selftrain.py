"""Self-training: config checks, the output directory and resume, the report; slow: the quality bar."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmcoh import exact, report
from lmcoh.library import load_task
from lmcoh.selftrain import (SelfTrainConfig, SelfTrainError, check_output_dir, complete_rounds,
                             prepare_output_dir, round_seed, shard_sizes, training_texts, validate)

ROOT = Path(__file__).resolve().parent.parent


# ---- config ------------------------------------------------------------------------------------
def test_validate_coerces_yaml_strings():
    cfg = validate(SelfTrainConfig(learning_rate="2e-3", rounds="3", lora_alpha=16))
    assert cfg.learning_rate == 0.002 and cfg.rounds == 3 and cfg.lora_alpha == 16.0


@pytest.mark.parametrize("bad, message", [
    ({"rounds": "x"}, "rounds must be an integer, got 'x'"),
    ({"rounds": 2.5}, "rounds must be an integer"),
    ({"rounds": -1}, "rounds must be >= 0"),
    ({"mode": "best"}, "mode must be one of filter, label, got 'best'"),
    ({"prompt": "full"}, "prompt must be one of history, markov"),
    ({"learning_rate": 0}, "learning_rate must be positive"),
    ({"episodes_per_round": 0}, "episodes_per_round must be positive"),
    ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
    ({"overwrite": "yes"}, "overwrite must be true or false"),
    ({"report_to": "wandb"}, "report_to must be one of none, tensorboard"),
    ({"model": "/no/such/model"}, "model directory /no/such/model does not exist"),
])
def test_validate_rejects_with_one_line(bad, message):
    with pytest.raises(SelfTrainError, match=None) as err:
        validate(SelfTrainConfig(**bad))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_recipe_config_loads_and_names_a_builtin_task():
    configs = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
    tasks = {p.stem for p in (ROOT / "tasks").glob("*.yaml")}
    assert tasks <= {p.stem for p in configs}
    for path in configs:
        if path.stem == "temperature_vs_retraining":  # another recipe's config (tests/test_temperature.py)
            continue
        cfg = validate(SelfTrainConfig(**yaml.safe_load(path.read_text())))
        load_task(cfg.task)


@pytest.mark.slow  # the recipe imports torch and TRL: seconds of start-up
def test_recipe_reports_bad_values_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "self_train.py"), "--task", "mountain_race",
                          "--mode", "best", "--output_dir", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, env=_env())
    assert run.returncode != 0
    assert run.stderr.strip() == "self_train: error: mode must be one of filter, label, got 'best'"
    assert not (tmp_path / "out").exists()


def _env() -> dict:
    """The environment for running a recipe as a script from a checkout (lmcoh importable)."""
    import os
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# ---- seeds and sharding -------------------------------------------------------------------------
def test_round_seeds_differ_by_round_and_rank_and_repeat():
    seeds = {round_seed(0, k, r) for k in range(5) for r in range(3)}
    assert len(seeds) == 15 and round_seed(7, 2, 1) == round_seed(7, 2, 1)
    assert all(0 <= s < 2 ** 31 for s in seeds)


def test_shard_sizes_cover_every_episode():
    assert shard_sizes(10, 3) == [4, 3, 3] and sum(shard_sizes(2001, 4)) == 2001


# ---- training texts ----------------------------------------------------------------------------
def test_training_texts_filter_and_label():
    from lmcoh.episodes import Episode

    task = load_task("mountain_race")
    s = task.state_index
    up = [a for a in task.actions_of(s["start"]) if task.action_names[a] == "up"][0]
    ridge_up = [a for a in task.actions_of(s["ridge"]) if task.action_names[a] == "up"][0]
    ridge_down = [a for a in task.actions_of(s["ridge"]) if task.action_names[a] == "down"][0]
    win = Episode([s["start"], s["ridge"], s["gold"]], [up, ridge_up], None, 1.0, True)
    lose = Episode([s["start"], s["ridge"], s["chasm"]], [up, ridge_down], None, 0.0, False)
    prompts, completions = training_texts(task, [win, lose], "filter")
    assert prompts == ["<success>"] and len(completions) == 1
    assert completions[0].startswith(" [start]") and completions[0].endswith("up <eoa>")
    prompts, completions = training_texts(task, [win, lose], "label")
    assert prompts == ["<success>", "<failure>"]
    assert completions[1].endswith(" down <eoa>")
    # prompt + completion is exactly the episode's text under its outcome token
    from lmcoh.text import episode_text
    assert prompts[1] + completions[1] == episode_text(task, "failure", lose.states, lose.actions)


# ---- output directory ----------------------------------------------------------------------------
def _fake_round(out: Path, k: int) -> dict:
    line = {"round": k, "success": 0.85 + 0.01 * k, "target_success": 0.85 + 0.01 * k}
    d = out / "rounds" / str(k)
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(line))
    return line


def test_output_dir_resume_discards_partial_rounds(tmp_path):
    cfg = SelfTrainConfig(output_dir=str(tmp_path / "run"))
    assert prepare_output_dir(cfg) == 0
    out = Path(cfg.output_dir)
    lines = [_fake_round(out, k) for k in range(2)]
    (out / "rounds" / ".tmp-2").mkdir()                    # killed mid-round
    (out / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n{\"round\": 1, \"succ")  # torn line
    assert prepare_output_dir(SelfTrainConfig(output_dir=str(out), rounds=6)) == 2  # raising rounds resumes
    assert not (out / "rounds" / ".tmp-2").exists()
    assert [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] == lines
    assert yaml.safe_load((out / "config.yaml").read_text())["rounds"] == 6


def test_output_dir_from_another_config_is_refused(tmp_path):
    out = tmp_path / "run"
    prepare_output_dir(SelfTrainConfig(output_dir=str(out)))
    _fake_round(out, 0)
    with pytest.raises(SelfTrainError, match="different config .learning_rate: 0.002 there, 0.01 now."):
        check_output_dir(SelfTrainConfig(output_dir=str(out), learning_rate=0.01))
    assert prepare_output_dir(SelfTrainConfig(output_dir=str(out), learning_rate=0.01, overwrite=True)) == 0
    assert complete_rounds(out) == []


def test_output_dir_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SelfTrainError, match="holds no self-training run"):
        check_output_dir(SelfTrainConfig(output_dir=str(tmp_path)))


# ---- report --------------------------------------------------------------------------------------
def test_report_from_rows_has_targets_reading_and_plots(tmp_path):
    task = load_task("mountain_race")
    targets = exact.sequence(task, "retrain", 4)
    rows, details = [], []
    for k in range(3):
        rows.append({"round": k, "success": exact.success(task, targets[k + 1]) - 0.004 * k,
                     "target_success": exact.success(task, targets[k + 1]), "tv_to_target": 0.01 * (k + 1),
                     "incoherence": "inf", "target_incoherence": exact.incoherence(task, targets[k + 1]),
                     "token_incoherence": "inf", "sampled_success_rate": None if k == 0 else 0.86,
                     "episodes_sampled": 0 if k == 0 else 100, "episodes_kept": 0 if k == 0 else 86,
                     "sample_seconds": 0.0, "train_seconds": 1.0, "eval_seconds": 0.1})
        details.append({"incoherence_finite_part": 0.1 / (k + 1)})
    path = report.write_selftrain_report(tmp_path, rows, details, task_name="mountain_race", mode="filter",
                                         optimum=exact.optimal_success(task), config={"seed": 0})
    md = path.read_text()
    assert "| 1 | 0.864 | 0.868 | 0.020 | inf (0.050) |" in md
    assert "largest gap between the LM's success and S(G^(k+1)(p)) is 0.008 (round 2)" in md
    assert "infinite at rounds [0, 1, 2]" in md
    for name in ("success.png", "incoherence.png", "tv.png"):
        assert (tmp_path / name).stat().st_size > 1000 and f"({name})" in md


# ---- the loop, with a tiny untrained model (slow: it samples and trains) -----------------------
def _tiny_model_dir(task, path: Path) -> str:
    from conftest import tiny_llama
    from lmcoh.model import save_model

    loaded = tiny_llama(task)
    save_model(loaded.model, loaded.tokenizer, path, {})
    return str(path)


def _numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    from lmcoh.selftrain import main

    task = load_task("lottery")
    model = _tiny_model_dir(task, tmp_path / "model")
    settings = dict(task="lottery", model=model, episodes_per_round=64, num_train_epochs=1.0,
                    per_device_train_batch_size=16, mode="label", progress=False)
    straight = main(SelfTrainConfig(output_dir=str(tmp_path / "straight"), rounds=2, **settings))
    resumed = tmp_path / "resumed"
    main(SelfTrainConfig(output_dir=str(resumed), rounds=1, **settings))
    (resumed / "rounds" / ".tmp-2" / "adapter").mkdir(parents=True)  # a round killed half-way
    main(SelfTrainConfig(output_dir=str(resumed), rounds=2, **settings))
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in a] == [r["round"] for r in b] == [0, 1, 2]
    for x, y in zip(_numbers(a), _numbers(b)):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], abs=1e-6), key
    assert a[1]["episodes_sampled"] == 64 and a[1]["episodes_kept"] == 64  # label mode keeps all
    assert set(a[0]) == {"round", "success", "target_success", "tv_to_target", "incoherence",
                         "target_incoherence", "token_incoherence", "sampled_success_rate",
                         "episodes_sampled", "episodes_kept", "sample_seconds", "train_seconds",
                         "eval_seconds"}
    assert (resumed / "rounds" / "2" / "adapter" / "adapter_config.json").is_file()
    assert len((resumed / "rounds" / "2" / "episodes.jsonl").read_text().splitlines()) == 64
    assert (resumed / "report.md").is_file() and not (resumed / "rounds" / ".tmp-2").exists()


# ---- the quality bar (slow): the LM follows exact retraining G^(k+1)(p) -----------------------
def _recipe_config(name: str, **overrides) -> SelfTrainConfig:
    settings = yaml.safe_load((ROOT / "recipes" / "configs" / f"{name}.yaml").read_text())
    return SelfTrainConfig(**{**settings, "progress": False, **overrides})


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mountain_prior(tmp_path_factory):
    from lmcoh.pretrain import pretrain

    cfg = _recipe_config("mountain_race")
    return str(pretrain(load_task("mountain_race"), tmp_path_factory.mktemp("prior") / "prior",
                        episodes=cfg.pretrain_episodes, epochs=cfg.pretrain_epochs, seed=cfg.seed))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["filter", "label"])
def test_mountain_race_success_follows_exact_retraining(mode, mountain_prior, tmp_path):
    from lmcoh.selftrain import main

    out = main(_recipe_config("mountain_race", model=mountain_prior, mode=mode, rounds=3,
                              output_dir=str(tmp_path / mode)))
    rows = _rows(out)
    targets = [r["target_success"] for r in rows]
    assert targets == pytest.approx([17 / 20, 0.8676, 0.8856, 0.9031], abs=1e-4)
    for r in rows:
        assert abs(r["success"] - r["target_success"]) <= 0.03, r
        assert r["tv_to_target"] <= 0.08, r
    assert all(b["success"] >= a["success"] - 0.03 for a, b in zip(rows, rows[1:]))


@pytest.mark.slow
def test_lottery_follows_retraining_not_temperature(tmp_path):
    from lmcoh.selftrain import main

    task = load_task("lottery")
    out = main(_recipe_config("lottery", rounds=1, output_dir=str(tmp_path / "lottery")))
    gamble = [json.loads((out / "rounds" / str(k) / "eval.json").read_text())["policy"]["desk"]["gamble"]
              for k in (0, 1)]
    retrain = [exact.policy_table(task, pi)["desk"]["gamble"] for pi in exact.sequence(task, "retrain", 2)]
    hot = exact.policy_table(task, exact.temperature_policy(task, 2.0))["desk"]["gamble"]
    assert retrain[1:] == pytest.approx([1 / 6, 1 / 26]) and hot == pytest.approx(2 / 7)
    assert gamble[0] == pytest.approx(1 / 6, abs=0.05)      # issue 4: the prior is within 0.05 of G(p)
    assert gamble[1] == pytest.approx(1 / 26, abs=0.03)   # G^2(p), far from temperature's 0.286
