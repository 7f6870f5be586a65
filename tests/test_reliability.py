"""Faults are normal: bounded memory, one run per directory, damaged files, divergence, kills at
any moment, hostile configs. Every failure is one line and a nonzero exit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, recipe, recipe_args, recipe_env, tiny_llama
from lmcoh.cli import main as cli
from lmcoh.errors import BudgetError, LmcohError, ModelError, RunError
from lmcoh.io import exclusive
from lmcoh.runs.directory import RunDirectory, resolved_config
from lmcoh.lm.configs import per_device_batch
from lmcoh.runs.selftrain import SelfTraining
from lmcoh.tasks import budget
from lmcoh.tasks.library import load_task

CYCLE = """
name: {name}
horizon: {horizon}
start: a
states:
  a:
    actions:
      stay: {{next: a, success: 0.99}}
      go: {{next: end}}
terminals:
  end: {{success: 1.0}}
"""
CHAIN = """
name: chain
horizon: 1000000000
start: a
states:
  a: {actions: {go: {next: b}}}
  b: {actions: {go: {next: end}, stop: {next: end, success: 0.5}}}
terminals:
  end: {success: 1.0}
"""


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmcoh: error: ") and "\n" not in err, err
    return err


# ---- bounded memory ----------------------------------------------------------------------------
def test_a_huge_horizon_over_a_cycle_is_refused_at_once_in_little_memory(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(CYCLE.format(name="huge", horizon=10 ** 9))
    code = ("import resource, time, sys; from lmcoh.cli import main; t = time.perf_counter(); "
            "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; before = rss(); "
            f"rc = main(['exact', {str(path)!r}]); print(rc, time.perf_counter() - t, rss() - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    rc, seconds, grown_kb = out.stdout.split()  # memory grown past what importing lmcoh took
    assert rc == "2" and float(seconds) < 5 and int(grown_kb) < 1_000_000
    err = out.stderr.strip()
    assert "\n" not in err and "task 'huge' over its horizon of 1000000000 steps needs about" in err
    assert "over the memory limit" in err and "--memory_limit_gb" in err


def test_a_horizon_longer_than_any_path_costs_nothing(tmp_path, capsys):
    path = tmp_path / "chain.yaml"
    path.write_text(CHAIN)
    assert cli(["exact", str(path), "--steps", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # b: go (q = 1) and stop (q = 1/2) under a uniform prior; G(p) takes go w.p. 2/3
    assert result["sequences"]["retrain"][0]["success"] == pytest.approx(3 / 4)
    assert result["sequences"]["retrain"][1]["success"] == pytest.approx(2 / 3 + 1 / 3 * 1 / 2)
    assert load_task(str(path)).steps == 2


@pytest.mark.parametrize("spec", ["random-tree:T=30,A=6", "random-tree:T=14,A=4,stochastic=1"])
def test_generator_specs_past_the_limit_are_refused_before_building(spec, capsys):
    t0 = time.perf_counter()
    assert cli(["exact", spec]) == 2
    err = one_line(capsys)
    assert time.perf_counter() - t0 < 2 and "states) needs about" in err and "--memory_limit_gb GB" in err


def test_the_limit_is_a_flag_and_an_environment_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(budget.ENV, "8")  # restored when the test ends: the flag sets it for the process
    assert cli(["--memory-limit", "0.00001", "exact", "random-tree:T=4,A=3"]) == 2  # the old spelling still works
    assert "over the memory limit of 10.5 KB" in one_line(capsys)
    assert cli(["exact", "random-tree:T=4,A=3", "--memory_limit_gb", "0.00001"]) == 2  # after the command too
    assert "over the memory limit of 10.5 KB" in one_line(capsys)
    monkeypatch.setenv(budget.ENV, "0.00001")
    with pytest.raises(BudgetError, match="over the memory limit"):
        load_task("random-tree:T=4,A=3")
    monkeypatch.setenv(budget.ENV, "64")
    assert load_task("random-tree:T=4,A=3").n_states == 1 + 3 + 9 + 27 + 81
    path = tmp_path / "cycle.yaml"
    path.write_text(CYCLE.format(name="long", horizon=2000))
    assert load_task(str(path)).steps == 2000  # long but within the limit: built
    monkeypatch.setenv(budget.ENV, "lots")
    with pytest.raises(BudgetError, match="LMCOH_MEMORY_LIMIT_GB='lots' is not a number"):
        budget.limit_bytes()


def test_the_oracle_estimates_its_own_run(capsys):
    assert cli(["exact", "mountain_race", "--steps", "1000000000"]) == 2
    assert "the exact oracle on 'mountain_race' over 1000000000 steps needs about" in one_line(capsys)


# ---- one run per directory ---------------------------------------------------------------------
HOLD = ("import sys, time; from lmcoh.io import exclusive\n"
        "with exclusive(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_directory_fails_at_once_naming_the_first(tmp_path, capsys):
    out = tmp_path / "prior"
    holder = _holder(out)
    try:
        t0 = time.perf_counter()
        assert cli(["pretrain", "mountain_race", "--out", str(out), "--quiet"]) == 2
        err = one_line(capsys)
        assert f"is in use by another pretraining (pid {holder.pid})" in err and time.perf_counter() - t0 < 5
        run = RunDirectory(tmp_path / "run")
        config = resolved_config(*recipe_args("--output_dir", run.path))
        holder2 = _holder(run.path)
        with pytest.raises(RunError, match=f"in use by another run .pid {holder2.pid}."):
            with run.opened(_single(), config):
                pass
        assert not run.path.exists()  # refused before writing anything
    finally:
        holder.kill()
        if "holder2" in locals():
            holder2.kill()
    holder.wait()
    holder2.wait()
    with exclusive(out):  # SIGKILL released the lock: nothing stale is left behind
        pass


def _single():
    from accelerate import PartialState

    return PartialState(cpu=True)


# ---- damaged or partial files ------------------------------------------------------------------
def _round(run: RunDirectory, k: int) -> None:
    from safetensors.numpy import save_file

    d = run.round_dir(k)
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"round": k, "success": 0.5 + k / 10}))
    (d / "eval.json").write_text("{}")
    if k:
        (d / "model").mkdir()
        (d / "model" / "adapter_config.json").write_text("{}")
        save_file({"w": np.ones(4, dtype=np.float32)}, str(d / "model" / "adapter_model.safetensors"))


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "metrics.json").write_text('{"round": 2, "succ'), "rounds/2/metrics.json: damaged JSON"),
    (lambda d: (d / "eval.json").unlink(), "rounds/2/eval.json: no such file"),
    (lambda d: (d / "model" / "adapter_model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}"), "damaged"),
    (lambda d: (d / "model" / "adapter_model.safetensors").unlink(), "no adapter weights"),
])
def test_a_damaged_round_is_redone_from_there_with_a_notice(tmp_path, capsys, damage, named):
    run = RunDirectory(tmp_path / "run")
    config = resolved_config(*recipe_args("--output_dir", run.path))
    run.prepare(config)
    for k in range(4):
        _round(run, k)
    damage(run.round_dir(2))
    assert run.prepare(config) == 2
    notice = capsys.readouterr().err.strip()
    assert notice.startswith("notice: ") and named in notice and "redoing rounds 2..3" in notice
    assert "\n" not in notice
    assert sorted(p.name for p in run.rounds.iterdir()) == ["0", "1"]
    assert [json.loads(x)["round"] for x in (run.path / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_a_damaged_config_is_one_line(tmp_path):
    run = RunDirectory(tmp_path / "run")
    config = resolved_config(*recipe_args("--output_dir", run.path))
    run.prepare(config)
    (run.path / "config.yaml").write_text("task: [mountain_race\n")
    with pytest.raises(RunError, match="config.yaml is damaged .not a YAML mapping.; pass --overwrite"):
        run.prepare(config)


# ---- divergence --------------------------------------------------------------------------------
def test_a_model_with_non_finite_weights_is_refused_when_scored(mountain):
    from lmcoh.lm.rollout import sample_episodes
    from lmcoh.lm.tabulate import tabulate

    lm = tiny_llama(mountain)
    with torch.no_grad():
        lm.model.lm_head.weight.fill_(float("nan"))
    for call in (lambda: tabulate(lm, mountain), lambda: sample_episodes(lm, mountain, 4, progress=False)):
        with pytest.raises(ModelError, match="not finite: its weights hold NaN or inf"):
            call()


@pytest.mark.slow
def test_a_diverging_round_stops_the_run_and_writes_nothing(tmp_path):
    from lmcoh.lm.loading import save_model

    task = load_task("mountain_race")
    lm = tiny_llama(task)
    save_model(lm.model, lm.tokenizer, tmp_path / "model", {})
    out = tmp_path / "run"
    argv = ["--task", "mountain_race", "--model_name_or_path", tmp_path / "model", "--rounds", 2,
            "--episodes_per_round", 64, "--learning_rate", "1e30", "--max_grad_norm", "0",
            "--output_dir", out, "--disable_tqdm", "true"]
    with pytest.raises(RunError) as err:
        recipe("self_train").main(*recipe_args(*argv))
    message = str(err.value)  # caught in training (NaN weights, the probe) or when the model is next scored
    assert message.startswith(("round 1: training diverged (", "round 1: the model's action probabilities are not "
                                                              "finite")), message
    assert "the learning rate (1e+30) is the likely cause" in message and "\n" not in message
    assert sorted(p.name for p in (out / "rounds").iterdir()) == ["0"]
    run = RunDirectory(out)
    assert run.prepare(resolved_config(*recipe_args(*argv))) == 1  # round 0 stays resumable
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


# ---- hostile configs ---------------------------------------------------------------------------
FUZZ = [
    "- a\n- b\n", "just a string\n", "42\n", "null\n", "task: [\n", "\t- x: y\n", "rounds: {a: 1}\n",
    "rounds: [1, 2]\n", "rounds: 1.5\n", "rounds: -3\n", "rounds: 'many'\n", "rounds: .inf\n",
    "episodes_per_round: 0\n", "episodes_per_round: -10\n", "episodes_per_round: 1e400\n",
    "sample_batch_size: 0\n", "pretrain_episodes: -1\n", "pretrain_epochs: 0\n", "pretrain_epochs: .nan\n",
    "delta: -1\n", "delta: 0\n", "max_histories: 0\n", "eval_episodes: -5\n", "global_batch_size: -64\n",
    "memory_limit_gb: 0\n", "memory_limit_gb: -1\n", "mode: best\n", "mode: [filter]\n", "prompt: full\n",
    "overwrite: maybe\n", "overwrite: [true]\n", "task: ''\n", "task: no_such_task\n",
    "task: /no/such/file.yaml\n", "task: 'random-tree:T=0'\n", "task: 'random-tree:T=40,A=8'\n",
    "task: 'gridworld:size=99'\n", "learning_rate: -0.1\n", "learning_rate: fast\n", "learning_rate: [0.1]\n",
    "num_train_epochs: 0\n", "num_train_epochs: -1\n", "per_device_train_batch_size: 0\n",
    "per_device_train_batch_size: 2.5\n", "gradient_accumulation_steps: 0\n", "lr_scheduler_type: wavy\n",
    "optim: sgdd\n", "seed: x\n", "bf16: perhaps\n", "report_to: [1, 2]\n", "lora_r: 0\n", "lora_r: -8\n",
    "lora_alpha: 0\n", "lora_dropout: 1.0\n", "lora_dropout: -0.1\n", "dtype: float8\n",
    "model_name_or_path: /no/such/model\n", "model_name_or_path: ./relative/missing\n", "use_peft: sometimes\n",
    "learnin_rate: 0.1\n", "env: [1]\n", "output_dir: {out}/file.txt\n", "global_batch_size: 63\n",
]


def test_sixty_malformed_configs_fail_in_one_line_before_any_work(tmp_path, monkeypatch):
    """Each fails while parsing or checking the inputs: no traceback type but LmcohError, no directory."""
    assert len(FUZZ) >= 60
    (tmp_path / "file.txt").write_text("not a directory")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for i, text in enumerate(FUZZ):
        config = tmp_path / f"c{i}.yaml"
        config.write_text(text.replace("{out}", str(tmp_path)))
        with pytest.raises(LmcohError) as err:
            out = [] if "output_dir" in text else ["--output_dir", tmp_path / f"run{i}"]
            args = recipe_args("--config", config, *out)
            SelfTraining(*args)
            per_device_batch(args[1].global_batch_size, 2)  # two processes: 63 does not split
        message = str(err.value)
        assert message and "\n" not in message and "Traceback" not in message, (text, message)
        assert not (tmp_path / f"run{i}").exists(), text


@pytest.mark.slow
def test_a_recipe_refuses_a_hostile_config_in_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("rounds: [1, 2]\n")
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "self_train.py"), "--config", str(config),
                          "--output_dir", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, env=recipe_env())
    assert run.returncode == 2 and not (tmp_path / "out").exists()
    assert run.stderr.strip() == "self_train: error: rounds must be a single value, not a list"


# ---- killed at any moment ----------------------------------------------------------------------
SMALL = ["--task", "mountain_race", "--rounds", "2", "--episodes_per_round", "64", "--pretrain_episodes", "64",
         "--pretrain_epochs", "1", "--num_train_epochs", "1", "--disable_tqdm", "true"]


def _killed_at(point: str, script: str, argv: list) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / script), *map(str, argv)], capture_output=True,
                         text=True, cwd=ROOT, env={**recipe_env(), "LMCOH_CRASH_AT": point})
    assert run.returncode == -signal.SIGKILL, (point, run.returncode, run.stderr[-2000:])


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k and "break_even" not in k} for r in rows]


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(_without_seconds(a), _without_seconds(b)):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], abs=1e-6), key


@pytest.mark.slow
def test_self_training_killed_at_every_stage_resumes_to_the_same_metrics(tmp_path):
    straight = recipe("self_train").main(*recipe_args(*SMALL, "--output_dir", tmp_path / "straight"))
    out = tmp_path / "killed"
    for point in ("pretrain", "evaluate", "write_round", "sample", "train", "report"):
        _killed_at(point, "self_train.py", [*SMALL, "--output_dir", out])
    recipe("self_train").main(*recipe_args(*SMALL, "--output_dir", out))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    _same([json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()], rows)
    assert [r["round"] for r in rows] == [0, 1, 2] and (out / "report.md").is_file()
    assert not list(out.glob(".prior.tmp-*")) and not list((out / "rounds").glob(".tmp-*"))


@pytest.mark.slow
def test_pretrain_killed_while_training_and_saving_resumes_to_the_same_weights(tmp_path):
    from safetensors.numpy import load_file

    argv = ["-m", "lmcoh", "pretrain", "mountain_race", "--episodes", "64", "--epochs", "2", "--quiet"]
    for point in ("train", "save_model"):
        run = subprocess.run([sys.executable, *argv, "--out", str(tmp_path / "killed")], capture_output=True,
                             text=True, cwd=ROOT, env={**os.environ, "LMCOH_CRASH_AT": point})
        assert run.returncode == -signal.SIGKILL and not (tmp_path / "killed").exists(), point
    for name in ("killed", "straight"):
        assert cli(["pretrain", "mountain_race", "--episodes", "64", "--epochs", "2", "--quiet",
                    "--out", str(tmp_path / name)]) == 0
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("killed", "straight"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".killed.tmp-*"))


@pytest.mark.slow
def test_the_comparison_killed_midway_resumes_to_the_same_numbers(tmp_path):
    from lmcoh.runs.arguments import TemperatureArguments

    argv = ["--task", "lottery", "--rounds", "1", "--episodes_per_round", "64", "--pretrain_episodes", "64",
            "--pretrain_epochs", "1", "--num_train_epochs", "1", "--rejection_episodes", "100",
            "--disable_tqdm", "true"]
    module = recipe("temperature_vs_retraining")
    straight = module.main(*recipe_args(*argv, "--output_dir", tmp_path / "straight", script_type=TemperatureArguments))
    for point in ("train", "compare"):
        _killed_at(point, "temperature_vs_retraining.py", [*argv, "--output_dir", tmp_path / "killed"])
    killed = module.main(*recipe_args(*argv, "--output_dir", tmp_path / "killed", script_type=TemperatureArguments))
    rows = [json.loads((d / "comparison.json").read_text())["rows"] for d in (straight, killed)]
    _same(*rows)
    assert not (tmp_path / "killed.partial").exists()


KLRL_SMALL = ["--task", "mountain_race", "--max_steps", "6", "--evaluate_every", "2", "--global_batch_size", "8",
              "--disable_tqdm", "true"]


@pytest.mark.slow
def test_kl_rl_killed_at_every_stage_resumes_to_the_same_metrics(tmp_path, mountain_prior):
    """Killed while training (step 3), writing an evaluation, then writing the report: the resumed
    run's evaluations are the uninterrupted run's, to the last digit but the seconds."""
    from lmcoh.runs.arguments import parse
    from lmcoh.runs.klrl import make_klrl_parser

    argv = [*KLRL_SMALL, "--model_name_or_path", mountain_prior]
    straight = recipe("kl_rl").main(*parse(make_klrl_parser(), [*argv, "--output_dir", str(tmp_path / "straight")]))
    out = tmp_path / "killed"
    for point in ("train:3", "write_round:2", "report"):
        _killed_at(point, "kl_rl.py", [*argv, "--output_dir", out])
    recipe("kl_rl").main(*parse(make_klrl_parser(), [*argv, "--output_dir", str(out)]))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert _without_seconds(rows) == _without_seconds(expected)
    assert (out / "report.md").is_file() and not list((out / "rounds").glob(".tmp-*"))
