"""Iterated self-training: the LM retrains on its own successful episodes, round after round.

THEORY.md, "Re-training on own samples": pi_0 = p, pi_{k+1} = G(pi_k). In a language model:

* round 0 is the pretrained prior prompted with ``<success>``, which approximates G(p);
* round k = 1..K samples ``episodes_per_round`` episodes from the current success-prompted
  model, keeps the successful ones (``filter``) or keeps all with their outcome token
  (``label``), fine-tunes the LoRA adapter (continuing from round k-1) on them with TRL's
  SFTTrainer, and evaluates the success-prompted model exactly against the oracle's target
  G^(k+1)(p).

Output directory::

    config.yaml      the resolved config (a rerun with a different one is refused)
    prior/           the built-in pretrained prior, when no --model is given
    rounds/k/        metrics.json, eval.json (the full evaluation), episodes.jsonl, adapter/
    metrics.jsonl    one line per complete round (rebuilt from rounds/ on resume)
    report.md, *.png the report (lmcoh.report)

A round is written to ``rounds/.tmp-k`` and renamed to ``rounds/k`` when complete, so a run
killed at any moment resumes after its last complete round. Every round starts by reseeding
from (seed, round) and loading the model from disk, so a resumed run computes exactly what
an uninterrupted one does.

Data parallel: under ``accelerate launch`` / ``torchrun`` each process samples its share of
the episodes with its own seed, the shares are gathered, the Trainer runs its own DDP, and
only the main process evaluates and writes files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import yaml

from . import exact, text
from .task import Task

MODES = ("filter", "label")
REPORT_TO = ("none", "tensorboard")
# Fields that do not change what a run computes: a rerun may change them and still resume.
RUN_NEUTRAL = ("rounds", "overwrite", "report_to", "progress")


class SelfTrainError(ValueError):
    """A bad self-training config or output directory; the message is one line for the user."""


def _help(text_: str) -> dict:
    return {"help": text_}


@dataclass
class SelfTrainConfig:
    """Everything one self-training run depends on. ``--config FILE.yaml`` sets any of these."""

    task: str = field(default="mountain_race", metadata=_help(
        "Task: a built-in name (tasks/NAME.yaml) or a path to a task YAML."))
    model: str | None = field(default=None, metadata=_help(
        "Model directory to self-train. Unset: pretrain the built-in prior for the task first "
        "(cached in OUTPUT_DIR/prior)."))
    output_dir: str = field(default="outputs/self_train", metadata=_help(
        "Where config.yaml, metrics.jsonl, rounds/k/ and report.md go."))
    overwrite: bool = field(default=False, metadata=_help(
        "Delete OUTPUT_DIR and start over instead of resuming."))
    rounds: int = field(default=4, metadata=_help(
        "Training rounds K (round 0, the untrained prior, is evaluated too)."))
    episodes_per_round: int = field(default=2000, metadata=_help(
        "Episodes sampled per round, over all processes."))
    mode: str = field(default="filter", metadata=_help(
        "filter: train on the successful episodes; label: train on all, each with its outcome token."))
    seed: int = field(default=0, metadata=_help(
        "Seeds everything; round k of process r samples with a seed derived from (seed, k, r)."))
    prompt: str = field(default="history", metadata=_help(
        "Prompt mode: history (the whole transcript) or markov (current state and step only)."))
    sample_batch_size: int = field(default=256, metadata=_help("Episodes sampled in one batch."))
    # LoRA (peft, target_modules="all-linear")
    lora_r: int = field(default=8, metadata=_help("LoRA rank."))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA alpha (scale = alpha / r)."))
    lora_dropout: float = field(default=0.0, metadata=_help("LoRA dropout."))
    # SFTConfig settings of each round's fine-tuning
    num_train_epochs: float = field(default=2.0, metadata=_help("Epochs over each round's episodes."))
    learning_rate: float = field(default=2e-3, metadata=_help("Learning rate of each round."))
    per_device_train_batch_size: int = field(default=64, metadata=_help("Batch size per process."))
    report_to: str = field(default="none", metadata=_help(
        "none or tensorboard (logs under OUTPUT_DIR/tensorboard/round_k)."))
    # Built-in prior (used when --model is unset)
    pretrain_episodes: int = field(default=4000, metadata=_help("Episodes to pretrain the prior on."))
    pretrain_epochs: float = field(default=3.0, metadata=_help("Epochs to pretrain the prior for."))
    # Evaluation
    delta: float = field(default=1.0, metadata=_help("Incoherence temperature delta."))
    max_histories: int = field(default=200_000, metadata=_help(
        "Tabulate exactly up to this many histories; beyond, estimate success by Monte Carlo."))
    eval_episodes: int = field(default=2000, metadata=_help(
        "Episodes for the Monte Carlo success estimate of tasks too big to tabulate."))
    progress: bool = field(default=True, metadata=_help("Show progress bars."))

    def resolved(self) -> dict:
        """The config as plain YAML-able values (written to OUTPUT_DIR/config.yaml)."""
        return asdict(self)


_POSITIVE_INT = ("episodes_per_round", "sample_batch_size", "lora_r", "per_device_train_batch_size",
                 "pretrain_episodes", "max_histories", "eval_episodes")
_POSITIVE_FLOAT = ("lora_alpha", "num_train_epochs", "learning_rate", "pretrain_epochs", "delta")


def _coerce(name: str, value, kind: type):
    """YAML and config values arrive loosely typed (``2e-3`` is a string in YAML 1.1)."""
    if value is None or kind not in (int, float, bool):
        return value
    if isinstance(value, bool) != (kind is bool):
        raise SelfTrainError(f"{name} must be {'true or false' if kind is bool else 'a number'}, got {value!r}")
    try:
        return kind(value) if kind is not int or isinstance(value, int) else int(str(value))
    except ValueError:
        raise SelfTrainError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def validate(cfg: SelfTrainConfig) -> SelfTrainConfig:
    """Coerce values to their field types and check them; `SelfTrainError` names the first bad one."""
    for f in fields(cfg):
        kind = {"int": int, "float": float, "bool": bool}.get(str(f.type).removeprefix("<class '").rstrip("'>"))
        setattr(cfg, f.name, _coerce(f.name, getattr(cfg, f.name), kind))
    for name in _POSITIVE_INT + _POSITIVE_FLOAT:
        value = getattr(cfg, name)
        if not value > 0 or not math.isfinite(value):
            raise SelfTrainError(f"{name} must be positive, got {value!r}")
    if cfg.rounds < 0:
        raise SelfTrainError(f"rounds must be >= 0, got {cfg.rounds}")
    if not 0 <= cfg.lora_dropout < 1:
        raise SelfTrainError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    for name, options in (("mode", MODES), ("prompt", text.PROMPT_MODES), ("report_to", REPORT_TO)):
        if getattr(cfg, name) not in options:
            raise SelfTrainError(f"{name} must be one of {', '.join(options)}, got {getattr(cfg, name)!r}")
    if not cfg.task:
        raise SelfTrainError("task is required (a built-in name or a task YAML path)")
    if cfg.model is not None and not Path(cfg.model).is_dir():
        raise SelfTrainError(f"model directory {cfg.model} does not exist")
    if cfg.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise SelfTrainError("report_to=tensorboard needs the tensorboard package "
                                 "(pip install tensorboard)") from None
    return cfg


# ---- seeds -------------------------------------------------------------------------------------
def round_seed(seed: int, round_: int, rank: int = 0) -> int:
    """A 31-bit seed for (seed, round, process rank), independent across all three."""
    return int(np.random.SeedSequence([seed, round_, rank]).generate_state(1)[0] >> 1)


def shard_sizes(n: int, world: int) -> list[int]:
    """Split n episodes over ``world`` processes as evenly as possible (earlier ranks get more)."""
    return [n // world + (r < n % world) for r in range(world)]


# ---- the output directory --------------------------------------------------------------------
def check_output_dir(cfg: SelfTrainConfig) -> None:
    """Refuse (SelfTrainError) an OUTPUT_DIR that holds something else or a run with another config.

    Fields in ``RUN_NEUTRAL`` may differ: raising ``rounds`` continues a finished run.
    """
    out = Path(cfg.output_dir)
    if cfg.overwrite or not out.exists():
        return
    if not out.is_dir():
        raise SelfTrainError(f"output_dir {out} exists and is not a directory")
    saved = out / "config.yaml"
    if not saved.is_file():
        if any(out.iterdir()):
            raise SelfTrainError(f"output_dir {out} is not empty and holds no self-training run; "
                                 "choose another --output_dir or pass --overwrite")
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = cfg.resolved()
    for key in new:
        if key not in RUN_NEUTRAL and old.get(key) != new[key]:
            raise SelfTrainError(f"output_dir {out} holds a run with a different config "
                                 f"({key}: {old.get(key)!r} there, {new[key]!r} now); "
                                 "pass --overwrite to start over or choose another --output_dir")


def prepare_output_dir(cfg: SelfTrainConfig) -> int:
    """Create OUTPUT_DIR (emptied first with ``overwrite``), discard partial rounds, write
    config.yaml, rebuild metrics.jsonl from rounds/ and return the number of complete rounds."""
    check_output_dir(cfg)
    out = Path(cfg.output_dir)
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    (out / "rounds").mkdir(parents=True, exist_ok=True)
    for partial in (out / "rounds").glob(".tmp-*"):
        shutil.rmtree(partial)
    _atomic_write(out / "config.yaml", yaml.safe_dump(cfg.resolved(), sort_keys=False))
    done = complete_rounds(out)
    _atomic_write(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in done))
    return len(done)


def complete_rounds(out: Path) -> list[dict]:
    """The metrics of rounds 0, 1, ... that are complete, stopping at the first gap."""
    rows = []
    while (out / "rounds" / str(len(rows)) / "metrics.json").is_file():
        rows.append(json.loads((out / "rounds" / str(len(rows)) / "metrics.json").read_text()))
    return rows


def _atomic_write(path: Path, content: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


# ---- one round ---------------------------------------------------------------------------------
def training_texts(task: Task, episodes, mode: str) -> tuple[list[str], list[str]]:
    """(prompts, completions) for SFT: the goal token as prompt, the transcript as completion.

    ``filter`` keeps successful episodes under ``<success>``; ``label`` keeps every episode
    under its own outcome token. The completion is what the loss is computed on.
    """
    prompts, completions = [], []
    for ep in episodes:
        if mode == "filter" and not ep.success:
            continue
        goal = "success" if ep.success else "failure"
        prompts.append(text.goal_prefix(goal))
        completions.append(text.episode_text(task, "none", ep.states, ep.actions))
    return prompts, completions


def evaluate_round(cfg: SelfTrainConfig, loaded, task: Task, target: exact.Policy, seed: int) -> dict:
    """Tabulate the success-prompted model and compare it with the exact ``target`` G^(k+1)(p).

    Returns ``{"metrics": ..., "eval": ...}``: the metrics.jsonl values, and the full
    `lmcoh evaluate` object. Tasks with more than ``max_histories`` histories get a Monte Carlo
    success estimate (``seed``) with ``success_ci`` and no targets.
    """
    from .metrics import report
    from .policy import tabulate

    lm = tabulate(loaded, task, "success", mode=cfg.prompt, max_histories=cfg.max_histories,
                  batch_size=cfg.sample_batch_size, mc_episodes=cfg.eval_episodes, seed=seed)
    detail = report(task, lm, "success", cfg.delta)
    metrics = {"success": detail["success"], "incoherence": detail["incoherence"],
               "token_incoherence": detail["token_incoherence"]["total"]}
    if lm.exact:
        metrics.update({"target_success": exact.success(task, target),
                        "tv_to_target": exact.tv_distance(task, lm.policy, target),
                        "target_incoherence": exact.json_number(exact.incoherence(task, target, cfg.delta))})
    else:
        metrics.update({"success_ci": detail["success_ci"], "target_success": None, "tv_to_target": None,
                        "target_incoherence": None, "incoherence": None, "token_incoherence": None})
    return {"metrics": metrics, "eval": detail}


def _metrics_line(round_: int, evaluation: dict, episodes: list, kept: int,
                  seconds: tuple[float, float, float]) -> dict:
    """The metrics.jsonl line of one round (issue 5's fields, in its order)."""
    m = evaluation["metrics"]
    line = {"round": round_, "success": m["success"]}
    if m.get("success_ci") is not None:
        line["success_ci"] = m["success_ci"]
    line.update({
        "target_success": m["target_success"], "tv_to_target": m["tv_to_target"],
        "incoherence": m["incoherence"], "target_incoherence": m["target_incoherence"],
        "token_incoherence": m["token_incoherence"],
        "sampled_success_rate": (float(np.mean([ep.success for ep in episodes])) if episodes else None),
        "episodes_sampled": len(episodes), "episodes_kept": kept,
        "sample_seconds": seconds[0], "train_seconds": seconds[1], "eval_seconds": seconds[2]})
    return line


def main(cfg: SelfTrainConfig) -> Path:
    """Run (or resume) self-training; returns the output directory. Raises SelfTrainError,
    TaskError or ModelError, each with a one-line message, before any work when the input is bad."""
    validate(cfg)
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from transformers import set_seed

    from .library import load_task
    from .model import check_task_fits, load_model
    from .pretrain import pretrain
    from .rollout import sample_episodes
    from .training import train_sft

    task = load_task(cfg.task)
    if cfg.model is not None:
        check_task_fits(load_model(cfg.model), task)
    proc = PartialState(cpu=not torch.cuda.is_available())  # cpu: gloo under torchrun / accelerate
    out = Path(cfg.output_dir)
    check_output_dir(cfg)
    if proc.is_main_process:
        prepare_output_dir(cfg)
    proc.wait_for_everyone()
    first = len(complete_rounds(out))

    base = cfg.model or str(out / "prior")
    if cfg.model is None and not (out / "prior").is_dir():
        _say(proc, f"pretraining the built-in prior for {task.name} into {base}")
        pretrain(task, base, episodes=cfg.pretrain_episodes, epochs=cfg.pretrain_epochs, seed=cfg.seed,
                 progress=cfg.progress)
        proc.wait_for_everyone()

    targets = exact.sequence(task, "retrain", cfg.rounds + 1)
    for k in range(first, cfg.rounds + 1):
        set_seed(round_seed(cfg.seed, k))
        tmp = out / "rounds" / f".tmp-{k}"
        loaded = load_model(base)
        episodes, kept, t_sample, t_train = [], 0, 0.0, 0.0
        if k > 0:
            loaded.model = _lora_model(cfg, loaded.model, out / "rounds" / str(k - 1) / "adapter" if k > 1 else None)
            t0 = time.perf_counter()
            n_local = shard_sizes(cfg.episodes_per_round, proc.num_processes)[proc.process_index]
            episodes = sample_episodes(loaded, task, n_local, goal="success", mode=cfg.prompt,
                                       seed=round_seed(cfg.seed, k, proc.process_index),
                                       batch_size=cfg.sample_batch_size,
                                       progress=cfg.progress and proc.is_main_process)
            if proc.num_processes > 1:
                episodes = gather_object(episodes)
            t1 = time.perf_counter()
            prompts, completions = training_texts(task, episodes, cfg.mode)
            kept = len(prompts)
            if not kept:
                raise SelfTrainError(f"round {k}: none of the {len(episodes)} sampled episodes succeeded; "
                                     "raise episodes_per_round or use --mode label")
            with _tensorboard_dir(cfg, out / "tensorboard" / f"round_{k}"):
                train_sft(loaded.model, loaded.tokenizer, prompts, completions,
                          epochs=cfg.num_train_epochs, learning_rate=cfg.learning_rate,
                          batch_size=cfg.per_device_train_batch_size, seed=round_seed(cfg.seed, k),
                          output_dir=str(out / "trainer"), report_to=cfg.report_to,
                          progress=cfg.progress)
            t_sample, t_train = t1 - t0, time.perf_counter() - t1
        if proc.is_main_process:
            t2 = time.perf_counter()
            evaluation = evaluate_round(cfg, loaded, task, targets[k + 1], round_seed(cfg.seed, k, 1 << 16))
            line = _metrics_line(k, evaluation, episodes, kept,
                                 (t_sample, t_train, time.perf_counter() - t2))
            _write_round(out, tmp, k, task, loaded, episodes, line, evaluation["eval"])
            _say(proc, _summary(line, cfg.rounds))
        proc.wait_for_everyone()

    if proc.is_main_process:
        shutil.rmtree(out / "trainer", ignore_errors=True)
        _say(proc, f"report: {write_run_report(cfg, task)}")
    return out


def _lora_model(cfg: SelfTrainConfig, model, previous: Path | None):
    """Round 1 adds a fresh LoRA adapter; later rounds continue training the previous round's."""
    if previous is None:
        from .model import add_lora
        return add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    from peft import PeftModel
    return PeftModel.from_pretrained(model, str(previous), is_trainable=True)


class _tensorboard_dir:
    """Point the Trainer's TensorBoard callback at OUTPUT_DIR/tensorboard/round_k for one round."""

    def __init__(self, cfg: SelfTrainConfig, path: Path):
        self.path = str(path) if cfg.report_to == "tensorboard" else None

    def __enter__(self):
        if self.path:
            self.saved = os.environ.get("TENSORBOARD_LOGGING_DIR")
            os.environ["TENSORBOARD_LOGGING_DIR"] = self.path

    def __exit__(self, *exc):
        if self.path:
            if self.saved is None:
                os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
            else:
                os.environ["TENSORBOARD_LOGGING_DIR"] = self.saved


def _write_round(out: Path, tmp: Path, k: int, task: Task, loaded, episodes, line: dict,
                 detail: dict) -> None:
    """Write round k into rounds/.tmp-k, rename it to rounds/k, then append the metrics line."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if k > 0:
        from .model import save_model
        save_model(loaded.model, loaded.tokenizer, tmp / "adapter",
                   {**loaded.meta, "selftrain": {"round": k, "task": task.name}})
        with open(tmp / "episodes.jsonl", "w") as fh:
            for ep in episodes:
                fh.write(json.dumps(ep.to_json(task)) + "\n")
    (tmp / "eval.json").write_text(json.dumps(detail))
    (tmp / "metrics.json").write_text(json.dumps(line))
    os.replace(tmp, out / "rounds" / str(k))
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")


def _summary(line: dict, rounds: int) -> str:
    def f(x):
        return x if isinstance(x, str) or x is None else f"{x:.4f}"
    return (f"round {line['round']}/{rounds}: success {f(line['success'])} "
            f"(target {f(line['target_success'])}), tv_to_target {f(line['tv_to_target'])}, "
            f"incoherence {f(line['incoherence'])}, kept {line['episodes_kept']}/{line['episodes_sampled']}, "
            f"{line['sample_seconds']:.1f}s sample, {line['train_seconds']:.1f}s train, "
            f"{line['eval_seconds']:.1f}s eval")


def _say(proc, message: str) -> None:
    if proc.is_main_process:
        print(message, flush=True)


def write_run_report(cfg: SelfTrainConfig, task: Task) -> Path:
    """report.md and plots for the rounds complete in OUTPUT_DIR."""
    from .report import write_selftrain_report

    out = Path(cfg.output_dir)
    rows = complete_rounds(out)
    details = [json.loads((out / "rounds" / str(r["round"]) / "eval.json").read_text()) for r in rows]
    return write_selftrain_report(out, rows, details, task_name=task.name, mode=cfg.mode,
                                  optimum=exact.optimal_success(task), config=cfg.resolved())
