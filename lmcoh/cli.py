"""The ``lmcoh`` command line: argument parsing and error messages only.

Each subcommand is a ``_cmd_NAME(args)`` handler plus its block in `build_parser`. Oracle
commands (``tasks``, ``show``, ``exact``) never import torch; language-model commands import
it inside their handlers, so ``lmcoh exact`` starts fast.

Every user error (bad task file, bad spec, bad model directory, bad value) ends as one line
``lmcoh: error: ...`` on stderr and exit status 2, never a traceback. ``lmcoh pretrain --base``
exits with `BUDGET_SPENT` (3) when its budget of steps ran out before the oracle signed the
model off.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .errors import LmcohError
from .io import dumps, jsonable, write_jsonl
from .tasks import budget
from .tasks.task import Task

BUDGET_SPENT = 3  # `lmcoh pretrain --base`: the budget of steps ran out before the oracle signed the model off


# ---- oracle commands ---------------------------------------------------------------------------

def _cmd_tasks(args: argparse.Namespace) -> None:
    from .tasks import generators, library

    rows = [(name, library.load_task(name)) for name in library.builtin_tasks()]
    rows += [(spec, library.load_task(spec)) for spec in generators.EXAMPLES]
    width = max(len(name) for name, _ in rows)
    print(f"{'task':<{width}}  {'states':>7}  {'horizon':>7}  dynamics       description")
    for name, task in rows:
        dynamics = "deterministic" if task.deterministic else "stochastic"
        print(f"{name:<{width}}  {task.n_states:>7}  {task.horizon:>7}  {dynamics:<13}  {task.description}")


def _cmd_show(args: argparse.Namespace) -> None:
    if args.plot is not None:
        _show_plot(args)
        return
    if args.policy is not None:
        raise LmcohError("--policy chooses the policy of the picture: give --plot FILE too")
    from .lm import text
    from .tasks.library import load_task

    task = load_task(args.task)
    reachable = {int(s) for layer in task.layers for s in layer.states}
    print(f"{task.name}: {task.description}" if task.description else task.name)
    print(f"  {task.n_states} states ({int((~task.terminal).sum())} with actions, "
          f"{int(task.terminal.sum())} terminal, {len(reachable)} reachable decision states), "
          f"{task.n_actions} actions, horizon {task.horizon}, "
          f"{'deterministic' if task.deterministic else 'stochastic'} dynamics"
          f"{', states recur across steps' if task.recurring else ''}")
    start = ", ".join(f"{task.state_names[s]} {task.start_prob[s]:g}" for s in _start_states(task)[:8])
    print(f"  start: {start}; running out of decisions succeeds with q = {math.exp(task.timeout_logq):g}")
    writer = text.Writer(task)
    print("\nAs the model reads it, compact format (state chunk, then each action chunk with prior, q and next states):")
    shown = 0
    for s in range(task.n_states):
        if shown == args.limit:
            print(f"  ... {task.n_states - shown} more states (raise --limit to see them)")
            break
        shown += 1
        if task.terminal[s]:
            print(f"  [{task.state_names[s]}] {task.state_texts[s]}  (terminal, q = {math.exp(task.terminal_logq[s]):g})")
            continue
        print(f"  {writer.state('none', s, 0)}")
        for a in task.actions_of(s):
            nxt = ", ".join(f"{task.state_names[n]} {p:.3g}" if p < 1 else task.state_names[n]
                            for n, p in task.successors(a))
            print(f"    {writer.action(a):<28} prior {task.prior[a]:.3g}"
                  f"  q {math.exp(task.action_logq[a]):.3g}  -> {nxt}")
    states, actions = _first_path(task)
    print("\nAn episode (first action everywhere), as a success-conditioned transcript:")
    print(" ", writer.episode("success", states, actions).strip())


def _show_plot(args: argparse.Namespace) -> None:
    """`lmcoh show TASK --plot FILE --policy SPEC`: the decision graph under one policy."""
    from .tasks.library import load_task

    path = Path(args.plot)
    if path.suffix.lower() not in (".png", ".svg"):
        raise LmcohError(f"{args.plot}: the picture must be a .png or .svg file")
    if not path.parent.is_dir():
        raise LmcohError(f"{args.plot}: no such directory {str(path.parent)!r}")
    task = load_task(args.task)
    from .report.taskgraph import plot_policies, policy_from_spec  # matplotlib: only for a picture

    spec = args.policy or "p"
    title, policy = policy_from_spec(task, spec)
    graph = plot_policies(path, task, [(f"{task.name} under {spec}: {title}", policy)])[0]
    print(f"{path}: {task.name} under {spec} ({title}), {graph.note or f'{len(graph.nodes)} nodes'}")


def _start_states(task: Task) -> list[int]:
    return [int(s) for s in task.start_prob.nonzero()[0]]


def _first_path(task: Task) -> tuple[list[int], list[int]]:
    """The most likely trajectory that always takes each state's first action."""
    s, states, actions = _start_states(task)[0], [], []
    for _ in range(task.steps):
        if task.terminal[s]:
            break
        a = task.actions_of(s)[0]
        states.append(s)
        actions.append(a)
        s = max(task.successors(a), key=lambda succ: succ[1])[0]
    return states, actions


def _cmd_exact(args: argparse.Namespace) -> None:
    from .oracle import exact
    from .tasks.library import load_task

    task = load_task(args.task)
    elements = sum(len(layer.states) + len(layer.actions) + len(layer.trans) for layer in task.layers)
    budget.check(f"the exact oracle on {task.name!r} over {args.steps} steps",
                 budget.oracle_bytes(elements, task.n_actions, args.steps, tables=args.json and not args.no_policies))
    if args.json:
        result = exact.analyse(task, steps=args.steps, delta=args.delta, policies=not args.no_policies)
        print(dumps(result))
        return
    dynamics = "deterministic" if task.deterministic else "stochastic"
    print(f"{task.name} ({dynamics}, horizon {task.horizon}, delta {args.delta:g}, "
          f"optimal success {exact.optimal_success(task):.6g})")
    s0 = _start_states(task)[0]
    first = task.layers[0]
    i0 = int((first.states == s0).nonzero()[0][0])
    lo, hi = int(first.start[i0]), int(first.start[i0 + 1])
    shown = range(lo, min(hi, lo + 3))
    heads = [f"pi({task.action_names[first.actions[j]]}|{task.state_names[s0]})" for j in shown]
    header = f"{'k':>3}  {'success':>9}  {'return':>9}  {'incoherence':>11}  {'entropy':>8}"
    header += "".join(f"  {h:>{max(10, len(h))}}" for h in heads)
    for kind in exact.SEQUENCES:
        print(f"\n{kind}")
        print(header)
        for k, pi in enumerate(exact.sequence(task, kind, args.steps)):
            s = exact.summary(task, pi, args.delta)
            row = (f"{k:>3}  {s['success']:>9.6f}  {s['return']:>9.4f}  {s['incoherence']:>11.6f}"
                   f"  {s['causal_entropy']:>8.4f}")
            row += "".join(f"  {pi[0][j]:>{max(10, len(h))}.6f}" for j, h in zip(shown, heads))
            print(row)


def _cmd_study(args: argparse.Namespace) -> None:
    from .study import claims as study
    from .study import report as study_report

    cfg = study.StudyConfig(tasks=args.tasks or [], seed=args.seed, quick=args.quick, runs=args.runs or [])
    result = study.run_study(cfg, progress=lambda line: print(f"study: {line}", file=sys.stderr, flush=True))
    out = study_report.write(jsonable(result), args.out)
    print(f"{out}/report.md: {study.verdict_counts(result)}")


# ---- language-model commands ---------------------------------------------------------------------
# pretrain, evaluate, sample, study: each is a `_cmd_NAME(args)` here plus a parser block in
# `build_parser` below; import torch / transformers / lmcoh's model modules inside the handler.

def _check_goal_text(args: argparse.Namespace) -> None:
    if args.goal_text is not None and getattr(args, "goal", "success") != "success":
        raise LmcohError(f"--goal-text states the success goal; it cannot go with --goal {args.goal}")


def _load_for_task(args: argparse.Namespace):
    """The task, then the model (and adapter) and its layout checked against it: cheap errors first."""
    from .lm.model import check_task_fits, load_model, model_layout
    from .tasks.library import load_task

    _check_goal_text(args)
    task = load_task(args.task)
    loaded = load_model(args.model, adapter=args.adapter)
    layout = model_layout(loaded.meta, args.format, args.prompt, args.goal_text)
    check_task_fits(loaded, task, layout)
    return task, loaded, layout


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .lm.pretrain import pretrain
    from .tasks.library import load_task

    _check_goal_text(args)
    task = load_task(args.task)
    settings = {k: getattr(args, k) for k in ("episodes", "epochs", "seed", "model_size", "learning_rate",
                                              "batch_size", "none_share", "lora_r", "tolerance", "max_steps")
                if getattr(args, k) is not None}
    out = pretrain(task, args.out, base=args.base, format=args.format, goal_text=args.goal_text,
                   progress=not args.quiet, **settings)
    if not args.base:
        print(f"{out}: prior for {task.name} (built-in model, seed {args.seed})", file=sys.stderr)
        return 0
    from .io import read_json
    from .lm.model import META_FILE

    check = read_json(out / META_FILE)["pretrain"]["check"]
    figures = (f"TV to G(p) {check['tv_success_to_g']:.4f} with <success>, to p {check['tv_none_to_p']:.4f} "
               f"with no goal (tolerance {check['tolerance']:g})")
    if not check["within_tolerance"]:
        print(f"lmcoh: pretrain: the budget of {check['steps']} steps ran out at {figures}; the closest model "
              f"checked (step {check['kept_step']}) is in {out}; raise --max-steps or --episodes", file=sys.stderr)
        return BUDGET_SPENT
    print(f"{out}: prior for {task.name} (LoRA-conditioned {args.base}, seed {args.seed}): {figures} after "
          f"{check['steps']} steps", file=sys.stderr)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .lm import metrics

    task, loaded, layout = _load_for_task(args)
    reference = args.reference or ("task" if loaded.meta.get("task") else "model")
    result = metrics.evaluate(loaded, task, goal=args.goal, temperature=args.temperature, layout=layout,
                              delta=args.delta, max_histories=args.max_histories, reference=reference,
                              seed=args.seed, batch_size=args.batch_size, mc_episodes=args.mc_episodes,
                              progress=not args.json)
    if args.json:
        print(dumps(result))
        return
    how = (f"exact over {result['histories']} histories" if result["exact"] else
           f"Monte Carlo over {result['episodes']} episodes ({result['histories']} histories)")
    print(f"{task.name}: goal {args.goal}, temperature {args.temperature:g}, {layout.format} format, "
          f"{layout.mode} prompts, {how}")
    ci = f" +- {result['success_ci']:.4f}" if not result["exact"] else ""
    print(f"  success {result['success']:.6f}{ci}   return {result['return']}   "
          f"incoherence {result['incoherence']} (finite part {result['incoherence_finite_part']:.6g})")
    tokens = result["token_incoherence"]
    print(f"  token incoherence {tokens['total']}, by position: "
          + " ".join(f"{x:.4g}" if isinstance(x, float) else x for x in tokens["by_position"]))
    whose = "p, the task's prior" if reference == "task" else "p_M, the model's own policy with no goal"
    print(f"  TV to G^k({whose}), k = 0..4: " + " ".join(f"{x:.4f}" for x in result["tv_to_retrain"]))
    print("  policy:")
    width = max(len(k) for k in result["policy"])
    for key, row in result["policy"].items():
        print(f"    {key:<{width}}  " + "  ".join(f"{a} {p:.4f}" for a, p in row.items()))


def _cmd_sample(args: argparse.Namespace) -> None:
    from .lm.rollout import sample_episodes
    from .lm.text import Writer, episode_record

    out = os.path.abspath(args.out)
    if os.path.isdir(out) or not os.path.isdir(os.path.dirname(out)):
        raise LmcohError(f"{args.out}: not a file in an existing directory")
    task, loaded, layout = _load_for_task(args)
    episodes = sample_episodes(loaded, task, args.n, goal=args.goal, seed=args.seed,
                               temperature=args.temperature, batch_size=args.batch_size, layout=layout)
    writer = Writer(task, layout, loaded.tokenizer)
    write_jsonl(out, [episode_record(writer, episode) for episode in episodes])
    rate = sum(e.success for e in episodes) / max(len(episodes), 1)
    print(f"{args.out}: {len(episodes)} episodes, sampled success rate {rate:.4f}", file=sys.stderr)


# ---- parsing and errors --------------------------------------------------------------------------

def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmcoh", description="Coherence of goal-conditioned language-model policies on small decision tasks.")
    parser.add_argument("--memory-limit", type=_positive_float, metavar="GB",
                        help="refuse work estimated to need more memory than this (default: half the "
                             "machine's memory, at most 8; also LMCOH_MEMORY_LIMIT_GB)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    task_help = "a task YAML file, a built-in name (see `lmcoh tasks`) or a generator spec (random-tree:T=4,A=3)"

    p = sub.add_parser("tasks", help="list the built-in tasks and generator examples")
    p.set_defaults(handler=_cmd_tasks)

    p = sub.add_parser("show", help="print a task as the model reads it, with basic stats")
    p.add_argument("task", metavar="TASK", help=task_help)
    p.add_argument("--limit", type=_nonnegative_int, default=40, help="print at most this many states (default 40)")
    p.add_argument("--plot", metavar="FILE", help="draw the decision graph into FILE (.png or .svg) instead")
    p.add_argument("--policy", metavar="SPEC",
                   help="the policy drawn: p (default), retrain:K, temperature:A, fold:K, fold_ratio:K, "
                        "cumulative:K, boltzmann (coherent) or model:DIR (an LM prompted with <success>)")
    p.set_defaults(handler=_cmd_show)

    p = sub.add_parser("exact", help="exact success, return and incoherence along every sequence")
    p.add_argument("task", metavar="TASK", help=task_help)
    p.add_argument("--steps", type=_nonnegative_int, default=4, help="sequence length K: k = 0..K (default 4)")
    p.add_argument("--delta", type=_positive_float, default=1.0, help="incoherence temperature delta (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--no-policies", action="store_true", help="leave the policies out of the JSON")
    p.set_defaults(handler=_cmd_exact)

    p = sub.add_parser("study", help="check every claim of the paper on exact numbers; write a report")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="tasks to study instead of the built-in tasks and generated families")
    p.add_argument("--out", default="outputs/study", help="output directory (default outputs/study)")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of the generated tasks (default 0)")
    p.add_argument("--runs", nargs="+", metavar="DIR", help="self-training output directories to compare")
    p.add_argument("--quick", action="store_true", help="fewer and smaller tasks (a few seconds)")
    p.set_defaults(handler=_cmd_study)

    from .lm.pretrain import (DEFAULTS, LEAST_BATCH, LORA_RATE, LORA_RATE_WIDTH, MODEL_SIZES,  # numpy only:
                              PretrainConfig)  # no torch
    from .lm.text import FORMATS, PROMPT_MODES

    def default(name: str) -> str:
        return f"default {DEFAULTS['built-in'][name]:g} for the built-in model, {DEFAULTS['base'][name]:g} with --base"

    defaults = PretrainConfig()
    p = sub.add_parser("pretrain", help="train an LM on the task's own episodes: the prior p (built-in model, "
                                        "or a pretrained one conditioned with LoRA)",
                       epilog=f"With --base, training stops once the oracle signs the model off (its exact TVs to "
                              f"G(p) with <success> and to p with no goal both within --tolerance) and the exit "
                              f"status is 0; if the budget of steps runs out first, the closest model checked is "
                              f"saved, one line gives the figures, and the exit status is {BUDGET_SPENT}. "
                              f"Bad input exits with status 2.")
    p.add_argument("task", metavar="TASK", help=task_help)
    p.add_argument("--out", required=True, metavar="DIR", help="the model directory to write")
    p.add_argument("--base", metavar="DIR_OR_HUB_ID",
                   help="condition this pretrained causal LM (a directory, or a hub id in the local cache): "
                        "LoRA plus the new marker tokens, merged into OUT")
    p.add_argument("--format", choices=FORMATS,
                   help="text format (default: compact, or the base model's own); natural and chat need --base")
    p.add_argument("--goal-text", metavar="TEXT", help="write this statement instead of the <success> token")
    p.add_argument("--episodes", type=_positive_int,
                   help=f"episodes sampled under the prior, behind their outcome token ({default('episodes')})")
    p.add_argument("--epochs", type=_positive_float,
                   help=f"passes over the data (default {DEFAULTS['built-in']['epochs']:g} for the built-in model; "
                        "with --base a budget in passes instead of --max-steps)")
    p.add_argument("--seed", type=_nonnegative_int, default=defaults.seed, help="seed (default 0)")
    p.add_argument("--model-size", choices=MODEL_SIZES,
                   help=f"size of the built-in model (default {defaults.model_size})")
    p.add_argument("--learning-rate", type=_positive_float,
                   help=f"peak learning rate (default {DEFAULTS['built-in']['learning_rate']:g} for the built-in model; "
                        f"with --base {LORA_RATE:g} x sqrt({LORA_RATE_WIDTH} / the model's hidden size))")
    p.add_argument("--batch-size", type=_positive_int,
                   help=f"sequences per step over all processes (default {DEFAULTS['built-in']['batch_size']} for "
                        "the built-in model; with --base as many as fit a step's budget of FLOPs and memory, "
                        f"each distinct transcript run once, at least {LEAST_BATCH})")
    p.add_argument("--lora-r", type=_positive_int, help=f"LoRA rank with --base (default {defaults.lora_r})")
    p.add_argument("--none-share", type=float, help="share of transcripts shown with no goal token (default 1/3)")
    p.add_argument("--tolerance", type=_positive_float,
                   help=f"with --base: stop once within this total variation of G(p) and of p "
                        f"(default {defaults.tolerance:g})")
    p.add_argument("--max-steps", type=_positive_int,
                   help=f"with --base: the budget of optimiser steps (default {DEFAULTS['base']['max_steps']})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_pretrain)

    for name, help_text in (("evaluate", "tabulate an LM policy exactly and measure it with the oracle"),
                            ("sample", "sample episodes from an LM policy with the environment in the loop")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", metavar="MODEL", help="an lmcoh or Hugging Face causal-LM directory, or a hub id "
                                                      "in the local cache")
        p.add_argument("--task", required=True, help=task_help)
        p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter directory to load on top of the model")
        p.add_argument("--goal", choices=("success", "failure", "none"), default="success",
                       help="the goal token the prompt starts with (default success)")
        p.add_argument("--temperature", type=_positive_float, default=1.0, help="logit temperature (default 1)")
        p.add_argument("--prompt", choices=PROMPT_MODES,
                       help="history: the whole transcript; markov: only the current state and step "
                            "(default: the model's own, else history)")
        p.add_argument("--format", choices=FORMATS,
                       help="compact, natural or chat (the tokenizer's chat template) (default: the model's own, "
                            "else compact)")
        p.add_argument("--goal-text", metavar="TEXT",
                       help="state the success goal in these words instead of the <success> token "
                            "(default: the model's own, else the token)")
        p.add_argument("--seed", type=_nonnegative_int, default=0, help="seed (default 0)")
        p.add_argument("--batch-size", type=_positive_int, default=256,
                       help="sequences per forward pass (default 256)")
        if name == "evaluate":
            p.add_argument("--delta", type=_positive_float, default=1.0, help="incoherence temperature (default 1)")
            p.add_argument("--max-histories", type=_nonnegative_int, default=200_000,
                           help="tabulate exactly up to this many histories, else Monte Carlo (default 200000)")
            p.add_argument("--mc-episodes", type=_positive_int, default=4000,
                           help="episodes for the Monte Carlo estimate (default 4000)")
            p.add_argument("--reference", choices=("task", "model"),
                           help="whose prior p the re-training sequence G^k(p) starts from: the task's, or the "
                                "model's own policy with no goal (default: task for a model lmcoh conditioned, "
                                "else model)")
            p.add_argument("--json", action="store_true", help="print one JSON object")
            p.set_defaults(handler=_cmd_evaluate)
        else:
            p.add_argument("-n", type=_nonnegative_int, required=True, help="number of episodes")
            p.add_argument("--out", required=True, metavar="FILE.jsonl", help="where to write the episodes")
            p.set_defaults(handler=_cmd_sample)

    # Language-model subcommands (pretrain, evaluate, sample, study) are added here.
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        budget.set_limit_gb(args.memory_limit)
        return args.handler(args) or 0
    except (LmcohError, KeyboardInterrupt) as err:
        message = str(err) or "interrupted"
        print(f"lmcoh: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
