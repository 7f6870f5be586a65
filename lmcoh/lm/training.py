"""Supervised fine-tuning on episode transcripts, through TRL's `SFTTrainer`.

One function serves both pretraining the prior (a full model or an adapter) and
self-training rounds. It trains with `lmcoh.lm.trainer.ActionSFTTrainer`, TRL's trainer with
the loss computed only at the actions' positions and once per distinct transcript of a batch.
Examples are transcripts already tokenised as the model reads them
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
import time
from pathlib import Path
from typing import Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .. import faults
from ..errors import DivergenceError, ModelError, first_line
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
              average_last: float = 0.0, log_file: str | Path | None = None,
              callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Train ``model`` in place on ``examples`` (token ids, loss mask) with the loss on the masked
    tokens (`episode_examples`), through `lmcoh.lm.trainer.ActionSFTTrainer`.

    ``args`` is the `SFTConfig`, used as given. With ``average_last`` > 0 the trained weights
    end as the running mean of the weights over that final share of the steps (tail
    averaging): the last minibatches no longer jitter the learned action probabilities.
    The Trainer's log dicts are appended to ``log_file`` (JSON lines), never printed.
    ``callbacks`` are more `TrainerCallback`s. Returns the Trainer's metrics (``train_loss``,
    ``train_runtime``, ...) plus ``global_step``, ``computed_tokens`` (the tokens the model ran,
    each distinct transcript of a batch once), and each step's wall time and tokens
    (``step_seconds``, ``step_tokens``).
    """
    import datasets

    from .trainer import ActionSFTTrainer

    check_examples(args, examples)
    data = datasets.Dataset.from_dict({"input_ids": [ids for ids, _ in examples],
                                       "completion_mask": [mask for _, mask in examples]})
    expose_head_bias(model)
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        trainer = ActionSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    except ValueError as err:  # TRL's checks of the settings against this model (router_aux_loss_coef, pad_token, ...)
        raise ModelError(f"the trainer refuses these settings for this model: {first_line(err)}") from None
    finally:
        if was_on:
            datasets.enable_progress_bars()
    watch, clock = Divergence(model, examples[:Divergence.PROBE]), StepClock(trainer)
    for callback in (watch, clock, *callbacks):
        trainer.add_callback(callback)
    if average_last > 0:
        trainer.add_callback(TailAverage(model, average_last))
    route_logs(trainer, log_file)
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


def route_logs(trainer, log_file: str | Path | None) -> None:
    """Keep the Trainer's log dicts off the terminal (its progress bar stays): append them to
    ``log_file`` (JSON lines) instead, when given."""
    trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_QuietProgress())   # the bar, without the log dicts it writes under it
    if log_file is not None:
        trainer.add_callback(_LogFile(log_file))


def check_examples(args, examples: list[tuple[list[int], list[int]]]) -> None:
    """`ModelError` for trainer settings that cannot train on ``examples``, which TRL or
    transformers would find only mid-run: a ``max_length`` that cuts episodes (an episode is
    trained whole, and TRL drops what is left without an action), no batch at all under
    ``dataloader_drop_last``, or a polynomial schedule whose warmup takes every optimiser step
    (it divides by the steps left)."""
    longest = max((len(ids) for ids, _ in examples), default=0)
    if args.max_length is not None and args.max_length < longest:
        raise ModelError(f"max_length {args.max_length} would cut episodes of up to {longest} tokens; lmcoh trains "
                         "on whole episodes: raise max_length or leave it unset")
    n = len(examples)
    rows, batch = math.ceil(n / max(args.world_size, 1)), args.per_device_train_batch_size  # per process
    batches = rows // batch if args.dataloader_drop_last else math.ceil(rows / batch)
    if batches == 0:
        raise ModelError(f"{n} examples make no batch of {batch} per process, and dataloader_drop_last drops the rest")
    steps = args.max_steps if args.max_steps > 0 else \
        math.ceil(args.num_train_epochs * math.ceil(batches / args.gradient_accumulation_steps))
    warmup = args.get_warmup_steps(steps)
    if getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "polynomial" and warmup >= steps:
        raise ModelError(f"the polynomial schedule's warmup ({warmup} steps) takes every optimiser step ({steps}); "
                         "lower warmup_steps or train more steps")


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
    """Training that diverged, found before its model is sampled from or saved: `check` then fails
    in one line (`DivergenceError`).

    The rule. Training diverged when a trainable weight turns non-finite (training stops at that
    step; a NaN or inf loss does that through its gradient), or when the trained model, on a probe
    of its own training examples (the first `PROBE`), has a loss per action token that is not
    finite or has risen past max(1.5 x, + 0.1) of where training started, or gives every token the
    same logit (a collapsed network: the uniform guess over the vocabulary, whatever the text).
    Finite blow-ups count: ``lmcoh pretrain --learning_rate 1e6`` leaves weights of 3e6 and equal
    logits everywhere, and at 1 the loss rises from 5.6 to 9.8. The trainable weights are an
    adapter's or a small model's: checking them every step costs little; the probe is two forward
    passes."""

    PROBE = 32

    def __init__(self, model, probe: list[tuple[list[int], list[int]]] = ()):
        self.model, self.probe = model, probe
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step: int | None = None
        self.before: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.probe and not (args.fsdp or args.deepspeed):  # sharded weights: the probe cannot run the model
            self.before = probe_loss(self.model, self.probe)[0]

    def _finite(self) -> bool:
        with torch.no_grad():
            return all(bool(torch.isfinite(p).all()) for p in self.params)

    def on_step_end(self, args, state, control, **kwargs):
        faults.point("train")
        if self.step is None and not self._finite():
            self.step = state.global_step
            control.should_training_stop = True

    def check(self, train_loss: float, args) -> None:
        if self.step is not None or not self._finite():
            where = f"after step {self.step}" if self.step is not None else "at the end"
            raise DivergenceError(f"training diverged (non-finite weights {where})")
        if not math.isfinite(train_loss):
            raise DivergenceError("training diverged (non-finite loss)")
        if self.before is None:
            return
        after, spread = probe_loss(self.model, self.probe)
        went = f"the loss on its own examples went from {self.before:.4g} to {after:.4g}"
        if spread <= 1e-4:
            raise DivergenceError(f"training diverged ({went}; the model gives every token the same probability)")
        if not math.isfinite(after) or after > max(1.5 * self.before, self.before + 0.1):
            raise DivergenceError(f"training diverged ({went})")


def probe_loss(model, examples: list[tuple[list[int], list[int]]], batch: int = 4) -> tuple[float, float]:
    """(mean loss per masked token of ``model`` on ``examples``, the largest spread of its logits at
    those tokens: 0 when the model gives every token the same probability), without gradients."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, spread = 0.0, 0, 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            rows = examples[i:i + batch]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            attention = torch.zeros_like(ids)
            for r, (x, mask) in enumerate(rows):
                x = torch.tensor(x)
                ids[r, :len(x)], attention[r, :len(x)] = x, 1
                labels[r, :len(x)] = torch.where(torch.tensor(mask, dtype=torch.bool), x, -100)
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, :-1].float()
            logits, targets = logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device)
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += int((targets != -100).sum())
            scored = logits[targets != -100]
            if len(scored):
                spread = max(spread, float((scored.max(-1).values - scored.min(-1).values).max()))
    model.train(was_training)
    return total / max(count, 1), spread
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
