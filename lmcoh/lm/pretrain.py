"""`lmcoh pretrain`: make the prior p a language model, from episodes of the task itself.

The theory's prior is "the behaviour the generative model was trained on". Here that is the
task's prior policy: sample episodes under p, label each with its outcome (drawn w.p. prod q),
and train a causal LM on the transcripts, the goal written at every decision: ``<success>`` or
``<failure>`` by the outcome. Prompted with ``<success>`` the model then gives
p(a | s, O = 1) = G(p); a share of the transcripts is also shown with no goal, so the bare
prompt gives p itself.

Two kinds of model:

* the built-in one (no ``base``): a small Llama with a word-level tokenizer built for the task,
  trained whole from random weights, compact format only;
* a pretrained causal LM (``base``: a directory or hub id), conditioned with LoRA: the markers
  the text format needs (``<success>``, ``<failure>``, ``<eoa>``) are added to its tokenizer as
  special tokens, and training updates the LoRA adapter and the embedding matrix (input and
  output rows, one matrix when tied), with the base's dropout off. The embeddings train because
  a LoRA adapter alone cannot reach every base: on a briefly pretrained 0.6M-parameter GPT-2 it
  stalled at TV 0.2 for any learning rate or rank, and with the embeddings it reached 0.04 in 81
  steps (`embeddings="new"`: only the new markers' rows, for a vocabulary too large to train).
  The output directory holds the merged model: a normal Hugging Face directory with the grown
  tokenizer, which `load_model` and the recipes read like any other.

Each kind has its own defaults (`DEFAULTS`): the built-in model learns from scratch with a high
learning rate over many epochs. A pretrained one is conditioned until the oracle signs it off
(docs/theory.md, "A language model as a policy"): every few steps the policy is tabulated exactly,
and training stops once, prompted with ``<success>``, it is within ``tolerance`` (total
variation) of the exact G(p), and with no goal within ``tolerance`` of p; else at a budget of
steps, keeping the best weights it checked. Its batch holds as many transcripts as fit a step's
budget of FLOPs and memory (lmcoh.lm.cost) when each distinct transcript is run once
(lmcoh.lm.trainer), so a small task trains on whole-data gradients. Before training, the expected tokens, FLOPs and seconds
on this machine are printed (lmcoh.lm.cost).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from .. import faults
from ..errors import ModelError
from ..io import exclusive
from ..tasks.episodes import sample_outcome_balanced, sample_prior_episodes
from ..tasks.task import Task
from .text import Layout

# Named model sizes (`lmcoh pretrain --model_size`, arguments of `lmcoh.model.new_llama`). A wide
# initialisation helps the tiny model pick up the goal token a dozen tokens back; "tiny" is tested.
MODEL_SIZES = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "initializer_range": 0.2},
    "small": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "initializer_range": 0.1},
    "medium": {"hidden_size": 256, "num_layers": 6, "num_heads": 8, "initializer_range": 0.05},
}


@dataclass
class PretrainConfig:
    """`lmcoh pretrain`'s settings; None takes the default of the kind of model (`DEFAULTS`)."""

    episodes: int | None = None       # behind their outcome token, half successes (sample_outcome_balanced)
    epochs: float | None = None
    seed: int = 0
    none_share: float = 1 / 3         # share of training transcripts with no goal token (extra episodes)
    learning_rate: float | None = None
    batch_size: int | None = None
    model_size: str = "tiny"          # a key of MODEL_SIZES (the built-in model only)
    average_last: float | None = None  # end on the mean weights of this last share of steps (see train_sft)
    lora_r: int = 16                  # LoRA rank (a pretrained base only)
    lora_alpha: int = 32
    embeddings: str = "all"           # a pretrained base: the embedding rows trained (a key of EMBEDDINGS)
    tolerance: float = 0.05           # a pretrained base: stop once this close (TV) to G(p) and to p
    max_steps: int | None = None      # a pretrained base: the budget of optimiser steps (unless epochs is given)

    def resolved(self, pretrained: bool) -> "PretrainConfig":
        """Every None replaced by the default for a ``pretrained`` base or the built-in model;
        `ModelError` (one line) for settings that cannot train."""
        defaults = DEFAULTS["base" if pretrained else "built-in"]
        out = replace(self, **{f.name: defaults.get(f.name) for f in fields(self) if getattr(self, f.name) is None})
        if out.episodes < 1:
            raise ModelError(f"need at least one episode, got {out.episodes}")
        if not (out.epochs is None or out.epochs > 0) or not (out.learning_rate is None or out.learning_rate > 0) \
                or out.lora_r < 1:
            raise ModelError("epochs, learning rate and LoRA rank must be positive")
        if (out.batch_size is not None and out.batch_size < 1) or (out.max_steps is not None and out.max_steps < 1):
            raise ModelError("the batch size and the budget of steps must be positive")
        if not 0.0 < out.tolerance < 1.0:
            raise ModelError(f"the tolerance must be in (0, 1), got {out.tolerance}")
        if not 0.0 <= out.none_share < 1.0:
            raise ModelError(f"the no-goal share must be in [0, 1), got {out.none_share}")
        if not 0.0 <= out.average_last < 1.0:
            raise ModelError(f"the averaged share of steps must be in [0, 1), got {out.average_last}")
        if out.embeddings not in EMBEDDINGS:
            raise ModelError(f"unknown embeddings {out.embeddings!r}; choose one of {', '.join(EMBEDDINGS)}")
        if out.model_size not in MODEL_SIZES:
            raise ModelError(f"unknown model size {out.model_size!r}; choose one of {', '.join(MODEL_SIZES)}")
        return out


# A pretrained base's embedding rows that conditioning trains beside LoRA: all of them, or only
# the new markers' (for a vocabulary too large to train).
EMBEDDINGS = ("all", "new")

# The defaults of each kind of model. The built-in model learns everything from random weights.
# A pretrained base trains a LoRA adapter and its embeddings at a LoRA-sized learning rate
# until the oracle signs it off, within a budget of steps; its batch is sized (`sized_batch`).
DEFAULTS = {
    "built-in": {"episodes": 2000, "epochs": 15.0, "learning_rate": 1e-2, "batch_size": 128, "average_last": 0.3},
    "base": {"episodes": 1000, "average_last": 0.0, "max_steps": 300},
}
# A pretrained base's learning rate falls with the square root of its width: a LoRA update
# moves a layer's output more the wider the layer. Measured with whole-data batches: 2e-3 at
# the stand-ins' width 128; on SmolLM2 (576) 2e-3 took 32 steps to the tolerance, 1e-3 24.
LORA_RATE, LORA_RATE_WIDTH = 2e-3, 128


def lora_learning_rate(hidden_size: int) -> float:
    """The default learning rate for conditioning a base of ``hidden_size``."""
    return LORA_RATE * math.sqrt(LORA_RATE_WIDTH / hidden_size)
LEAST_BATCH = 16  # a batch lmcoh sizes (lmcoh.lm.conditioning) holds at least this many transcripts


def pretrain(task: Task, out_dir: str | Path, *, base: str | None = None, format: str | None = None,
             goal_text: str | None = None, progress: bool = False, report_to: str = "none", **settings) -> Path:
    """Pretrain a prior for ``task`` (the built-in model, or ``base`` conditioned with LoRA) and
    save it to ``out_dir``. ``settings`` are `PretrainConfig` fields; ``format`` and ``goal_text``
    say how episodes are written (default: compact with the goal token, or the base model's own).

    With ``base``, lmcoh.json's ``pretrain.check`` records the oracle's verdict: the TVs reached,
    the steps taken and ``within_tolerance`` (False when the budget ran out first; the model,
    the best one checked, is saved either way). With ``progress`` the cost estimate, each check
    and a progress bar go to stderr.

    Under a data-parallel launch every process trains (``batch_size`` is the global batch, split
    over the processes, so any number of processes trains the same model) and the main one
    holds ``out_dir``'s lock and saves.
    """
    config = PretrainConfig(**settings).resolved(base is not None)
    from .loading import check_out_dir
    from .training import is_main_process

    check_out_dir(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.batch_size is not None:
        from .configs import per_device_batch

        per_device_batch(config.batch_size, world)  # refused before any work, as the recipes refuse it
    with exclusive(out_dir, "pretraining") if is_main_process() else nullcontext():
        return _pretrain(task, Path(out_dir), config, base, format, goal_text, world, progress, report_to)


def _pretrain(task: Task, out: Path, config: PretrainConfig, base: str | None, format: str | None,
              goal_text: str | None, world: int, progress: bool, report_to: str) -> Path:
    import torch

    from .adapters import add_lora, add_markers, lora_config, train_embeddings
    from .builtin import build_tokenizer, new_llama
    from .configs import PolicySFTConfig
    from .cost import ModelShape
    from .loading import LoadedModel, check_layout, load_model, model_layout, save_model
    from .training import episode_examples, is_main_process, train_sft

    started = time.perf_counter()
    if base is not None:
        loaded = load_model(base, device="cpu")
        layout = model_layout(loaded.meta, format, "history", goal_text)
        new_tokens = add_markers(loaded)
        check_layout(loaded, task, layout)
        tokenizer, meta = loaded.tokenizer, dict(loaded.meta)
        meta.pop("adapter", None)
        shape = ModelShape.of(loaded.model)
        for module in loaded.model.modules():  # dropout in the frozen layers only adds noise to the adapter's
            if isinstance(module, torch.nn.Dropout):  # training (measured: TV to p 0.036 -> 0.027 on GPT-2)
                module.p = 0.0
        with torch.random.fork_rng(devices=[]):  # peft draws the LoRA weights from torch's generator
            torch.manual_seed(config.seed)
            every_row = config.embeddings == "all"
            model = add_lora(loaded.model, lora_config(loaded.model, config.lora_r, config.lora_alpha,
                                                       new_tokens=() if every_row else new_tokens))
            if every_row:
                train_embeddings(model)
    else:
        layout = Layout(format or "compact", goal_text=goal_text)
        if layout.format != "compact" or goal_text is not None:
            raise ModelError("the built-in model reads the compact format with goal tokens only (its tokenizer "
                             "knows the task's words); condition a pretrained model (--base) for other text")
        tokenizer = build_tokenizer(task)
        model = new_llama(tokenizer, **MODEL_SIZES[config.model_size], seed=config.seed)
        meta, new_tokens = {}, []

    rng = np.random.default_rng(config.seed)
    n_bare = round(config.episodes * config.none_share / (1.0 - config.none_share))
    labelled = [("success" if e.success else "failure", e) for e in sample_outcome_balanced(task, config.episodes, rng)]
    examples = episode_examples(tokenizer, task, layout, labelled + [("none", e) for e in
                                                                     sample_prior_episodes(task, n_bare, rng)])
    callbacks, record = [], {}
    if base is not None:
        from .conditioning import OracleCheck, estimate_line, plan_conditioning

        plan = plan_conditioning(config, examples, [goal for goal, _ in labelled], shape, world)
        config = replace(config, batch_size=plan["batch_size"],
                         learning_rate=config.learning_rate or lora_learning_rate(shape.hidden_size))
        check = OracleCheck(LoadedModel(model, tokenizer, {}, "cpu"), task, layout, config.tolerance,
                            plan["check_every"], progress)
        callbacks.append(check)
        # a constant rate after the warmup: the oracle, not the budget, ends the run, and a rate
        # decaying to the budget starves the steps before it (a 0.4M GPT-2 stalled at TV 0.14 by
        # step 300 of 300, and passed at step 280 of a 1000-step budget)
        budget = {"max_steps": plan["max_steps"], "lr_scheduler_type": "constant_with_warmup"}
    else:
        budget = {"num_train_epochs": config.epochs}
    with tempfile.TemporaryDirectory(prefix="lmcoh-pretrain-") as scratch:
        args = PolicySFTConfig(output_dir=scratch, **budget, learning_rate=config.learning_rate,
                               global_batch_size=config.batch_size, seed=config.seed, data_seed=config.seed,
                               report_to=report_to, disable_tqdm=not progress)
        if base is not None and progress:
            print(estimate_line(base, task, plan, args.bf16), file=sys.stderr, flush=True)
        stats = train_sft(model, tokenizer, examples, args, average_last=config.average_last, callbacks=callbacks)
    faults.point("pretrain")
    if base is not None:
        record = {"check": check.verdict(stats["global_step"]), "estimate": plan["estimate"]}
        model = model.merge_and_unload()  # LoRA (and any trainable-token rows) into the weights: a plain directory
    meta.update({
        "kind": "prior",
        "task": {"name": task.name, "source": task.source, "spec": task.to_spec()},
        "format": layout.format, "prompt_mode": "history", "goal_text": layout.goal_text,
        "pretrain": {**asdict(config), "base": base, "added_tokens": tokenizer.convert_ids_to_tokens(new_tokens),
                     "examples": len(examples), "train_loss": stats.get("train_loss"), "steps": stats["global_step"],
                     **record, "seconds": round(time.perf_counter() - started, 2)},
    })
    if is_main_process():
        save_model(model, tokenizer, out, meta)
    return out
