"""What every policy-training run has: the task, the run directory, the base model, the layout its
episodes are written in, the built-in prior. `lmcoh.runs.selftrain.SelfTraining` and
`lmcoh.runs.klrl.KLRL` are runs; their recipes are recipes/self_train.py and recipes/kl_rl.py."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from .. import io
from ..lm import text
from ..tasks import budget
from ..tasks.library import load_task
from .directory import RunDirectory, resolved_config


class Run:
    """One run into ``trainer.output_dir``, built from the recipe's parsed (arguments, trainer config,
    model config). It checks every input before any work: the memory limit, the task, the model
    (present, safetensors, its tokenizer able to write the task), the output directory."""

    def __init__(self, args, trainer_args, model_args, state=None):
        from accelerate import PartialState

        from ..lm.loading import model_init_kwargs

        self.args, self.model_args = args, model_args
        self.state = PartialState() if state is None else state
        budget.set_limit_gb(args.memory_limit_gb)
        self.task = load_task(args.task)
        self.run = RunDirectory(io.check_output(trainer_args.output_dir, True, "output_dir"))  # a directory, not under a file
        self.init_kwargs = {**model_init_kwargs(model_args), **(trainer_args.model_init_kwargs or {})}  # TRL's from_pretrained
        self.base = model_args.model_name_or_path or str(self.run.path / "prior")
        self.layout = self._layout(model_args.model_name_or_path)
        self.config = resolved_config(args, trainer_args, model_args)
        self.progress = not trainer_args.disable_tqdm and self.state.is_main_process
        self.seed = trainer_args.seed

    @property
    def path(self) -> Path:
        return self.run.path

    def _layout(self, ref: str | None) -> text.Layout:
        """The layout the run writes episodes in; a given model is checked (its tokenizer only) to
        write every text of the task."""
        from ..lm.loading import model_layout, open_for_task

        a = self.args
        if not ref:
            return model_layout({}, a.format or None, a.prompt, a.goal_text)
        return open_for_task(ref, self.task, format=a.format or None, prompt=a.prompt, goal_text=a.goal_text,
                             weights=False)[1]

    def header(self) -> str:
        """The comment config.yaml starts with."""
        return "# Every resolved setting of this run (--config reads it back).\n"

    # ---- the directory ------------------------------------------------------------------------
    @contextmanager
    def opened(self):
        """Lock, check and prepare the run directory (main process; every process hears its
        verdict). Yields the number of rounds already complete; the lock is held until the end."""
        with self.run.opened(self.state, self.config, self.args.overwrite, header=self.header()) as done:
            yield done

    def pretrain_prior(self) -> None:
        """The prior p when no model is given: lmcoh's built-in one, pretrained on the task's own
        episodes into OUTPUT_DIR/prior (every process trains, the main one saves)."""
        from ..lm.pretrain import pretrain

        prior = self.run.path / "prior"
        if self.model_args.model_name_or_path or prior.is_dir():
            return
        if self.state.is_main_process:
            print(f"pretraining the built-in prior for {self.task.name} into {prior}", flush=True)
        pretrain(self.task, prior, format=self.args.format or None, goal_text=self.args.goal_text,
                 episodes=self.args.pretrain_episodes, epochs=self.args.pretrain_epochs, seed=self.seed,
                 progress=self.progress)
        self.state.wait_for_everyone()
