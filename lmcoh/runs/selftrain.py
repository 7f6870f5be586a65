"""A self-training run as one object; the loop itself is recipes/self_train.py.

docs/theory.md, "Goal conditioning and retraining": pi_0 = p, pi_{k+1} = G(pi_k). In a
language model, round 0 is the pretrained prior prompted with ``<success>`` (approximately
G(p)); round k = 1..K samples episodes from the current success-prompted model, keeps the
successful ones (``filter``) or keeps all behind their outcome token (``label``), fine-tunes
the adapter on them, and evaluates the success-prompted model exactly against the oracle's
target G^(k+1)(p).

`SelfTraining` is built once from the recipe's parsed arguments and holds what every round
needs: the task, the run directory, the base model, the exact targets, the seed rule. Its
methods are the loop's steps; the plumbing that is not the algorithm (seeds, data-parallel
shards and their gathering, timing, logs, writing) stays inside them.

Determinism: every round reseeds from (seed, round) and loads its model from disk, so a run
resumed after a kill computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import faults, io
from ..errors import DivergenceError, LmcohError, RunError
from ..lm import text
from ..oracle import exact
from .arguments import LOOP_OVERRIDES, SelfTrainArguments
from .run import Run


def round_seed(seed: int, round_: int, rank: int = 0) -> int:
    """A 31-bit seed for (seed, round, process rank), independent across all three."""
    return int(np.random.SeedSequence([seed, round_, rank]).generate_state(1)[0] >> 1)


def shard_sizes(n: int, world: int) -> list[int]:
    """Split n episodes over ``world`` processes as evenly as possible (earlier ranks get more)."""
    return [n // world + (r < n % world) for r in range(world)]


def shard(n: int, state) -> range:
    """This process's contiguous share of n episodes: gathered in rank order, the shares are
    the n episodes one process would draw from the same seeded table."""
    sizes = shard_sizes(n, state.num_processes)
    lo = sum(sizes[:state.process_index])
    return range(lo, lo + sizes[state.process_index])


def config_header() -> str:
    """The comment config.yaml starts with: what the loop overrides in each round."""
    lines = ["Every resolved setting of this run (--config reads it back). The loop sets these",
             "trainer settings itself in each round K:"]
    lines += [f"  {name}: {how}" for name, how in LOOP_OVERRIDES.items()]
    return "".join(f"# {line}\n" for line in lines)


def training_examples(tokenizer, task, layout: text.Layout, episodes, mode: str) -> list:
    """SFT examples (`lmcoh.lm.training.episode_examples`): ``filter`` keeps successful episodes
    under the goal ``success``; ``label`` keeps every episode under its own outcome."""
    from ..lm.training import episode_examples

    kept = [("success" if ep.success else "failure", ep) for ep in episodes if ep.success or mode == "label"]
    return episode_examples(tokenizer, task, layout, kept)


@dataclass
class _Round:
    """What round k has done so far: its episodes, the examples kept, the seconds of each step."""

    k: int
    episodes: list = field(default_factory=list)
    kept: int = 0
    steps: int = 0  # gradient steps
    seconds: dict = field(default_factory=lambda: {"sample": 0.0, "train": 0.0})


class SelfTraining(Run):
    """One self-training run into ``sft.output_dir`` (docs/theory.md, "Goal conditioning and retraining"),
    built from the recipe's (`SelfTrainArguments`, `PolicySFTConfig`, `PolicyModelConfig`)."""

    def __init__(self, args: SelfTrainArguments, sft, model_args, state=None):
        super().__init__(args, sft, model_args, state)
        self.sft = sft
        self.targets = exact.sequence(self.task, "retrain", args.rounds + 1)  # round k's target: G^(k+1)(p)
        self._round: _Round | None = None
        self._integrations: Integrations | None = None

    @classmethod
    def from_directory(cls, path: str | Path, state=None) -> "SelfTraining":
        """The run in ``path`` as its config.yaml describes it (wherever the directory is now)."""
        from .arguments import make_parser, parse

        config = Path(path) / "config.yaml"
        if not config.is_file() or not (Path(path) / "rounds" / "0" / "metrics.json").is_file():
            raise RunError(f"{path} holds no complete self-training round (no config.yaml or rounds/0)")
        return cls(*parse(make_parser(), ["--config", str(config), "--output_dir", str(path)]), state=state)

    def header(self) -> str:
        return config_header()

    # ---- a round ------------------------------------------------------------------------------
    @contextmanager
    def round(self, k: int):
        """Round k: reseeded from (seed, k); a failure inside names the round and the likely
        cause, and nothing of the round is written, so the earlier rounds stay resumable."""
        from transformers import set_seed

        set_seed(round_seed(self.sft.seed, k))
        self._round = _Round(k)
        try:
            yield
        except DivergenceError as err:
            raise RunError(f"round {k}: {err}; the learning rate ({self.sft.learning_rate:g}) is the likely cause: "
                           "lower --learning_rate or --max_grad_norm") from None
        except LmcohError as err:
            raise RunError(f"round {k}: {err}") from None
        finally:
            self._round = None
        self.state.wait_for_everyone()

    def model(self, k: int):
        """The model round k starts from: the prior (k = 0, for inference), else loaded to train:
        the base with a fresh adapter (k = 1, from `trl.get_peft_config`), round k-1's adapter
        (k > 1) or, without peft, round k-1's whole model."""
        from trl import get_peft_config

        from ..lm.adapters import add_lora
        from ..lm.loading import load_model

        peft = get_peft_config(self.model_args)
        previous = self.run.round_dir(k - 1) / "model"
        if k == 0:
            loaded = load_model(self.base, **self.init_kwargs)
        elif peft is None:
            loaded = load_model(self.base if k == 1 else str(previous), **self.init_kwargs)
        elif k == 1:
            loaded = load_model(self.base, **self.init_kwargs)
            loaded.model = add_lora(loaded.model, peft)
        else:
            loaded = load_model(self.base, adapter=str(previous), trainable=True, **self.init_kwargs)
        return loaded

    def trained_model(self, k: int):
        """The model after round k (the prior for k = 0), loaded for inference."""
        from ..lm.loading import load_model

        saved = self.run.round_dir(k) / "model"
        if k == 0:
            return load_model(self.base, **self.init_kwargs)
        if (saved / "adapter_config.json").is_file():
            return load_model(self.base, adapter=str(saved), **self.init_kwargs)
        return load_model(str(saved), **self.init_kwargs)

    def sample(self, model) -> list:
        """``episodes_per_round`` episodes from the success-prompted model: each process draws its
        share of one seeded table, and every process gets them all."""
        from accelerate.utils import gather_object

        from ..lm.rollout import sample_episodes

        r, n, t0 = self._round, self.args.episodes_per_round, time.perf_counter()
        episodes = sample_episodes(model, self.task, n, goal="success", layout=self.layout,
                                   seed=round_seed(self.sft.seed, r.k), rows=shard(n, self.state),
                                   batch_size=self.args.sample_batch_size, progress=self.progress)
        if self.state.num_processes > 1:
            episodes = gather_object(episodes)
        r.episodes, r.seconds["sample"] = episodes, time.perf_counter() - t0
        return episodes

    def keep(self, model, episodes: list) -> list:
        """The training examples: the successful episodes (``filter``), or every episode behind
        its outcome token (``label``)."""
        examples = training_examples(model.tokenizer, self.task, self.layout, episodes, self.args.mode)
        if not examples:
            raise RunError(f"none of the {len(episodes)} sampled episodes succeeded; "
                           "raise --episodes_per_round or use --mode label")
        self._round.kept = len(examples)
        return examples

    def train(self, model, examples: list) -> dict:
        """Fine-tune ``model`` on ``examples`` with TRL's SFTTrainer: the user's `SFTConfig` with
        only `LOOP_OVERRIDES` changed. The Trainer's log lines go to OUTPUT_DIR/logs/, not the terminal."""
        from ..lm.training import train_sft

        r, t0 = self._round, time.perf_counter()
        seed = round_seed(self.sft.seed, r.k)
        args = dataclasses.replace(self.sft, output_dir=str(self.run.path / "trainer" / f"round_{r.k}"), seed=seed,
                                   data_seed=seed if self.sft.data_seed is None else self.sft.data_seed)
        logs = self.run.path / "logs"
        logs.mkdir(exist_ok=True)
        with _tensorboard_dir(args, self.run.path / "tensorboard" / f"round_{r.k}"):
            stats = train_sft(model.model, model.tokenizer, examples, args, log_file=logs / f"round_{r.k}.jsonl")
        r.seconds["train"], r.steps = time.perf_counter() - t0, int(stats.get("global_step", 0))
        return stats

    def evaluate(self, model) -> dict | None:
        """Tabulate the success-prompted model, compare it with the exact target G^(k+1)(p) and write
        the round (main process only); print its summary line. Returns the metrics.jsonl line."""
        if not self.state.is_main_process:
            return None
        from ..lm.loading import save_model

        r, t0 = self._round, time.perf_counter()
        metrics, detail = self._evaluation(model, r.k)
        line = _metrics_line(r, metrics, time.perf_counter() - t0)
        tmp = self.run.begin_round(r.k)
        if r.k > 0:
            save_model(model.model, model.tokenizer, tmp / "model",
                       {**model.meta, "selftrain": {"round": r.k, "task": self.task.name}})
            writer = text.Writer(self.task, self.layout, model.tokenizer)
            io.write_jsonl(tmp / "episodes.jsonl", [text.episode_record(writer, ep) for ep in r.episodes])
        faults.point("write_round")
        io.write_json(tmp / "eval.json", detail)
        io.write_json(tmp / "metrics.json", line)
        self.run.commit_round(r.k, tmp)
        if self._integrations is None:
            self._integrations = Integrations(self.sft, self.run.path / "tensorboard" / "metrics")
        self._integrations.log(r.k, line)
        print(summary(line, self.args.rounds), flush=True)
        return line

    def _evaluation(self, loaded, k: int) -> tuple[dict, dict]:
        """(the metrics.jsonl values, the full `lmcoh evaluate` object) of the model after round k.
        Tasks with more than ``max_histories`` histories get a Monte Carlo success estimate with
        ``success_ci`` and no targets."""
        from ..lm.metrics import report
        from ..lm.tabulate import tabulate

        a, target = self.args, self.targets[k + 1]
        lm = tabulate(loaded, self.task, "success", layout=self.layout, max_histories=a.max_histories,
                      batch_size=a.sample_batch_size, mc_episodes=a.eval_episodes,
                      seed=round_seed(self.sft.seed, k, 1 << 16))
        detail = report(self.task, lm, "success", a.delta)
        metrics = {"success": detail["success"], "incoherence": detail["incoherence"],
                   "incoherence_finite_part": detail["incoherence_finite_part"],
                   "token_incoherence": detail["token_incoherence"]["total"]}
        if lm.exact:
            metrics.update({"target_success": exact.success(self.task, target),
                            "tv_to_target": exact.tv_distance(self.task, lm.policy, target),
                            "target_incoherence": exact.incoherence(self.task, target, a.delta)})
        else:
            metrics.update({"success_ci": detail["success_ci"], "target_success": None, "tv_to_target": None,
                            "target_incoherence": None, "incoherence": None, "incoherence_finite_part": None,
                            "token_incoherence": None})
        return metrics, detail

    # ---- the end ------------------------------------------------------------------------------
    def finish(self) -> Path | None:
        """Remove the Trainer's scratch and write report.md with its plots (main process)."""
        if not self.state.is_main_process:
            return None
        from ..report.selftrain import write_selftrain_report

        shutil.rmtree(self.run.path / "trainer", ignore_errors=True)
        if self._integrations is not None:
            self._integrations.close()
        rows = self.run.complete_rounds()
        details = [io.read_json(self.run.round_dir(r["round"]) / "eval.json") for r in rows]
        faults.point("report")
        out = write_selftrain_report(self.run.path, rows, details, task_name=self.task.name, mode=self.args.mode,
                                     optimum=exact.optimal_success(self.task), config=self.config, task=self.task)
        print(f"report: {out}", flush=True)
        return out


def _metrics_line(r: _Round, m: dict, eval_seconds: float) -> dict:
    """The metrics.jsonl line of round ``r``."""
    line = {"round": r.k, "success": m["success"]}
    if m.get("success_ci") is not None:
        line["success_ci"] = m["success_ci"]
    line.update({
        "target_success": m["target_success"], "tv_to_target": m["tv_to_target"],
        "incoherence": m["incoherence"], "incoherence_finite_part": m["incoherence_finite_part"],
        "target_incoherence": m["target_incoherence"], "token_incoherence": m["token_incoherence"],
        "sampled_success_rate": float(np.mean([ep.success for ep in r.episodes])) if r.episodes else None,
        "episodes_sampled": len(r.episodes), "episodes_kept": r.kept, "gradient_steps": r.steps,
        "sample_seconds": r.seconds["sample"], "train_seconds": r.seconds["train"], "eval_seconds": eval_seconds})
    return io.jsonable(line)


def summary(line: dict, rounds: int) -> str:
    """One line per round for the terminal."""
    def f(x):
        return x if isinstance(x, str) or x is None else f"{x:.4f}"

    incoherence = f(line["incoherence"])
    if line["incoherence"] == "inf" and line.get("incoherence_finite_part") is not None:
        incoherence += f" (finite part {f(line['incoherence_finite_part'])})"
    return (f"round {line['round']}/{rounds}: success {f(line['success'])} "
            f"(target {f(line['target_success'])}), tv_to_target {f(line['tv_to_target'])}, "
            f"incoherence {incoherence}, kept {line['episodes_kept']}/{line['episodes_sampled']}, "
            f"{line['sample_seconds']:.1f}s sample, {line['train_seconds']:.1f}s train, "
            f"{line['eval_seconds']:.1f}s eval")


class Integrations:
    """The run's own metrics (success, targets, TV, incoherence, ...) to every ``report_to``
    integration, as one run with a step per round: transformers' integration callbacks, made
    once per run and fed ``on_log`` with ``global_step`` = the round, under ``eval/`` names.
    TensorBoard writes them to ``logdir`` (OUTPUT_DIR/tensorboard/metrics; the Trainer's own
    scalars of round K go to tensorboard/round_K). Non-finite values (an infinite incoherence)
    are left out; its finite part is there."""

    def __init__(self, sft, logdir: Path):
        from transformers import TrainerControl, TrainerState
        from transformers.integrations import get_reporting_integration_callbacks

        self.args, self.control = sft, TrainerControl()
        with _tensorboard_dir(sft, logdir):
            self.callbacks = [cls() for cls in get_reporting_integration_callbacks(sft.report_to)]
        for callback in self.callbacks:
            callback.on_train_begin(sft, TrainerState(), self.control)

    def log(self, k: int, line: dict) -> None:
        from transformers import TrainerState

        logs = {f"eval_{key}": float(value) for key, value in line.items()
                if key != "round" and isinstance(value, (int, float)) and np.isfinite(value)}
        for callback in self.callbacks:
            callback.on_log(self.args, TrainerState(global_step=k), self.control, logs=logs)

    def close(self) -> None:
        from transformers import TrainerState

        for callback in self.callbacks:
            callback.on_train_end(self.args, TrainerState(), self.control)


@contextmanager
def _tensorboard_dir(sft, logdir: Path):
    """Point the Trainer's TensorBoard callback at ``logdir`` for one round."""
    wanted = "tensorboard" in (sft.report_to or [])
    saved = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if wanted:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logdir)
    try:
        yield
    finally:
        if wanted:
            if saved is None:
                os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
            else:
                os.environ["TENSORBOARD_LOGGING_DIR"] = saved
