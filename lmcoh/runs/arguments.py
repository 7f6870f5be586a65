"""The recipes' arguments, parsed the way TRL's own scripts parse theirs.

A recipe is configured by three dataclasses: its own (`SelfTrainArguments`,
`TemperatureArguments`), TRL's `SFTConfig` (every trainer setting) and TRL's `ModelConfig`
(the model and its LoRA adapter), the last two as lmcoh.lm.configs redeclares their defaults. `parse` reads them with a `TrlParser`, so
``--config FILE.yaml`` sets any field and a flag overrides the file. Fields are typed by
the parser; the checks live in ``__post_init__``.

Beyond TRL's parser, values from the YAML file are checked against each field's type and
choices before any work starts, and every problem (an unknown key, a wrong type, a bad
value) ends as one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LmcohError, RunError, first_line
from ..flags import OneSpelling, Suggestions, closest, one_line_name
from ..lm.pretrain import DEFAULTS
from ..lm.text import FORMATS, PROMPT_MODES
from ..oracle import klrl

MODES = ("filter", "label")
REWARDS = tuple(klrl.REWARDS.values())  # KL-RL's R: sum of log q, or the episode's outcome
REFERENCES = ("model", "task")  # whose prior the exact KL-RL target regularises towards


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class RunArguments:
    """The settings every policy-training recipe shares: the task, how its episodes are written, the
    built-in prior, how the policy is evaluated, the run directory. The trainer's settings are its
    TRL config's (``output_dir`` and ``seed`` included), the model's and LoRA's `ModelConfig`'s."""

    task: str = field(default="mountain_race", metadata=_help(
        "Task: a built-in name (tasks/NAME.yaml), a task YAML path or a generator spec."))
    prompt: str = field(default="history", metadata=_help(
        "Prompt mode: history (the whole transcript) or markov (current state and step only).",
        choices=PROMPT_MODES))
    format: str = field(default="", metadata=_help(
        "Text format: compact, natural or chat (the tokenizer's chat template); empty: the model's own "
        "(compact for the built-in prior).", choices=("", *FORMATS)))
    goal_text: str | None = field(default=None, metadata=_help(
        "A statement of the success goal written in place of the <success> token; unset: the model's own."))
    sample_batch_size: int = field(default=256, metadata=_help("Episodes sampled in one batch."))
    pretrain_episodes: int = field(default=DEFAULTS["built-in"]["episodes"], metadata=_help(
        "Episodes to pretrain the built-in prior on (when model_name_or_path is empty)."))
    pretrain_epochs: float = field(default=DEFAULTS["built-in"]["epochs"], metadata=_help(
        "Epochs to pretrain the built-in prior for."))
    max_histories: int = field(default=200_000, metadata=_help(
        "Tabulate exactly up to this many histories; beyond, estimate success by Monte Carlo."))
    eval_episodes: int = field(default=2000, metadata=_help(
        "Episodes for the Monte Carlo success estimate of tasks too big to tabulate."))
    overwrite: bool = field(default=False, metadata=_help(
        "Delete output_dir and start over instead of resuming."))
    memory_limit_gb: float | None = field(default=None, metadata=_help(
        "Refuse tasks and oracle runs estimated to need more memory than this (default: half the "
        "machine's memory, at most 8 GB)."))

    def __post_init__(self):
        if not self.task:
            raise RunError("task is required (a built-in name, a task YAML path or a generator spec)")
        for name in ("sample_batch_size", "pretrain_episodes", "max_histories", "eval_episodes"):
            _check(name, getattr(self, name), lambda v: v >= 1, "must be >= 1")
        if self.memory_limit_gb is not None:
            _check("memory_limit_gb", self.memory_limit_gb, lambda v: v > 0 and math.isfinite(v), "must be positive")
        _check("pretrain_epochs", self.pretrain_epochs, lambda v: v > 0 and math.isfinite(v), "must be positive")
        for name, options in (("prompt", PROMPT_MODES), ("format", ("", *FORMATS))):
            if getattr(self, name) not in options:
                raise RunError(f"{name} must be one of {', '.join(options)}, got {getattr(self, name)!r}")


@dataclass
class SelfTrainArguments(RunArguments):
    """The self-training loop's own settings."""

    rounds: int = field(default=4, metadata=_help(
        "Training rounds K (round 0, the untrained prior, is evaluated too)."))
    episodes_per_round: int = field(default=2000, metadata=_help(
        "Episodes sampled per round, over all processes."))
    mode: str = field(default="filter", metadata=_help(
        "filter: train on the successful episodes; label: train on all, each behind its outcome token.",
        choices=MODES))
    delta: float = field(default=1.0, metadata=_help("Incoherence temperature delta."))

    def __post_init__(self):
        super().__post_init__()
        _check("episodes_per_round", self.episodes_per_round, lambda v: v >= 1, "must be >= 1")
        _check("delta", self.delta, lambda v: v > 0 and math.isfinite(v), "must be positive")
        _check("rounds", self.rounds, lambda v: v >= 0, "must be >= 0")
        if self.mode not in MODES:
            raise RunError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass
class KLRLArguments(RunArguments):
    """The KL-regularised RL run's own settings; its KL coefficient is the trainer's ``beta``."""

    reward: str = field(default="log_q", metadata=_help(
        "The episode's reward R: log_q (sum of log max(q, epsilon)) or success (the sampled outcome, 1 or 0).",
        choices=REWARDS))
    q_floor: float = field(default=1e-3, metadata=_help(
        "epsilon of R = sum log max(q, epsilon): a q = 0 event costs log epsilon, not -inf (named apart from "
        "GRPOConfig's epsilon, its clipping range)."))
    evaluate_every: int = field(default=50, metadata=_help(
        "Tabulate the policy exactly, write an evaluation and a checkpoint every this many optimiser steps."))
    kappa_delta: float = field(default=1.0, metadata=_help(
        "Incoherence temperature delta (named apart from GRPOConfig's delta, its clipping bound)."))
    reference: str = field(default="model", metadata=_help(
        "The prior p of the exact target, the optimum of E[R] - beta KL(pi || p): model, the policy the run "
        "starts from and regularises towards (the model with no goal, tabulated), or task, the task's prior.",
        choices=REFERENCES))

    def __post_init__(self):
        super().__post_init__()
        _check("evaluate_every", self.evaluate_every, lambda v: v >= 1, "must be >= 1")
        _check("q_floor", self.q_floor, lambda v: 0 < v < 1, "must be in (0, 1)")
        _check("kappa_delta", self.kappa_delta, lambda v: v > 0 and math.isfinite(v), "must be positive")
        for name, options in (("reward", REWARDS), ("reference", REFERENCES)):
            if getattr(self, name) not in options:
                raise RunError(f"{name} must be one of {', '.join(options)}, got {getattr(self, name)!r}")


@dataclass
class TemperatureArguments(SelfTrainArguments):
    """The comparison's settings; the self-training ones apply to the self-training run made
    here when ``selftrain_dir`` is unset."""

    task: str = field(default="lottery", metadata=_help(
        "Task: a built-in name (tasks/NAME.yaml), a task YAML path or a generator spec."))
    rounds: int = field(default=3, metadata=_help(
        "Self-training rounds R; the comparison covers k = 0..R+1 (round r's model is G^(r+1)(p))."))
    selftrain_dir: str | None = field(default=None, metadata=_help(
        "Reuse this self_train.py output directory (its complete rounds, up to R) instead of "
        "self-training here."))
    rejection_episodes: int = field(default=2000, metadata=_help(
        "Episodes rejection sampling must accept at each k."))
    max_proposals: int = field(default=200_000, metadata=_help(
        "Most episodes rejection sampling may draw from the prior LM at one k."))
    klrl_k: list[int] = field(default_factory=lambda: [2], metadata=_help(
        "The k at which KL-regularised RL (beta = 1/k, recipes/kl_rl.py) trains the prior LM, once with "
        "R = sum log q and once with R = success."))
    klrl_max_steps: int = field(default=300, metadata=_help(
        "Optimiser steps of each KL-RL run; 0: no KL-RL runs (its exact columns stay)."))
    klrl_global_batch_size: int = field(default=32, metadata=_help("Episodes per optimiser step of KL-RL."))
    klrl_learning_rate: float = field(default=1e-3, metadata=_help("The peak learning rate of KL-RL."))
    klrl_q_floor: float = field(default=1e-3, metadata=_help(
        "epsilon of KL-RL's R = sum log max(q, epsilon) (exact and LM)."))

    def __post_init__(self):
        super().__post_init__()
        for name in ("rejection_episodes", "max_proposals", "klrl_global_batch_size"):
            _check(name, getattr(self, name), lambda v: v >= 1, "must be >= 1")
        _check("klrl_max_steps", self.klrl_max_steps, lambda v: v >= 0, "must be >= 0")
        _check("klrl_learning_rate", self.klrl_learning_rate, lambda v: v > 0 and math.isfinite(v), "must be positive")
        _check("klrl_q_floor", self.klrl_q_floor, lambda v: 0 < v < 1, "must be in (0, 1)")
        for k in self.klrl_k:
            _check("klrl_k", k, lambda v: 1 <= v <= self.rounds + 1, f"must list k in 1..rounds + 1 = {self.rounds + 1}")


def _check(name: str, value, ok, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise RunError(f"{name} {what}, got {value!r}")


# What the loop sets in each round's `SFTConfig`, whatever the user's config says (shown by --help).
LOOP_OVERRIDES = {
    "output_dir": "OUTPUT_DIR/trainer/round_K (the Trainer's scratch, deleted after the round; "
                  "the round's model is saved to OUTPUT_DIR/rounds/K/model)",
    "seed": "derived from (seed, K), so every round draws fresh but reproducible randomness",
    "data_seed": "the same as seed when unset",
    "TensorBoard": "the Trainer's logs of round K go to OUTPUT_DIR/tensorboard/round_K (the run's own metrics, a "
                   "step per round, go to every report_to integration; TensorBoard: OUTPUT_DIR/tensorboard/metrics)",
}


# Fields that do not change what a run computes: a rerun may change them and still resume.
RUN_NEUTRAL = {"output_dir", "rounds", "overwrite", "report_to", "run_name", "project", "disable_tqdm",
               "logging_dir", "log_level", "log_level_replica", "log_on_each_node", "logging_steps",
               "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "push_to_hub",
               "include_num_input_tokens_seen", "skip_memory_metrics", "ddp_timeout", "local_rank",
               "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
               "dataloader_prefetch_factor", "save_strategy", "save_steps", "save_total_limit",
               "save_only_model", "save_on_each_node", "selftrain_dir"}
RUN_NEUTRAL_PREFIXES = ("hub_", "trackio_")


def is_run_neutral(name: str, config: dict) -> bool:
    """Whether setting ``name`` may differ when a run resumes (``config``: the run's settings). The
    per-device batch is derived from the global batch, which is what a run is about."""
    if name == "per_device_train_batch_size" and config.get("global_batch_size"):
        return True
    return name in RUN_NEUTRAL or name.startswith(RUN_NEUTRAL_PREFIXES)


# ---- parsing ------------------------------------------------------------------------------------
class _HelpFormatter(OneSpelling, argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the description kept as written, each flag under its one spelling."""


def make_parser(script_type: type = SelfTrainArguments, prog: str | None = None, description: str = "",
                output_dir: str = "outputs/self_train", trainer_type: type | None = None,
                overrides: dict[str, str] = LOOP_OVERRIDES):
    """A `TrlParser` over (``script_type``, ``trainer_type``, `PolicyModelConfig`): TRL's trainer and
    model settings with lmcoh's defaults (lmcoh.lm.configs; the trainer's default `PolicySFTConfig`).

    ``--help`` shows ``description`` and then ``overrides``, the trainer settings the loop sets itself.
    """
    from trl import TrlParser

    from ..lm.configs import PolicyModelConfig, PolicySFTConfig

    class RecipeParser(Suggestions, TrlParser):
        def error(self, message: str):  # one line, no usage block
            raise RunError(f"{one_line_name(self, message)} (see --help)")

        def set_defaults_with_config(self, **kwargs) -> list[str]:
            checked = {key: _config_value(self, key, value) for key, value in kwargs.items()}
            unknown = super().set_defaults_with_config(**checked)
            if unknown:
                key = unknown[0].lstrip("-")
                raise RunError(f"unknown setting {key!r} in the config file"
                               + closest(key, [a.dest for a in self._actions], quote=True))
            return unknown

    listed = "\n".join(f"  {name}: {how}" for name, how in overrides.items())
    parser = RecipeParser((script_type, trainer_type or PolicySFTConfig, PolicyModelConfig), prog=prog,
                          formatter_class=_HelpFormatter, allow_abbrev=False,
                          description=f"{description}\n\nThe loop sets these trainer settings itself, "
                                      f"whatever the config says:\n{listed}\n\n"
                                      "Settings come from --config FILE.yaml (any field below), then flags.")
    for action in parser._actions:
        if getattr(action.type, "__name__", "") == "dict":  # the parsers type a mapping as dict(TEXT): no text passes
            action.type = _mapping
    parser.set_defaults_with_config(output_dir=output_dir)
    parser.set_by_run = {name for names in overrides for name in names.split(", ")}  # never refused: overridden
    return parser


def _mapping(text: str) -> dict:
    """A mapping field's flag value, written as JSON (``--liger_kernel_config '{"rope": true}'``), or none."""
    if text.lower() in ("none", "null"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON mapping such as '{{\"key\": 1}}', got {text!r}")
    return value


def parse(parser, argv: list[str] | None = None) -> tuple:
    """``(script_args, sft_config, model_config)``; any problem is a one-line `RunError`."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RunError("--config needs a YAML file")
        path = Path(argv[i + 1])
        if not path.is_file():
            raise RunError(f"config file {path}: no such file")
    try:
        script_args, sft, model, unknown = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except LmcohError:
        raise
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RunError(f"config file is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    except (ValueError, TypeError, OSError, ImportError) as err:  # TRL's and transformers' checks of a setting
        raise RunError(first_line(err)) from None
    flags = [u for u in unknown if u.startswith("-")]
    if unknown:
        name = (flags or unknown)[0].split("=", 1)[0]
        if not flags:
            raise RunError(f"unexpected argument {name!r} (see --help)")
        raise RunError(f"unknown flag {name}{closest(name, [o for a in parser._actions for o in a.option_strings])}"
                       " (see --help)")
    check_trainer_settings(sft, model, getattr(parser, "set_by_run", ()))
    return script_args, sft, model


def run_recipe(prog: str, main, parser) -> None:
    """Parse the command line and run ``main`` on it, the way every recipe ends: a problem is one
    line ``PROG: error: ...`` and exit status 2 (or the error's own ``exit_status``), Ctrl-C one
    line and status 130 (the run directory resumes). Under a data-parallel launch each process,
    having said why it stops, waits for the others, so that the launcher kills none before it has
    said so too."""
    try:
        main(*parse(parser))
    except LmcohError as err:
        _exit(f"{prog}: error: {err}", err.exit_status)
    except KeyboardInterrupt:
        _exit(f"{prog}: interrupted; run the same command again to resume", 130)


def _exit(line: str, status: int) -> None:
    import os

    print(line, file=sys.stderr, flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    sys.exit(status)


def _value(setting):
    return getattr(setting, "value", setting)  # an enum's text


_TOKENISED = "the Trainer gets the episodes tokenised already, with the mask of their actions: no text to prepare"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Trainer and model settings a self-training run cannot honour, refused before any work in one line:
# setting -> (refused when, why). Every other field of SFTConfig and ModelConfig is honoured as TRL
# defines it (the loop sets only LOOP_OVERRIDES); tests/test_arguments.py walks them all.
REFUSED = {
    "eval_strategy": (lambda v: _value(v) != "no", "the Trainer has no eval dataset: every round is evaluated "
                                                   "exactly, against the oracle"),
    "eval_on_start": (bool, "the Trainer has no eval dataset: every round is evaluated exactly, against the oracle"),
    "do_eval": (bool, "every round is evaluated exactly, against the oracle, whatever do_eval says"),
    "do_predict": (bool, "there is no test set: every round is evaluated exactly, against the oracle"),
    "save_strategy": (lambda v: _value(v) != "no", "each round saves its own model (OUTPUT_DIR/rounds/K/model); "
                                                   "Trainer checkpoints would land in the round's scratch directory "
                                                   "and be deleted with it"),
    "resume_from_checkpoint": (lambda v: v is not None, "a run resumes by itself from its last complete round: run "
                                                        "the same command again"),
    "push_to_hub": (bool, "lmcoh never contacts a model hub (the Trainer would push each round's scratch "
                          "directory, not the run); upload OUTPUT_DIR/rounds/K/model yourself"),
    "trust_remote_code": (bool, "lmcoh never runs a model's own code"),
    "packing": (bool, "each episode is one training row with the mask of its actions; packing would cut and "
                      "merge them"),
    "assistant_only_loss": (bool, "the loss already falls on the actions' tokens only (completion_only_loss)"),
    "chat_template_path": (lambda v: v is not None, "the chat format is written with the model's own chat "
                                                    "template (--format chat)"),
    "lora_task_type": (lambda v: v != "CAUSAL_LM", "a policy is a causal language model (CAUSAL_LM)"),
    "dataset_text_field": (lambda v: v != "text", _TOKENISED),
    "dataset_kwargs": (bool, _TOKENISED),
    "eos_token": (lambda v: v is not None, _TOKENISED),
    "activation_offloading": (lambda v: v and not _cuda(), "it moves activations off a GPU, and there is none"),
}


def check_trainer_settings(sft, model, set_by_run=()) -> None:
    """`RunError` for trainer and adapter settings that could only fail later, mid-run: the
    `REFUSED` ones (but those in ``set_by_run``, which the run overrides), optimisers and schedules
    that cannot be built, numbers out of range."""
    from transformers.utils import is_bitsandbytes_available, is_liger_kernel_available

    for config in (sft, model):
        for name, (refused, why) in REFUSED.items():
            if name not in set_by_run and hasattr(config, name) and refused(getattr(config, name)):
                value = getattr(config, name)
                setting = name if value is True else f"{name} {_value(value)!r}"
                raise RunError(f"{setting} is not supported: {why}")
    if "trust_remote_code" in (sft.model_init_kwargs or {}):
        raise RunError(f"model_init_kwargs: trust_remote_code is not supported: {REFUSED['trust_remote_code'][1]}")
    _check_optimiser(sft)
    if sft.use_liger_kernel and not is_liger_kernel_available():
        raise RunError("use_liger_kernel needs the liger-kernel package (pip install liger-kernel)")
    if (model.load_in_4bit or model.load_in_8bit) and not is_bitsandbytes_available():
        raise RunError("load_in_4bit and load_in_8bit need the bitsandbytes package (pip install bitsandbytes)")
    if sft.fsdp and sft.world_size == 1:
        raise RunError("fsdp shards a model over the processes of a launch (accelerate launch --config_file "
                       "recipes/accelerate_configs/fsdp.yaml); this is one process")
    for name in ("dataloader_persistent_workers", "dataloader_multiprocessing_context"):
        if getattr(sft, name) and not sft.dataloader_num_workers:
            raise RunError(f"{name} needs worker processes: set dataloader_num_workers too")
    for name, value in (("per_device_train_batch_size", sft.per_device_train_batch_size),
                        ("gradient_accumulation_steps", sft.gradient_accumulation_steps)):
        _check(name, value, lambda v: v >= 1, "must be >= 1")
    _check("learning_rate", sft.learning_rate, lambda v: v >= 0 and math.isfinite(v), "must be >= 0")
    if sft.max_steps <= 0:
        _check("num_train_epochs", sft.num_train_epochs, lambda v: v > 0 and math.isfinite(v), "must be positive")
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    for name in sft.report_to or []:
        if name not in INTEGRATION_TO_CALLBACK:
            raise RunError(f"report_to: unknown integration {name!r}; choose from none, all, "
                           + ", ".join(INTEGRATION_TO_CALLBACK))
        if name not in get_available_reporting_integrations():
            raise RunError(f"report_to {name} needs its package installed (pip install {name})")
    if model.use_peft:
        _check("lora_r", model.lora_r, lambda v: v >= 1, "must be >= 1")
        _check("lora_alpha", model.lora_alpha, lambda v: v > 0, "must be positive")
        _check("lora_dropout", model.lora_dropout, lambda v: 0 <= v < 1, "must be in [0, 1)")


def _check_optimiser(sft) -> None:
    """Build the optimiser's class and the learning-rate schedule the Trainer would (on a dummy
    parameter): a missing package or a schedule missing its arguments is one line now, not mid-run."""
    import torch
    from transformers import Trainer
    from transformers.optimization import get_scheduler

    weight = torch.zeros(1, requires_grad=True, device=sft.device)
    try:
        optimiser, kwargs = Trainer.get_optimizer_cls_and_kwargs(sft)
        optimiser([weight], **kwargs)
    except (ImportError, ValueError, TypeError) as err:
        if "pass a model" not in str(err) and "pass a `model`" not in str(err):  # built later, with the model
            raise RunError(f"optim {_value(sft.optim)}: {first_line(err)}") from None
    try:
        get_scheduler(sft.lr_scheduler_type, torch.optim.SGD([weight], lr=1.0), num_warmup_steps=1,
                      num_training_steps=10, scheduler_specific_kwargs=sft.lr_scheduler_kwargs)
    except (TypeError, ValueError) as err:
        raise RunError(f"lr_scheduler_type {_value(sft.lr_scheduler_type)} with lr_scheduler_kwargs "
                       f"{sft.lr_scheduler_kwargs or {}}: {first_line(err)}") from None


def _config_value(parser, key: str, value):
    """A YAML value for ``--key``, typed as the command line would type it (argparse leaves
    non-string defaults alone, so a list where a number belongs would slip through)."""
    action = next((a for a in parser._actions if a.dest == key and a.type is not None), None)
    if action is None:
        return value  # unknown: reported by set_defaults_with_config
    if value is None:
        return None
    if isinstance(value, dict):
        if "dict" in _field_type(parser, key):
            return value
        raise RunError(f"{key} must be a single value, not a mapping")
    if isinstance(value, list):
        if action.nargs not in ("+", "*") and "list" not in _field_type(parser, key):
            raise RunError(f"{key} must be a single value, not a list")
        return [_convert(action, key, v) for v in value]
    if action.nargs in ("+", "*"):
        return [_convert(action, key, value)]
    return _convert(action, key, value)


def _convert(action, key: str, value):
    if isinstance(value, (dict, list)):
        raise RunError(f"{key} must be a single value, got {value!r}")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        out = action.type(text)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        kind = getattr(action.type, "__name__", "a value of the right kind")
        raise RunError(f"{key} must be {_kind(kind)}, got {value!r}") from None
    if action.choices is not None and out not in action.choices:
        raise RunError(f"{key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return out


def _kind(name: str) -> str:
    return {"int": "an integer", "float": "a number", "string_to_bool": "true or false",
            "str": "a string"}.get(name, f"a valid {name}")


def _field_type(parser, key: str) -> str:
    """The declared type of field ``key``, as text (``"dict | str | None"``). Read from the
    annotations: HfArgumentParser narrows the fields' own ``type`` while it builds."""
    for dtype in parser.dataclass_types:
        hints = typing.get_type_hints(dtype)
        if key in hints:
            return str(hints[key])
    return ""
