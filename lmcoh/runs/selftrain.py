"""The pieces of a self-training round; the loop itself is recipes/self_train.py.

docs/theory.md, "Goal conditioning and retraining": pi_0 = p, pi_{k+1} = G(pi_k). In a
language model, round 0 is the pretrained prior prompted with ``<success>`` (approximately
G(p)); round k = 1..K samples episodes from the current success-prompted model, keeps the
successful ones (``filter``) or keeps all behind their outcome token (``label``), fine-tunes
the adapter on them, and evaluates the success-prompted model exactly against the oracle's
target G^(k+1)(p).

Determinism: every round reseeds from (seed, round) and loads its model from disk, so a run
resumed after a kill computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .. import faults, io
from ..errors import LmcohError, RunError
from ..lm import text
from ..oracle import exact
from ..tasks.task import Task
from .arguments import LOOP_OVERRIDES
from .directory import RunDirectory

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


def check_inputs(args, sft, model_args) -> Task:
    """Everything that can be checked before any work: the memory limit, the task, the model
    (present, safetensors, able to write the task), the output directory, the batch split.
    Returns the task."""
    from ..lm.model import check_task_fits, model_init_kwargs
    from ..tasks import budget
    from ..tasks.library import load_task

    budget.set_limit_gb(args.memory_limit_gb)
    task = load_task(args.task)
    out = Path(sft.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"output_dir {out} exists and is not a directory")
    if model_args.model_name_or_path:
        given = evaluated_model(model_args.model_name_or_path, None, 0, model_init_kwargs(model_args))
        check_task_fits(given, task, layout(args, given.meta))
    return task


def per_device_batch(args, sft, processes: int) -> int:
    """The per-device batch that keeps ``global_batch_size`` sequences per optimiser step."""
    if not args.global_batch_size:
        return sft.per_device_train_batch_size
    split = processes * sft.gradient_accumulation_steps
    if args.global_batch_size % split:
        raise RunError(f"global_batch_size {args.global_batch_size} does not split evenly over {processes} "
                       f"process(es) x {sft.gradient_accumulation_steps} accumulation step(s)")
    return args.global_batch_size // split


def config_header() -> str:
    """The comment config.yaml starts with: what the loop overrides in each round."""
    lines = ["Every resolved setting of this run (--config reads it back). The loop sets these",
             "trainer settings itself in each round K:"]
    lines += [f"  {name}: {how}" for name, how in LOOP_OVERRIDES.items()]
    return "".join(f"# {line}\n" for line in lines)


def replace_output_dir(sft, output_dir: Path):
    """The same `SFTConfig` writing to ``output_dir``."""
    return dataclasses.replace(sft, output_dir=str(output_dir))


def round_args(sft, run: RunDirectory, k: int, per_device_batch: int):
    """Round k's `SFTConfig`: the user's, with `LOOP_OVERRIDES` applied."""
    seed = round_seed(sft.seed, k)
    return dataclasses.replace(sft, output_dir=str(run.path / "trainer" / f"round_{k}"), seed=seed,
                               data_seed=seed if sft.data_seed is None else sft.data_seed,
                               per_device_train_batch_size=per_device_batch)


@contextmanager
def failing_as_round(k: int, sft):
    """A failure inside round k (a diverged training, a model gone non-finite) names the round
    and the likely cause; nothing of the round has been written, so the earlier rounds stay
    resumable."""
    try:
        yield
    except LmcohError as err:
        hint = ""
        if "not finite" in str(err):  # training made the weights blow up: say what to change
            hint = (f"; the learning rate ({sft.learning_rate:g}) is the likely cause: lower --learning_rate "
                    "or --max_grad_norm")
        raise RunError(f"round {k}: {err}{hint}") from None


@contextmanager
def tensorboard_dir(sft, run: RunDirectory, k: int):
    """Point the Trainer's TensorBoard callback at OUTPUT_DIR/tensorboard/round_k for one round."""
    wanted = "tensorboard" in (sft.report_to or [])
    saved = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if wanted:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.path / "tensorboard" / f"round_{k}")
    try:
        yield
    finally:
        if wanted:
            if saved is None:
                os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
            else:
                os.environ["TENSORBOARD_LOGGING_DIR"] = saved


def layout(args, meta: dict) -> text.Layout:
    """The layout of the run: its format, prompt mode and goal text, else the model's own."""
    from ..lm.model import model_layout

    return model_layout(meta, args.format or None, args.prompt, args.goal_text)


def training_examples(tokenizer, task: Task, layout: text.Layout, episodes, mode: str) -> list:
    """SFT examples (`lmcoh.lm.training.episode_examples`): ``filter`` keeps successful episodes
    under the goal ``success``; ``label`` keeps every episode under its own outcome."""
    from ..lm.training import episode_examples

    kept = [("success" if ep.success else "failure", ep) for ep in episodes if ep.success or mode == "label"]
    return episode_examples(tokenizer, task, layout, kept)


def round_model(base: str, run: RunDirectory, k: int, model_args, init_kwargs: dict):
    """The model round k trains, loaded for training: the base with a fresh adapter (k = 1,
    from `trl.get_peft_config`), round k-1's adapter (k > 1), or, without peft, round k-1's
    whole model."""
    from trl import get_peft_config

    from ..lm.model import add_lora, load_model

    peft = get_peft_config(model_args)
    previous = run.round_dir(k - 1) / "model"
    if peft is None:
        return load_model(base if k == 1 else str(previous), **init_kwargs)
    if k == 1:
        loaded = load_model(base, **init_kwargs)
        loaded.model = add_lora(loaded.model, peft)
        return loaded
    return load_model(base, adapter=str(previous), trainable=True, **init_kwargs)


def evaluated_model(base: str, run: RunDirectory, k: int, init_kwargs: dict):
    """The model after round k (the base for k = 0), loaded for inference."""
    from ..lm.model import load_model

    if k == 0:
        return load_model(base, **init_kwargs)
    saved = run.round_dir(k) / "model"
    if (saved / "adapter_config.json").is_file():
        return load_model(base, adapter=str(saved), **init_kwargs)
    return load_model(str(saved), **init_kwargs)


def evaluate_round(args, loaded, task: Task, layout: text.Layout, target: exact.Policy, seed: int) -> dict:
    """Tabulate the success-prompted model and compare it with the exact ``target`` G^(k+1)(p).

    Returns ``{"metrics": ..., "eval": ...}``: the metrics.jsonl values, and the full
    `lmcoh evaluate` object. Tasks with more than ``max_histories`` histories get a Monte Carlo
    success estimate (``seed``) with ``success_ci`` and no targets.
    """
    from ..lm.metrics import report
    from ..lm.tabulate import tabulate

    lm = tabulate(loaded, task, "success", layout=layout, max_histories=args.max_histories,
                  batch_size=args.sample_batch_size, mc_episodes=args.eval_episodes, seed=seed)
    detail = report(task, lm, "success", args.delta)
    metrics = {"success": detail["success"], "incoherence": detail["incoherence"],
               "token_incoherence": detail["token_incoherence"]["total"]}
    if lm.exact:
        metrics.update({"target_success": exact.success(task, target),
                        "tv_to_target": exact.tv_distance(task, lm.policy, target),
                        "target_incoherence": exact.incoherence(task, target, args.delta)})
    else:
        metrics.update({"success_ci": detail["success_ci"], "target_success": None, "tv_to_target": None,
                        "target_incoherence": None, "incoherence": None, "token_incoherence": None})
    return {"metrics": metrics, "eval": detail}


def metrics_line(k: int, evaluation: dict, episodes: list, kept: int,
                 seconds: tuple[float, float, float]) -> dict:
    """The metrics.jsonl line of round k."""
    m = evaluation["metrics"]
    line = {"round": k, "success": m["success"]}
    if m.get("success_ci") is not None:
        line["success_ci"] = m["success_ci"]
    line.update({
        "target_success": m["target_success"], "tv_to_target": m["tv_to_target"],
        "incoherence": m["incoherence"], "target_incoherence": m["target_incoherence"],
        "token_incoherence": m["token_incoherence"],
        "sampled_success_rate": float(np.mean([ep.success for ep in episodes])) if episodes else None,
        "episodes_sampled": len(episodes), "episodes_kept": kept,
        "sample_seconds": seconds[0], "train_seconds": seconds[1], "eval_seconds": seconds[2]})
    return io.jsonable(line)


def write_round(run: RunDirectory, k: int, task: Task, layout: text.Layout, loaded, episodes: list, line: dict,
                detail: dict) -> None:
    """Write round k into rounds/.tmp-k, rename it to rounds/k, rebuild metrics.jsonl."""
    from ..lm.model import save_model

    tmp = run.begin_round(k)
    if k > 0:
        save_model(loaded.model, loaded.tokenizer, tmp / "model",
                   {**loaded.meta, "selftrain": {"round": k, "task": task.name}})
        writer = text.Writer(task, layout, loaded.tokenizer)
        io.write_jsonl(tmp / "episodes.jsonl", [text.episode_record(writer, ep) for ep in episodes])
    faults.point("write_round")
    io.write_json(tmp / "eval.json", detail)
    io.write_json(tmp / "metrics.json", line)
    run.commit_round(k, tmp)


def summary(line: dict, rounds: int) -> str:
    """One line per round for the terminal."""
    def f(x):
        return x if isinstance(x, str) or x is None else f"{x:.4f}"
    return (f"round {line['round']}/{rounds}: success {f(line['success'])} "
            f"(target {f(line['target_success'])}), tv_to_target {f(line['tv_to_target'])}, "
            f"incoherence {f(line['incoherence'])}, kept {line['episodes_kept']}/{line['episodes_sampled']}, "
            f"{line['sample_seconds']:.1f}s sample, {line['train_seconds']:.1f}s train, "
            f"{line['eval_seconds']:.1f}s eval")


def write_report(run: RunDirectory, args, task: Task, config: dict) -> Path:
    """report.md and plots for the rounds complete in the run directory."""
    from ..report.selftrain import write_selftrain_report

    rows = run.complete_rounds()
    details = [io.read_json(run.round_dir(r["round"]) / "eval.json") for r in rows]
    faults.point("report")
    return write_selftrain_report(run.path, rows, details, task_name=task.name, mode=args.mode,
                                  optimum=exact.optimal_success(task), config=config, task=task)


def no_successes(k: int, n: int) -> RunError:
    return RunError(f"round {k}: none of the {n} sampled episodes succeeded; "
                    "raise episodes_per_round or use --mode label")
