"""Self-training: the recipe's arguments, the run directory and resume, the report; slow: the loop and its quality bar."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, recipe, recipe_args, recipe_env
from lmcoh.errors import RunError
from lmcoh.oracle import exact
from lmcoh.report import selftrain as report
from lmcoh.runs.directory import RunDirectory, resolved_config
from lmcoh.runs.selftrain import SelfTraining, round_seed, shard_sizes, training_examples
from lmcoh.tasks.library import load_task


# ---- arguments ---------------------------------------------------------------------------------
def test_flags_are_typed_and_trainer_settings_come_from_sftconfig():
    args, sft, model = recipe_args("--learning_rate", "2e-3", "--rounds", "3", "--gradient_accumulation_steps", "2",
                                   "--lr_scheduler_type", "cosine", "--lora_r", "4", "--dtype", "bfloat16")
    assert args.rounds == 3 and sft.learning_rate == 0.002 and sft.gradient_accumulation_steps == 2
    assert sft.lr_scheduler_type.value == "cosine" and model.lora_r == 4 and model.dtype == "bfloat16"
    # lmcoh's defaults where they differ from TRL's; the rest is TRL's
    assert sft.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())  # from the device
    assert sft.num_train_epochs == 2.0 and sft.completion_only_loss is True
    assert sft.max_grad_norm == 1.0 and model.use_peft is True and model.lora_target_modules == "all-linear"


def test_config_file_then_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("task: lottery\nlearning_rate: 2e-3\nrounds: 2\nlora_alpha: 8\nreport_to: none\n")
    args, sft, model = recipe_args("--config", config, "--rounds", "5")
    assert args.task == "lottery" and args.rounds == 5 and sft.learning_rate == 0.002 and model.lora_alpha == 8


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "x"], "argument --rounds: invalid int value: 'x'"),
    (["--rounds", "-1"], "rounds must be >= 0, got -1"),
    (["--mode", "best"], "argument --mode: invalid choice 'best' (choose from filter, label) (see --help)"),
    (["--mode", "labels"], "argument --mode: invalid choice 'labels' (choose from filter, label); did you mean label?"),
    (["--prompt", "full"], "argument --prompt: invalid choice 'full' (choose from history, markov) (see --help)"),
    (["--episodes_per_round", "0"], "episodes_per_round must be >= 1, got 0"),
    (["--delta", "0"], "delta must be positive, got 0.0"),
    (["--learning_rat", "1"], "unknown flag --learning_rat; did you mean --learning_rate?"),
    (["--lr_scheduler_type", "wavy"], "invalid choice 'wavy' (choose from linear, cosine"),
    (["--learning-rate", "x"], "argument --learning_rate: invalid float value: 'x' (see --help)"),
])
def test_bad_flags_fail_in_one_line(argv, message):
    with pytest.raises(RunError) as err:
        recipe_args(*argv)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("rounds: [1]\n", "rounds must be a single value, not a list"),
    ("rounds: 2.5\n", "rounds must be an integer, got 2.5"),
    ("mode: best\n", "mode must be one of filter, label, got 'best'"),
    ("overwrite: maybe\n", "overwrite must be true or false, got 'maybe'"),
    ("learnin_rate: 0.1\n", "unknown setting 'learnin_rate' in the config file; did you mean 'learning_rate'?"),
    ("- a\n- b\n", "must contain a YAML mapping"),
    ("rounds: [\n", "config file is not valid YAML (line 2)"),
    ("lora_r: {a: 1}\n", "lora_r must be a single value, not a mapping"),
])
def test_bad_config_files_fail_in_one_line(tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(RunError) as err:
        recipe_args("--config", config)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RunError, match="no such file"):
        recipe_args("--config", tmp_path / "missing.yaml")


def test_every_recipe_config_loads_and_names_a_builtin_task():
    configs = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
    tasks = {p.stem for p in (ROOT / "tasks").glob("*.yaml")}
    assert tasks <= {p.stem for p in configs}
    from lmcoh.runs.arguments import TemperatureArguments, parse
    from lmcoh.runs.klrl import make_klrl_parser
    for path in configs:
        kind = TemperatureArguments if path.stem == "temperature_vs_retraining" else None
        if path.stem.startswith("kl_rl"):
            args = parse(make_klrl_parser(), ["--config", str(path)])[0]
        else:
            args, sft, model = recipe_args("--config", path, script_type=kind)
        load_task(args.task)


def test_each_rounds_trainer_settings_are_the_users_with_the_loop_overrides(tmp_path, monkeypatch):
    """`SelfTraining.train` hands TRL the user's SFTConfig with only LOOP_OVERRIDES changed."""
    from lmcoh.lm import training

    seen = []
    monkeypatch.setattr(training, "train_sft", lambda model, tok, examples, args, **kw: seen.append(args) or {})
    run = SelfTraining(*recipe_args("--gradient_accumulation_steps", "2", "--seed", "7", "--output_dir", tmp_path))
    for k in (1, 2):
        with run.round(k):
            run.train(type("M", (), {"model": None, "tokenizer": None})(), [])
    for k, args in zip((1, 2), seen):
        assert args.gradient_accumulation_steps == 2 and args.learning_rate == run.sft.learning_rate
        assert args.per_device_train_batch_size == 32  # global 64 over 1 process x 2 accumulation steps
        assert args.seed == args.data_seed == round_seed(7, k)
        assert args.output_dir == str(tmp_path / "trainer" / f"round_{k}")


@pytest.mark.slow  # the recipe imports torch and TRL: seconds of start-up
def test_recipe_reports_bad_values_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "self_train.py"), "--task", "mountain_race",
                          "--mode", "best", "--output_dir", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, env=recipe_env())
    assert run.returncode == 2
    assert run.stderr.strip() == ("self_train: error: argument --mode: invalid choice 'best' "
                                  "(choose from filter, label) (see --help)")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_help_lists_the_trainer_and_model_settings():
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "self_train.py"), "--help"],
                         capture_output=True, text=True, cwd=ROOT, env=recipe_env())
    assert run.returncode == 0
    for flag in ("--gradient_accumulation_steps", "--lr_scheduler_type", "--bf16", "--dtype",
                 "--attn_implementation", "--lora_target_modules", "--load_in_4bit", "--model_name_or_path",
                 "--report_to", "--episodes_per_round", "seed: derived from (seed, K)"):
        assert flag in run.stdout, flag


# ---- seeds and sharding -------------------------------------------------------------------------
def test_round_seeds_differ_by_round_and_rank_and_repeat():
    seeds = {round_seed(0, k, r) for k in range(5) for r in range(3)}
    assert len(seeds) == 15 and round_seed(7, 2, 1) == round_seed(7, 2, 1)
    assert all(0 <= s < 2 ** 31 for s in seeds)


def test_shard_sizes_cover_every_episode():
    assert shard_sizes(10, 3) == [4, 3, 3] and sum(shard_sizes(2001, 4)) == 2001


# ---- training examples --------------------------------------------------------------------------
def test_training_examples_filter_and_label():
    from conftest import tiny_llama
    from lmcoh.lm.text import Layout, Writer
    from lmcoh.tasks.episodes import Episode

    task = load_task("mountain_race")
    s = task.state_index
    up = [a for a in task.actions_of(s["start"]) if task.action_names[a] == "up"][0]
    ridge_up = [a for a in task.actions_of(s["ridge"]) if task.action_names[a] == "up"][0]
    ridge_down = [a for a in task.actions_of(s["ridge"]) if task.action_names[a] == "down"][0]
    win = Episode([s["start"], s["ridge"], s["gold"]], [up, ridge_up], None, 1.0, True)
    lose = Episode([s["start"], s["ridge"], s["chasm"]], [up, ridge_down], None, 0.0, False)
    tok = tiny_llama(task).tokenizer
    (ids, mask), = training_examples(tok, task, Layout(), [win, lose], "filter")
    assert tok.decode(ids, skip_special_tokens=True) == Writer(task).episode("success", win.states, win.actions)
    assert tok.convert_ids_to_tokens([i for i, m in zip(ids, mask) if m]) == ["up", "<eoa>", "up", "<eoa>"]
    examples = training_examples(tok, task, Layout(), [win, lose], "label")
    assert len(examples) == 2
    ids, mask = examples[1]
    assert tok.decode(ids, skip_special_tokens=True) == Writer(task).episode("failure", lose.states, lose.actions)
    assert tok.convert_ids_to_tokens([i for i, m in zip(ids, mask) if m]) == ["up", "<eoa>", "down", "<eoa>"]


# ---- output directory ----------------------------------------------------------------------------
def _fake_round(out: Path, k: int) -> dict:
    """A complete round k as the loop writes it: metrics, evaluation and (k > 0) an adapter."""
    from safetensors.numpy import save_file

    line = {"round": k, "success": 0.85 + 0.01 * k, "target_success": 0.85 + 0.01 * k}
    d = out / "rounds" / str(k)
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(line))
    (d / "eval.json").write_text(json.dumps({"success": line["success"]}))
    if k > 0:
        (d / "model").mkdir()
        (d / "model" / "adapter_config.json").write_text("{}")
        save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(d / "model" / "adapter_model.safetensors"))
    return line


def _config(tmp_path, *argv) -> dict:
    return resolved_config(*recipe_args("--output_dir", tmp_path / "run", *argv))


def test_output_dir_resume_discards_partial_rounds(tmp_path):
    run = RunDirectory(tmp_path / "run")
    assert run.prepare(_config(tmp_path)) == 0
    lines = [_fake_round(run.path, k) for k in range(2)]
    (run.rounds / ".tmp-2").mkdir()                       # killed mid-round
    (run.path / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n{\"round\": 1, \"succ")  # torn line
    assert run.prepare(_config(tmp_path, "--rounds", "6")) == 2  # raising rounds resumes
    assert not (run.rounds / ".tmp-2").exists()
    assert [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()] == lines
    assert yaml.safe_load((run.path / "config.yaml").read_text())["rounds"] == 6


def test_output_dir_from_another_config_is_refused(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.prepare(_config(tmp_path))
    _fake_round(run.path, 0)
    with pytest.raises(RunError, match="different config .learning_rate: 0.002 there, 0.01 now."):
        run.check(_config(tmp_path, "--learning_rate", "0.01"))
    run.check(_config(tmp_path, "--report_to", "tensorboard", "--logging_steps", "5"))  # run-neutral
    assert run.prepare(_config(tmp_path, "--learning_rate", "0.01"), overwrite=True) == 0
    assert run.complete_rounds() == []


def test_moved_output_dir_resumes(tmp_path):
    old = RunDirectory(tmp_path / "run")
    old.prepare(_config(tmp_path))
    _fake_round(old.path, 0)
    old.path.rename(tmp_path / "moved")
    moved = RunDirectory(tmp_path / "moved")
    config = resolved_config(*recipe_args("--config", moved.path / "config.yaml", "--output_dir", moved.path))
    assert moved.prepare(config) == 1


def test_output_dir_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="holds no self-training run"):
        RunDirectory(tmp_path).check(_config(tmp_path))


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


def test_report_pictures_the_final_round_beside_its_target(tmp_path):
    task = load_task("mountain_race")
    targets = exact.sequence(task, "retrain", 3)
    rows = [{"round": k, "success": 0.8, "target_success": 0.8, "tv_to_target": 0.01, "incoherence": 0.1,
             "target_incoherence": 0.1, "token_incoherence": 0.1, "sampled_success_rate": None,
             "episodes_sampled": 0, "episodes_kept": 0, "sample_seconds": 0.0, "train_seconds": 0.0,
             "eval_seconds": 0.0} for k in range(2)]
    details = [{"incoherence_finite_part": 0.1, "policy": exact.policy_table(task, targets[k + 1])} for k in range(2)]
    md = report.write_selftrain_report(tmp_path, rows, details, task_name=task.name, mode="filter",
                                       optimum=1.0, config={}, task=task).read_text()
    assert (tmp_path / "final_round.png").stat().st_size > 1000 and "(final_round.png)" in md
    del details[-1]["policy"]  # no policy table: no picture, the rest as before
    old = tmp_path / "old"
    old.mkdir()
    report.write_selftrain_report(old, rows, details, task_name=task.name, mode="filter", optimum=1.0,
                                  config={}, task=task)
    assert sorted(p.name for p in old.iterdir()) == ["incoherence.png", "report.md", "success.png", "tv.png"]


# ---- the loop, with a tiny untrained model (slow: it samples and trains) -----------------------
def _tiny_model_dir(task, path: Path) -> str:
    from conftest import tiny_llama
    from lmcoh.lm.loading import save_model

    loaded = tiny_llama(task)
    save_model(loaded.model, loaded.tokenizer, path, {})
    return str(path)


def _numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


def self_train(*argv) -> Path:
    """Run recipes/self_train.py's loop in this process with ``argv`` (progress bars off)."""
    return recipe("self_train").main(*recipe_args("--disable_tqdm", "true", *argv))


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    task = load_task("lottery")
    model = _tiny_model_dir(task, tmp_path / "model")
    settings = ["--task", "lottery", "--model_name_or_path", model, "--episodes_per_round", 64,
                "--num_train_epochs", 1, "--per_device_train_batch_size", 16, "--mode", "label"]
    straight = self_train(*settings, "--output_dir", tmp_path / "straight", "--rounds", 2)
    resumed = tmp_path / "resumed"
    self_train(*settings, "--output_dir", resumed, "--rounds", 1)
    (resumed / "rounds" / ".tmp-2" / "model").mkdir(parents=True)  # a round killed half-way
    self_train(*settings, "--output_dir", resumed, "--rounds", 2)
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in a] == [r["round"] for r in b] == [0, 1, 2]
    for x, y in zip(_numbers(a), _numbers(b)):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], abs=1e-6), key
    assert a[1]["episodes_sampled"] == 64 and a[1]["episodes_kept"] == 64  # label mode keeps all
    assert set(a[0]) == {"round", "success", "target_success", "tv_to_target", "incoherence",
                         "incoherence_finite_part", "target_incoherence", "token_incoherence", "sampled_success_rate",
                         "episodes_sampled", "episodes_kept", "gradient_steps", "sample_seconds", "train_seconds",
                         "eval_seconds"}
    assert (resumed / "rounds" / "2" / "model" / "adapter_config.json").is_file()
    assert len((resumed / "rounds" / "2" / "episodes.jsonl").read_text().splitlines()) == 64
    assert (resumed / "report.md").is_file() and not (resumed / "rounds" / ".tmp-2").exists()


@pytest.mark.slow
def test_trainer_settings_reach_the_run(tmp_path):
    """A handful of honoured trainer and adapter settings (gradient accumulation, a cosine schedule, Adafactor,
    weight decay, gradient clipping, rsLoRA, TensorBoard): recorded in config.yaml and used."""
    task = load_task("mountain_race")
    out = self_train("--task", "mountain_race", "--model_name_or_path", _tiny_model_dir(task, tmp_path / "model"),
                     "--rounds", 1, "--episodes_per_round", 64, "--gradient_accumulation_steps", 2,
                     "--lr_scheduler_type", "cosine", "--optim", "adafactor", "--weight_decay", "0.01",
                     "--max_grad_norm", "0.5", "--use_rslora", "true", "--report_to", "tensorboard",
                     "--output_dir", tmp_path / "run")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["gradient_accumulation_steps"] == 2 and config["lr_scheduler_type"] == "cosine"
    assert config["optim"] == "adafactor" and config["use_rslora"] is True
    adapter = json.loads((out / "rounds" / "1" / "model" / "adapter_config.json").read_text())
    assert adapter["use_rslora"] is True
    assert config["report_to"] == ["tensorboard"]
    assert list((out / "tensorboard" / "round_1").glob("events.out.tfevents.*"))  # the Trainer's, of round 1
    assert list((out / "tensorboard" / "metrics").glob("events.out.tfevents.*"))  # the run's, a step per round
    assert not (out / "trainer").exists()


# ---- the quality bar (slow): the LM follows exact retraining G^(k+1)(p) -----------------------
def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _config_file(name: str) -> Path:
    return ROOT / "recipes" / "configs" / f"{name}.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["filter", "label"])
def test_mountain_race_success_follows_exact_retraining(mode, mountain_prior, tmp_path):
    out = self_train("--config", _config_file("mountain_race"), "--model_name_or_path", mountain_prior,
                     "--mode", mode, "--rounds", 3, "--output_dir", tmp_path / mode)
    rows = _rows(out)
    targets = [r["target_success"] for r in rows]
    assert targets == pytest.approx([17 / 20, 0.8676, 0.8856, 0.9031], abs=1e-4)
    for r in rows:
        assert abs(r["success"] - r["target_success"]) <= 0.03, r
        assert r["tv_to_target"] <= 0.08, r
    assert all(b["success"] >= a["success"] - 0.03 for a, b in zip(rows, rows[1:]))


@pytest.mark.slow
def test_lottery_follows_retraining_not_temperature(tmp_path):
    task = load_task("lottery")
    out = self_train("--config", _config_file("lottery"), "--rounds", 1, "--output_dir", tmp_path / "lottery")
    gamble = [json.loads((out / "rounds" / str(k) / "eval.json").read_text())["policy"]["desk"]["gamble"]
              for k in (0, 1)]
    retrain = [exact.policy_table(task, pi)["desk"]["gamble"] for pi in exact.sequence(task, "retrain", 2)]
    hot = exact.policy_table(task, exact.temperature_policy(task, 2.0))["desk"]["gamble"]
    assert retrain[1:] == pytest.approx([1 / 6, 1 / 26]) and hot == pytest.approx(2 / 7)
    assert gamble[0] == pytest.approx(1 / 6, abs=0.05)    # the pretrained prior is within 0.05 of G(p)
    assert gamble[1] == pytest.approx(1 / 26, abs=0.03)   # G^2(p), far from temperature's 0.286


def test_the_hub_model_config_reads_a_chat_model_in_bf16_with_lora_everywhere():
    args, sft, model = recipe_args("--config", _config_file("smollm2_chat"))
    assert args.format == "chat" and args.task == "mountain_race" and sft.bf16 is True
    assert model.dtype == "bfloat16" and model.use_peft and model.lora_target_modules == "all-linear"
    assert "SmolLM2-135M-Instruct" in _config_file("smollm2_chat").read_text()


def test_format_and_goal_text_flags():
    args, _, _ = recipe_args("--format", "natural", "--goal_text", "Reach the gold.")
    assert args.format == "natural" and args.goal_text == "Reach the gold."
    assert recipe_args()[0].format == "" and recipe_args()[0].goal_text is None  # the model's own
    with pytest.raises(RunError, match="argument --format: invalid choice 'prose'"):
        recipe_args("--format", "prose")


def test_round_metrics_reach_every_integration_as_one_run_with_a_step_per_round(tmp_path):
    """--report_to tensorboard: the run's own numbers, one step per round, in one TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmcoh.runs.selftrain import Integrations

    _, sft, _ = recipe_args("--report_to", "tensorboard", "--output_dir", tmp_path / "run")
    logs = Integrations(sft, tmp_path / "tb")
    for k, success in enumerate([0.625, 0.85, 0.875]):
        logs.log(k, {"round": k, "success": success, "target_success": 0.85, "tv_to_target": 0.01 * k,
                     "incoherence": "inf", "incoherence_finite_part": 0.25 * k, "success_ci": None})
    logs.close()
    (event_file,) = (tmp_path / "tb").iterdir()
    scalars = EventAccumulator(str(event_file)).Reload()
    assert [(e.step, e.value) for e in scalars.Scalars("eval/success")] == [(0, 0.625), (1, pytest.approx(0.85)),
                                                                             (2, 0.875)]
    assert [e.value for e in scalars.Scalars("eval/incoherence_finite_part")] == [0.0, 0.25, 0.5]
    assert set(scalars.Tags()["scalars"]) == {"eval/success", "eval/target_success", "eval/tv_to_target",
                                              "eval/incoherence_finite_part"}  # inf and None left out
    _, quiet, _ = recipe_args("--output_dir", tmp_path / "run")
    assert Integrations(quiet, tmp_path / "none").callbacks == [] and not (tmp_path / "none").exists()
