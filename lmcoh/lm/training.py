"""Supervised fine-tuning on episode transcripts, through TRL's `SFTTrainer`.

One function serves both pretraining the prior (a full model or an adapter) and
self-training rounds. Examples are transcripts already tokenised as the model reads them
(`lmcoh.lm.scoring.Codec.episode`, so training and scoring see the same tokens in every text
format) with a mask of the actions' tokens, given to TRL as its ``completion_mask``: the loss
falls on the actions the policy writes, not on the states the environment writes. Launched
under ``torchrun`` or ``accelerate launch``, the Trainer runs data-parallel by itself.

The trainer settings are TRL's own `SFTConfig`, with the few defaults lmcoh changes for small
policy models redeclared by `lmcoh.lm.configs.PolicySFTConfig` (as TRL does to `TrainingArguments`).
The Trainer's log lines (loss, learning rate, ...) go to a log file and TensorBoard, not the terminal.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .. import faults
from ..errors import DivergenceError
from ..io import dumps


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
              average_last: float = 0.0, log_file: str | Path | None = None) -> dict:
    """Train ``model`` in place on ``examples`` (token ids, loss mask) with the loss on the masked
    tokens (`episode_examples`).

    ``args`` is the `SFTConfig`, used as given. With ``average_last`` > 0 the trained weights
    end as the running mean of the weights over that final share of the steps (tail
    averaging): the last minibatches no longer jitter the learned action probabilities.
    The Trainer's log dicts are appended to ``log_file`` (JSON lines), never printed.
    Returns the Trainer's metrics (``train_loss``, ``train_runtime``, ...) plus ``global_step``.
    """
    import datasets
    from trl import SFTTrainer

    data = datasets.Dataset.from_dict({"input_ids": [ids for ids, _ in examples],
                                       "completion_mask": [mask for _, mask in examples]})
    expose_head_bias(model)
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    finally:
        if was_on:
            datasets.enable_progress_bars()
    watch = Divergence(model)
    trainer.add_callback(watch)
    if average_last > 0:
        trainer.add_callback(TailAverage(model, average_last))
    route_logs(trainer, log_file)
    result = trainer.train()
    model.eval()
    watch.check(result.training_loss, args)
    return {**result.metrics, "global_step": result.global_step}


def route_logs(trainer, log_file: str | Path | None) -> None:
    """Keep the Trainer's log dicts off the terminal (its progress bar stays): append them to
    ``log_file`` (JSON lines) instead, when given."""
    trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_QuietProgress())   # the bar, without the log dicts it writes under it
    if log_file is not None:
        trainer.add_callback(_LogFile(log_file))


class _QuietProgress(ProgressCallback):
    """The Trainer's progress bar, without the log dicts it prints between its updates."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class _LogFile(TrainerCallback):
    """Append every log dict of the Trainer (main process) to a JSON-lines file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(dumps({"step": state.global_step, **logs}) + "\n")


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
        raise DivergenceError(f"training diverged ({where})")
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
