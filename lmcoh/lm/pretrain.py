"""`lmcoh pretrain`: make the prior p a language model, from episodes of the task itself.

The theory's prior is "the behaviour the generative model was trained on". Here that is the
task's prior policy: sample episodes under p, label each with its outcome (drawn w.p. prod q),
and train a causal LM on ``GOAL_TOKEN + transcript``. Prompted with ``<success>`` the model
then gives p(a | s, O = 1) = G(p); a share of the transcripts is also shown with no goal token,
so the bare prompt gives p itself.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import faults
from ..errors import ModelError
from ..io import exclusive
from ..tasks.episodes import Episode, sample_outcome_balanced, sample_prior_episodes
from ..tasks.task import Task
from .text import episode_text

# Named model sizes (`lmcoh pretrain --model-size`, arguments of `lmcoh.model.new_llama`). A wide
# initialisation helps the tiny model pick up the goal token a dozen tokens back; "tiny" is tested.
MODEL_SIZES = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "initializer_range": 0.2},
    "small": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "initializer_range": 0.1},
    "medium": {"hidden_size": 256, "num_layers": 6, "num_heads": 8, "initializer_range": 0.05},
}


@dataclass
class PretrainConfig:
    episodes: int = 2000        # behind their outcome token, half successes (sample_outcome_balanced)
    epochs: float = 15.0
    seed: int = 0
    none_share: float = 1 / 3   # share of training transcripts with no goal token (extra episodes)
    learning_rate: float = 1e-2
    batch_size: int = 128
    model_size: str = "tiny"    # a key of MODEL_SIZES (ignored with a base model)
    average_last: float = 0.3   # end on the mean weights of this last share of steps (see train_sft)

    def check(self) -> None:
        """`ModelError` (one line) for settings that cannot train."""
        if self.episodes < 1:
            raise ModelError(f"need at least one episode, got {self.episodes}")
        if not self.epochs > 0 or not self.learning_rate > 0 or self.batch_size < 1:
            raise ModelError("epochs, learning rate and batch size must be positive")
        if not 0.0 <= self.none_share < 1.0:
            raise ModelError(f"the no-goal share must be in [0, 1), got {self.none_share}")
        if not 0.0 <= self.average_last < 1.0:
            raise ModelError(f"the averaged share of steps must be in [0, 1), got {self.average_last}")
        if self.model_size not in MODEL_SIZES:
            raise ModelError(f"unknown model size {self.model_size!r}; choose one of {', '.join(MODEL_SIZES)}")


def training_texts(task: Task, labelled: list[Episode], bare: list[Episode]) -> tuple[list[str], list[str]]:
    """Prompts (goal tokens) and completions (transcripts): ``labelled`` episodes behind their
    outcome token, ``bare`` ones behind no goal token."""
    prompts = ["<success>" if e.success else "<failure>" for e in labelled] + [""] * len(bare)
    completions = [episode_text(task, "none", e.states, e.actions) for e in labelled + bare]
    return prompts, completions


def pretrain(task: Task, out_dir: str | Path, *, episodes: int = PretrainConfig.episodes,
             epochs: float = PretrainConfig.epochs, seed: int = 0, base: str | None = None,
             model_size: str = PretrainConfig.model_size, none_share: float = PretrainConfig.none_share,
             learning_rate: float = PretrainConfig.learning_rate, batch_size: int = PretrainConfig.batch_size,
             average_last: float = PretrainConfig.average_last, progress: bool = False,
             report_to: str = "none") -> Path:
    """Pretrain a prior for ``task`` (or continue pretraining ``base``) and save it to ``out_dir``.

    Under a data-parallel launch every process trains (``batch_size`` is the global batch, split
    over the processes, so any number of processes trains the same model) and the main one
    holds ``out_dir``'s lock and saves.
    """
    config = PretrainConfig(episodes, epochs, seed, none_share, learning_rate, batch_size, model_size, average_last)
    config.check()
    from .model import check_out_dir
    from .training import is_main_process

    check_out_dir(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world:
        raise ModelError(f"the batch size {batch_size} does not split evenly over {world} processes")
    with exclusive(out_dir, "pretraining") if is_main_process() else nullcontext():
        return _pretrain(task, Path(out_dir), config, base, batch_size // world, progress, report_to)


def _pretrain(task: Task, out: Path, config: PretrainConfig, base: str | None, per_device_batch: int,
              progress: bool, report_to: str) -> Path:
    from .model import build_tokenizer, check_task_fits, load_model, new_llama, save_model
    from .training import is_main_process, sft_config, train_sft

    started = time.perf_counter()
    episodes, seed = config.episodes, config.seed
    if base is not None:
        loaded = load_model(base, device="cpu")
        check_task_fits(loaded, task)
        model, tokenizer, meta = loaded.model, loaded.tokenizer, dict(loaded.meta)
        meta.pop("adapter", None)
    else:
        tokenizer = build_tokenizer(task)
        model = new_llama(tokenizer, **MODEL_SIZES[config.model_size], seed=seed)
        meta = {}

    rng = np.random.default_rng(seed)
    n_bare = round(episodes * config.none_share / (1.0 - config.none_share))
    prompts, completions = training_texts(task, sample_outcome_balanced(task, episodes, rng),
                                          sample_prior_episodes(task, n_bare, rng))
    with tempfile.TemporaryDirectory(prefix="lmcoh-pretrain-") as scratch:
        args = sft_config(output_dir=scratch, num_train_epochs=config.epochs, learning_rate=config.learning_rate,
                          per_device_train_batch_size=per_device_batch, seed=seed, data_seed=seed,
                          report_to=report_to, disable_tqdm=not progress)
        stats = train_sft(model, tokenizer, prompts, completions, args, average_last=config.average_last)
    faults.point("pretrain")
    meta.update({
        "kind": "prior",
        "task": {"name": task.name, "source": task.source, "spec": task.to_spec()},
        "prompt_mode": "history",
        "pretrain": {**asdict(config), "base": base, "examples": len(prompts),
                     "train_loss": stats.get("train_loss"), "seconds": round(time.perf_counter() - started, 2)},
    })
    if is_main_process():
        save_model(model, tokenizer, out, meta)
    return out
