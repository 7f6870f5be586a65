"""Supervised fine-tuning on episode transcripts, through TRL's `SFTTrainer`.

One function serves both pretraining the prior (a full model or an adapter) and
self-training rounds. It trains with `lmcoh.lm.trainer.ActionSFTTrainer`, TRL's trainer with
the loss computed only at the actions' positions and once per distinct transcript of a batch. Examples are transcripts already tokenised as the model reads them
(`lmcoh.lm.scoring.Codec.episode`, so training and scoring see the same tokens in every text
format) with a mask of the actions' tokens, given to TRL as its ``completion_mask``: the loss
falls on the actions the policy writes, not on the states the environment writes. Launched
under ``torchrun`` or ``accelerate launch``, the Trainer runs data-parallel by itself.

The trainer settings are TRL's own `SFTConfig`. `SFT_DEFAULTS` lists the few whose defaults
lmcoh changes for small policy models on a CPU (TRL does the same to `TrainingArguments`);
the recipes show them in ``--help`` and a user's config or flag overrides each.
"""

from __future__ import annotations

import math
import os
import time
from typing import Sequence

import torch
from transformers import TrainerCallback

from .. import faults
from ..errors import ModelError


def _bf16_available() -> bool:
    """bf16 autocast where it is fast: a GPU that has it, or a CPU with bf16 in hardware."""
    from .cost import native_bf16

    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else native_bf16()


def sft_defaults() -> dict:
    """lmcoh's defaults for `SFTConfig` fields, where they differ from TRL's."""
    cuda = torch.cuda.is_available()
    return {
        "num_train_epochs": 2.0,
        "learning_rate": 2e-3,             # LoRA on a tiny model: far above TRL's 2e-5
        "per_device_train_batch_size": 64,
        "warmup_steps": 0.05,              # a share of the steps
        "seed": 0,
        "report_to": "none",
        "save_strategy": "no",             # each round saves its own model (rounds/k/model)
        "logging_steps": 50,
        "log_level": "warning",
        "bf16": _bf16_available(),         # TRL's default True refuses to start on a CPU, or crawls without bf16
        "gradient_checkpointing": False,   # tiny models: memory is not the constraint
        "activation_checkpointing": False,
        "completion_only_loss": True,      # the loss falls on the actions' tokens (the completion mask)
        "max_length": None,                # never truncate an episode
        "optim": "adamw_torch_fused",  # one pass over all the weights: 3x faster than the loop on a CPU
        "dataloader_pin_memory": cuda,
        "use_cpu": not cuda,               # under torchrun on a CPU: gloo data parallelism
        "ddp_find_unused_parameters": False,  # every trainable weight takes part in every step
    }


def sft_config(**overrides):
    """An `SFTConfig` with `sft_defaults` and ``overrides`` (which must name SFTConfig fields)."""
    from trl import SFTConfig

    return SFTConfig(**{**sft_defaults(), **overrides})


def is_main_process() -> bool:
    """True in a single process, and on rank 0 of a distributed launch (save files only there)."""
    return int(os.environ.get("RANK", "0")) == 0


def episode_examples(tokenizer, task, layout, episodes) -> list[tuple[list[int], list[int]]]:
    """Training examples from ``(goal, episode)`` pairs: each transcript in ``layout`` under its
    goal (history prompts, whatever the layout's mode), tokenised as the model reads it, with
    the mask of its actions' tokens."""
    from dataclasses import replace

    from .scoring import Codec

    codecs = {}
    out = []
    for goal, episode in episodes:
        if goal not in codecs:
            codecs[goal] = Codec(tokenizer, task, replace(layout, mode="history"), goal)
        out.append(codecs[goal].episode(episode.states, episode.actions))
    return out


def train_sft(model, tokenizer, examples: list[tuple[list[int], list[int]]], args, *,
              average_last: float = 0.0, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Train ``model`` in place on ``examples`` (token ids, loss mask) with the loss on the masked
    tokens (`episode_examples`), through `lmcoh.lm.trainer.ActionSFTTrainer`.

    ``args`` is the `SFTConfig`, used as given. With ``average_last`` > 0 the trained weights
    end as the running mean of the weights over that final share of the steps (tail
    averaging): the last minibatches no longer jitter the learned action probabilities.
    ``callbacks`` are more `TrainerCallback`s. Returns the Trainer's metrics (``train_loss``,
    ``train_runtime``, ...) plus ``global_step``, ``computed_tokens`` (the tokens the model ran,
    each distinct transcript of a batch once), and each step's wall time and tokens
    (``step_seconds``, ``step_tokens``).
    """
    import datasets
    from transformers.trainer_callback import PrinterCallback

    from .trainer import ActionSFTTrainer

    data = datasets.Dataset.from_dict({"input_ids": [ids for ids, _ in examples],
                                       "completion_mask": [mask for _, mask in examples]})
    expose_head_bias(model)
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        trainer = ActionSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    finally:
        if was_on:
            datasets.enable_progress_bars()
    watch, clock = Divergence(model), StepClock(trainer)
    for callback in (watch, clock, *callbacks):
        trainer.add_callback(callback)
    if average_last > 0:
        trainer.add_callback(TailAverage(model, average_last))
    if args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    result = trainer.train()
    model.eval()
    watch.check(result.training_loss, args)
    return {**result.metrics, "global_step": result.global_step, "computed_tokens": trainer.computed_tokens,
            "step_seconds": clock.seconds, "step_tokens": clock.tokens}


class StepClock(TrainerCallback):
    """The wall time of every optimiser step (its forward, backward and update) and the tokens it ran."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self._start, self._tokens = 0.0, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._tokens = time.perf_counter(), self.trainer.computed_tokens

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)
        self.tokens.append(self.trainer.computed_tokens - self._tokens)


class Divergence(TrainerCallback):
    """Stop training at the first step that leaves a trainable weight non-finite (a NaN or inf
    loss does that through its gradient); `check` then fails in one line, so a diverged model
    is never sampled from or saved. The trainable weights are an adapter's or a small model's:
    checking them every step costs little."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step: int | None = None

    def _finite(self) -> bool:
        with torch.no_grad():
            return all(bool(torch.isfinite(p).all()) for p in self.params)

    def on_step_end(self, args, state, control, **kwargs):
        faults.point("train")
        if self.step is None and not self._finite():
            self.step = state.global_step
            control.should_training_stop = True

    def check(self, train_loss: float, args) -> None:
        if self.step is None and math.isfinite(train_loss) and self._finite():
            return
        where = f"non-finite weights after step {self.step}" if self.step is not None else "non-finite loss"
        raise ModelError(f"training diverged ({where}); the learning rate ({args.learning_rate:g}) is the likely "
                         "cause: lower --learning_rate or --max_grad_norm")
def expose_head_bias(model) -> None:
    """Let TRL's fused loss read the output layer's bias through peft's trainable-token wrapper.

    SFTTrainer computes the loss with a fused LM head that reads ``lm_head.weight`` and
    ``lm_head.bias``. With ``trainable_token_indices`` peft wraps the output layer (tied or not)
    in a `TrainableTokensWrapper`, whose ``weight`` is the layer's weight with the trained rows
    in place, but which has no ``bias`` (AttributeError, known upstream). The wrapper gets its
    original layer's bias (usually None) as a plain attribute, not a second parameter.
    """
    from peft.utils.other import TrainableTokensWrapper

    head = model.get_output_embeddings()
    if isinstance(head, TrainableTokensWrapper) and "bias" not in vars(head):
        object.__setattr__(head, "bias", head.original_module.bias)


class TailAverage(TrainerCallback):
    """Replace the trainable weights, at the end, by their mean over the last ``fraction`` of steps."""

    def __init__(self, model, fraction: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.fraction = fraction
        self.mean: list[torch.Tensor] | None = None
        self.count = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step <= (1.0 - self.fraction) * state.max_steps:
            return
        self.count += 1
        with torch.no_grad():
            if self.mean is None:
                self.mean = [p.detach().clone() for p in self.params]
            else:
                for m, p in zip(self.mean, self.params):
                    m.add_(p.detach() - m, alpha=1.0 / self.count)

    def on_train_end(self, args, state, control, **kwargs):
        if self.mean is not None:
            with torch.no_grad():
                for m, p in zip(self.mean, self.params):
                    p.copy_(m)
