"""lmcoh's settings for TRL's trainer and model dataclasses, the way TRL sets its own.

TRL's `SFTConfig` redeclares the `TrainingArguments` fields whose defaults it changes; lmcoh
does the same to TRL's `SFTConfig` and `ModelConfig` for small policy models trained with LoRA:
each changed default is a field here, with help text, so ``--help`` shows it and a config file
or a flag overrides it. Sizes that follow from others are derived in ``__post_init__``:
`PolicySFTConfig.per_device_train_batch_size` from `global_batch_size`, one rule for the recipes
and for ``lmcoh pretrain``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers.trainer_utils import SaveStrategy
from transformers.training_args import OptimizerNames, trainer_log_levels
from trl import GRPOConfig, ModelConfig, SFTConfig

from ..errors import RunError

_CUDA = torch.cuda.is_available()


def bf16_available(cpu: bool = False) -> bool:
    """bf16 mixed precision by default on a GPU that supports it, and with ``cpu`` on a CPU with
    bf16 in hardware (`lmcoh.lm.cost.native_bf16`), where autocast trains about 1.5x faster."""
    from .cost import native_bf16

    return torch.cuda.is_bf16_supported() if _CUDA else cpu and native_bf16()


@dataclass
class _PolicyTrainer:
    """lmcoh's defaults for any TRL trainer of small policy models (see each field's help), and
    the global batch they derive their per-device batch from."""

    global_batch_size: int = field(default=64, metadata={"help": (
        "lmcoh: sequences (episodes, for RL) per optimiser step over all processes; per_device_train_batch_size "
        "is derived as global_batch_size / (processes x gradient_accumulation_steps), so any number of processes "
        "takes the same steps. 0: use per_device_train_batch_size as given.")})
    seed: int = field(default=0, metadata={"help": "lmcoh: the run's seed; rounds and steps derive theirs from it."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": (
        "Integrations to report results and logs to (tensorboard, wandb, ...); lmcoh: none.")})
    log_level: str = field(default="warning", metadata={"help": "lmcoh: the Trainer logs warnings and errors only.",
                                                        "choices": trainer_log_levels.keys()})
    bf16: bool | None = field(default=None, metadata={"help": (
        "bf16 mixed precision; lmcoh's default: on a GPU that supports it, and for SFT on a CPU with bf16 in "
        "hardware (AVX512-BF16, AMX).")})
    activation_checkpointing: bool | None = field(default=False, metadata={"help": (
        "Recompute activations in the backward pass to save memory; lmcoh: off (small models: memory is not the "
        "constraint).")})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": (
        "Deprecated alias of activation_checkpointing (TRL's default True is lmcoh's unset).")})
    dataloader_pin_memory: bool = field(default=_CUDA, metadata={"help": "Pin memory (lmcoh: on a GPU only)."})
    use_cpu: bool = field(default=not _CUDA, metadata={"help": (
        "Train on the CPU (lmcoh: where there is no GPU; under torchrun: gloo data parallelism).")})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": (
        "lmcoh: off (every trainable weight takes part in every step).")})

    def _check_launch(self) -> None:
        """A multi-process setting refused on one process, where transformers fails obscurely."""
        if self.ddp_backend and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise RunError(f"ddp_backend {self.ddp_backend} is for a launch of several processes (torchrun, "
                           "accelerate launch); this is one process")

    def _lmcoh_defaults(self, world: int) -> None:
        """The per-device batch from the global one over ``world`` processes."""
        if isinstance(self.global_batch_size, bool) or not isinstance(self.global_batch_size, int) \
                or self.global_batch_size < 0:
            raise RunError(f"global_batch_size must be >= 0, got {self.global_batch_size!r}")
        if self.per_device_train_batch_size < 1:
            raise RunError(f"per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}")
        if self.global_batch_size:
            self.per_device_train_batch_size = per_device_batch(self.global_batch_size, world,
                                                                self.gradient_accumulation_steps)


@dataclass
class PolicySFTConfig(_PolicyTrainer, SFTConfig):
    """TRL's `SFTConfig` with lmcoh's defaults for LoRA on small policy models (see each field's help)."""

    num_train_epochs: float = field(default=2.0, metadata={"help": "lmcoh: passes over each round's episodes."})
    learning_rate: float = field(default=2e-3, metadata={"help": (
        "lmcoh: the peak learning rate (LoRA on a small model wants far more than TRL's 2e-5).")})
    per_device_train_batch_size: int = field(default=64, metadata={"help": (
        "Sequences per step and device; derived from global_batch_size unless that is 0.")})
    warmup_steps: float = field(default=0.05, metadata={"help": (
        "lmcoh: linear warmup, in steps or (below 1) as a share of the steps.")})
    save_strategy: SaveStrategy | str = field(default="no", metadata={"help": (
        "lmcoh: no Trainer checkpoints (each round saves its own model).")})
    logging_steps: float = field(default=50, metadata={"help": "Log every X update steps."})
    completion_only_loss: bool | None = field(default=True, metadata={"help": (
        "lmcoh: the loss falls on the actions' tokens only (the completion mask).")})
    max_length: int | None = field(default=None, metadata={"help": "lmcoh: never truncate an episode."})
    optim: OptimizerNames | str = field(default="adamw_torch_fused", metadata={"help": (
        "The optimizer; lmcoh: torch's fused AdamW (one pass over all the weights: 3x faster than the loop on a "
        "CPU).")})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bf16_available(cpu=True)  # SFT's loss checked against fp32 (tests/test_training.py)
        self._check_launch()
        super().__post_init__()
        self._lmcoh_defaults(self.world_size)


def per_device_batch(global_batch: int, processes: int, accumulation: int = 1) -> int:
    """The per-device batch that makes ``global_batch`` sequences per optimiser step."""
    if accumulation < 1:
        raise RunError(f"gradient_accumulation_steps must be >= 1, got {accumulation}")
    split = processes * accumulation
    if global_batch % split:
        raise RunError(f"global_batch_size {global_batch} does not split evenly over {processes} process(es) "
                       f"x {accumulation} accumulation step(s)")
    return global_batch // split


@dataclass
class PolicyGRPOConfig(_PolicyTrainer, GRPOConfig):
    """TRL's `GRPOConfig` with lmcoh's defaults for KL-regularised RL on small policy models: plain
    REINFORCE on whole episodes (lmcoh.lm.rl; lmcoh.runs.klrl refuses the settings that are not)."""

    num_generations: int | None = field(default=None, metadata={"help": (
        "Episodes whose mean reward is the baseline of each (GRPO's group); lmcoh: unset, the whole batch "
        "(every episode answers the same prompt).")})
    beta: float = field(default=0.5, metadata={"help": (
        "lmcoh: the KL coefficient of J_beta = E[R] - beta KL(pi || p), as k1 in the reward; TRL's KL in the loss "
        "stays off.")})
    learning_rate: float = field(default=1e-3, metadata={"help": "lmcoh: the peak learning rate (LoRA, small models)."})
    max_steps: int = field(default=300, metadata={"help": "lmcoh: optimiser steps (each on freshly sampled episodes)."})
    scale_rewards: str = field(default="none", metadata={"help": (
        "lmcoh: none. Dividing by the rewards' std changes the fixed point (lmcoh refuses group and batch).")})
    loss_type: str = field(default="luspo", metadata={"help": (
        "lmcoh: luspo, the sum over each episode's actions averaged over episodes: REINFORCE, no episode "
        "reweighted by its length (dr_grpo, a constant rescaling, is accepted too).")})
    importance_sampling_level: str = field(default="sequence", metadata={"help": (
        "Importance ratios per token or per sequence; on policy both give the REINFORCE gradient.")})
    disable_dropout: bool = field(default=True, metadata={"help": (
        "lmcoh: on (the episodes are sampled without dropout, so the gradient must be too).")})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bf16_available()  # not on a CPU: the rollouts' fp32 logprobs are the ratio's reference
        world = int(os.environ.get("WORLD_SIZE", "1"))  # GRPOConfig derives its generation batch from these
        self._check_launch()
        self._lmcoh_defaults(world)
        if self.num_generations is None:
            self.num_generations = self.per_device_train_batch_size * world * self.gradient_accumulation_steps
        super().__post_init__()


@dataclass
class PolicyModelConfig(ModelConfig):
    """TRL's `ModelConfig` with lmcoh's LoRA defaults: a small adapter on every linear layer."""

    use_peft: bool = field(default=True, metadata={"help": "lmcoh: train a LoRA adapter, not the whole model."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (lmcoh: 8)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (lmcoh: 16)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (lmcoh: none)."})
    lora_target_modules: list[str] | None = field(default_factory=lambda: ["all-linear"], metadata={"help": (
        "Modules LoRA adapts (lmcoh: all-linear, every linear layer).")})
