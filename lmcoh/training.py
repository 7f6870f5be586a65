"""Supervised fine-tuning on episode transcripts, through TRL's `SFTTrainer`.

One function serves both pretraining the prior (a full model) and self-training rounds (a
LoRA model): examples are prompt/completion pairs, the prompt being the goal token and the
completion the transcript, so the loss falls on the transcript only. Launched under
``torchrun`` or ``accelerate launch``, the Trainer runs data-parallel by itself.
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback


def is_main_process() -> bool:
    """True in a single process, and on rank 0 of a distributed launch (save files only there)."""
    return int(os.environ.get("RANK", "0")) == 0


def train_sft(model, tokenizer, prompts: list[str], completions: list[str], *, epochs: float,
              learning_rate: float, batch_size: int, seed: int, output_dir: str,
              report_to: str | list[str] = "none", progress: bool = False, average_last: float = 0.0,
              extra_sft_args: dict | None = None) -> dict:
    """Train ``model`` in place on ``prompt + completion`` with the loss on the completions.

    ``output_dir`` receives the Trainer's logs (and checkpoints only if ``extra_sft_args``
    asks for them). With ``average_last`` > 0 the trained weights end as the running mean of
    the weights over that final fraction of the steps (tail averaging): the last minibatches
    no longer jitter the learned action probabilities. Returns the Trainer's metrics
    (``train_loss``, ``train_runtime``, ...) plus ``global_step``.
    """
    import datasets
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    args = {
        "output_dir": output_dir, "num_train_epochs": epochs, "per_device_train_batch_size": batch_size,
        "learning_rate": learning_rate, "lr_scheduler_type": "linear", "warmup_steps": 0.05,
        "weight_decay": 0.0, "seed": seed, "data_seed": seed, "report_to": report_to,
        "save_strategy": "no", "logging_strategy": "steps", "logging_steps": 50,
        "disable_tqdm": not progress, "log_level": "warning",
        "bf16": cuda and torch.cuda.is_bf16_supported(), "use_cpu": not cuda,
        "activation_checkpointing": False, "completion_only_loss": True, "max_length": None,
        "dataloader_pin_memory": cuda, "optim": "adamw_torch",
    }
    args.update(extra_sft_args or {})
    data = datasets.Dataset.from_dict({"prompt": list(prompts), "completion": list(completions)})
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=data,
                             processing_class=tokenizer)
    finally:
        if was_on:
            datasets.enable_progress_bars()
    if average_last > 0:
        trainer.add_callback(TailAverage(model, average_last))
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    result = trainer.train()
    model.eval()
    return {**result.metrics, "global_step": result.global_step}


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
