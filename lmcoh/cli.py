"""The ``lmcoh`` command line: argument parsing and error messages only.

Each subcommand is a ``_cmd_NAME(args)`` handler plus its block in `build_parser`. Oracle
commands (``tasks``, ``show``, ``exact``) never import torch; language-model commands import
it inside their handlers, so ``lmcoh exact`` starts fast.

Every user error (bad task file, bad spec, bad model directory, bad value) ends as one line
``lmcoh: error: ...`` on stderr and exit status 2, never a traceback. The flags speak the
language of `lmcoh.flags` (one spelling, TRL's where the concept is TRL's, older spellings
hidden aliases); a command that writes refuses to replace what is there without ``--overwrite``
(`lmcoh.io.check_output`), before any work. ``lmcoh pretrain --base`` exits with `BUDGET_SPENT`
(3) when its budget of steps ran out before the oracle signed the model off.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from . import flags
from .errors import DivergenceError, LmcohError
from .io import check_output, dumps, jsonable, write_jsonl
from .oracle import specs
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
        print(f"{name:<{width}}  {task.n_states:>7}  {task.horizon:>7}  {_dynamics(task):<13}  {task.description}")


def _dynamics(task: Task, start: bool = False) -> str:
    """``deterministic`` or ``stochastic`` (the moves); with ``start``, whether the start is random."""
    dynamics = "deterministic" if task.deterministic else "stochastic"
    return f"{dynamics}, random start" if start and task.random_start else dynamics


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
          f"{task.n_actions} actions, horizon {task.horizon}, {_dynamics(task)} dynamics"
          f"{', random start' if task.random_start else ''}"
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
    """`lmcoh show --task TASK --plot FILE --policy SPEC`: the decision graph under one policy."""
    from .tasks.library import load_task

    path = check_output(args.plot, args.overwrite, "--plot", kind="file")
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
    from .oracle import exact, klrl
    from .tasks.library import load_task

    task = load_task(args.task)
    elements = sum(len(layer.states) + len(layer.actions) + len(layer.trans) for layer in task.layers)
    budget.check(f"the exact oracle on {task.name!r} over {args.steps} steps",
                 budget.oracle_bytes(elements, task.n_actions, args.steps, tables=args.json and not args.no_policies,
                                     sequences=len(exact.ALL_SEQUENCES)))
    if args.json:
        result = exact.analyse(task, steps=args.steps, delta=args.delta, policies=not args.no_policies,
                               epsilon=args.epsilon)
        print(dumps(result))
        return
    print(f"{task.name} ({_dynamics(task, start=True)}, horizon {task.horizon}, delta {args.delta:g}, "
          f"optimal success {exact.optimal_success(task):.6g})")
    s0 = _start_states(task)[0]
    first = task.layers[0]
    i0 = int((first.states == s0).nonzero()[0][0])
    lo, hi = int(first.start[i0]), int(first.start[i0 + 1])
    shown = range(lo, min(hi, lo + 3))
    heads = [f"pi({task.action_names[first.actions[j]]}|{task.state_names[s0]})" for j in shown]
    header = f"{'k':>3}  {'success':>9}  {'return':>9}  {'incoherence':>11}  {'finite part':>11}  {'entropy':>8}"
    header += "".join(f"  {h:>{max(10, len(h))}}" for h in heads)
    for kind in exact.ALL_SEQUENCES:
        title = {"klrl": f"klrl: max E[sum log max(q, {args.epsilon:g})] - (1/k) KL(pi || p)",
                 "klrl_success": "klrl_success: max E[success] - (1/k) KL(pi || p)"}.get(kind, kind)
        print(f"\n{title}")
        rows, note = [], ""
        try:
            for k, pi, s in exact.summarised_sequence(task, kind, args.steps, args.delta, args.epsilon):
                row = (f"{k:>3}  {s['success']:>9.6f}  {s['return']:>9.4f}  {s['incoherence']:>11.6f}"
                       f"  {s['incoherence_finite_part']:>11.6f}  {s['causal_entropy']:>8.4f}")
                rows.append(row + "".join(f"  {pi[0][j]:>{max(10, len(h))}.6f}" for j, h in zip(shown, heads)))
                note = klrl.over_histories(s["histories"]) if "histories" in s else note
        except klrl.TooManyHistories as err:
            print(f"  left out: {err}")
            continue
        print("\n".join([header] + rows))
        if note:
            print(f"  ({note})")


def _cmd_study(args: argparse.Namespace) -> None:
    from .study import claims as study
    from .study import report as study_report

    study_report.check_output(args.output_dir, args.overwrite)  # before the study, not after it
    cfg = study.StudyConfig(tasks=args.tasks or [], seed=args.seed, quick=args.quick, runs=args.runs or [])
    result = study.run_study(cfg, progress=lambda line: print(f"study: {line}", file=sys.stderr, flush=True))
    out = study_report.write(jsonable(result), args.output_dir, args.overwrite)
    print(f"{out}/report.md: {study.verdict_counts(result)}")


# ---- language-model commands ---------------------------------------------------------------------
# pretrain, evaluate, sample, card: each is a `_cmd_NAME(args)` here plus a parser block in
# `build_parser` below; import torch / transformers / lmcoh's model modules inside the handler.

def _check_goal_text(args: argparse.Namespace) -> None:
    if args.goal_text is not None and getattr(args, "goal", "success") != "success":
        raise LmcohError(f"--goal_text states the success goal; it cannot go with --goal {args.goal}")


def _load_for_task(args: argparse.Namespace):
    """The task, then the model (and adapter) and its layout checked against it: cheap errors first."""
    from .lm.loading import open_for_task
    from .tasks.library import load_task

    _check_goal_text(args)
    task = load_task(args.task)
    loaded, layout = open_for_task(args.model, task, adapter=args.adapter, format=args.format, prompt=args.prompt,
                                   goal_text=args.goal_text)
    return task, loaded, layout


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .lm.pretrain import pretrain
    from .tasks.library import load_task

    check_output(args.output_dir, args.overwrite, "--output_dir")
    _check_goal_text(args)
    task = load_task(args.task)
    flag = {"episodes": "pretrain_episodes", "epochs": "pretrain_epochs", "batch_size": "global_batch_size"}
    settings = {name: getattr(args, flag.get(name, name)) for name in ("episodes", "epochs", "batch_size", "seed",
                                                                      "model_size", "learning_rate", "none_share",
                                                                      "lora_r", "embeddings", "tolerance", "max_steps")}
    settings = {name: value for name, value in settings.items() if value is not None}  # PretrainConfig's fields
    try:
        out = pretrain(task, args.output_dir, base=args.base, format=args.format, goal_text=args.goal_text,
                       progress=not args.disable_tqdm, **settings)
    except DivergenceError as err:
        raise LmcohError(f"{err}; the learning rate is the likely cause: lower --learning_rate") from None
    if not args.base:
        print(f"{out}: prior for {task.name} (built-in model, seed {args.seed})", file=sys.stderr)
        return 0
    from .io import read_json
    from .lm.loading import META_FILE

    check = read_json(out / META_FILE)["pretrain"]["check"]
    figures = (f"TV to G(p) {check['tv_success_to_g']:.4f} with <success>, to p {check['tv_none_to_p']:.4f} "
               f"with no goal (tolerance {check['tolerance']:g})")
    if not check["within_tolerance"]:
        print(f"lmcoh: pretrain: the budget of {check['steps']} steps ran out at {figures}; the closest model "
              f"checked (step {check['kept_step']}) is in {out}; raise --max_steps or --pretrain_episodes",
              file=sys.stderr)
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
                              seed=args.seed, batch_size=args.sample_batch_size, mc_episodes=args.eval_episodes,
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

    out = check_output(args.output_file, args.overwrite, "--output_file", kind="file")
    if not out.parent.is_dir():
        raise LmcohError(f"--output_file {out}: no such directory {str(out.parent)!r}")
    task, loaded, layout = _load_for_task(args)
    episodes = sample_episodes(loaded, task, args.episodes, goal=args.goal, seed=args.seed,
                               temperature=args.temperature, batch_size=args.sample_batch_size, layout=layout)
    writer = Writer(task, layout, loaded.tokenizer)
    write_jsonl(out, [episode_record(writer, episode) for episode in episodes])
    rate = f"{sum(e.success for e in episodes) / len(episodes):.4f}" if episodes else "undefined (no episodes)"
    print(f"{out}: {len(episodes)} episodes, sampled success rate {rate}", file=sys.stderr)


def _cmd_card(args: argparse.Namespace) -> None:
    from . import __version__
    from .lm import card
    from .lm.loading import load_model
    from .report import card as card_files
    from .tasks.library import builtin_tasks, load_task

    out = check_output(args.output_dir, args.overwrite, "--output_dir")
    tasks = [load_task(ref) for ref in args.tasks or builtin_tasks()]
    loaded = load_model(args.model)
    layout = card.layout(loaded, args.format, args.prompt, args.goal_text)
    rows = list(card.measure(loaded, tasks, layout, report=lambda line: print(f"card: {line}", file=sys.stderr,
                                                                             flush=True),
                             seed=args.seed, batch_size=args.sample_batch_size, max_histories=args.max_histories,
                             mc_episodes=args.eval_episodes, progress=True))
    result = jsonable({"model": args.model, "format": layout.format, "prompt": layout.mode,
                       "goal_text": layout.goal_text, "lmcoh_version": __version__, "tasks": rows})
    card_files.write(out, result)
    if args.json:
        print(dumps(result))
    measured = sum("error" not in row for row in rows)
    print(f"{out}/card.md: {measured} of {len(rows)} tasks measured", file=sys.stderr)


# ---- parsing and errors --------------------------------------------------------------------------

def _number(kind: type, text: str, ok, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def _positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "an integer >= 1")


def _positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0 and not math.isinf(v), "a positive number")


def _add_layout_options(p: flags.Parser, *, prompt: str, format: str, goal_text: str) -> None:
    """How the model reads a task (`lmcoh.lm.text.Layout`); the arguments say each default."""
    from .lm.text import FORMATS, PROMPT_MODES

    p.add_argument("--prompt", choices=PROMPT_MODES,
                   help=f"history: the whole transcript; markov: only the current state and step (default: {prompt})")
    p.add_argument("--format", choices=FORMATS,
                   help=f"compact, natural or chat (the tokenizer's chat template) (default: {format})")
    p.add_argument("--goal_text", metavar="TEXT",
                   help=f"state the success goal in these words instead of the <success> token (default: {goal_text})")


def _add_tabulation_options(p: flags.Parser) -> None:
    """How an LM policy is tabulated: exactly over its histories, or by Monte Carlo past a size."""
    p.add_argument("--max_histories", type=_nonnegative_int, metavar="N", default=200_000,
                   help="tabulate exactly up to this many histories, else Monte Carlo (default 200000)")
    p.add_argument("--eval_episodes", type=_positive_int, metavar="N", default=4000, aliases=("--mc-episodes",),
                   help="episodes for the Monte Carlo estimate (default 4000)")


def _unit_float(text: str) -> float:
    return _number(float, text, lambda v: 0 < v < 1, "a number between 0 and 1")


def _share(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def build_parser() -> flags.Parser:
    """The `lmcoh` parser: every flag in the one spelling of `lmcoh.flags` (underscores, as TRL
    spells its own), its older spellings hidden aliases."""
    from . import __version__
    from .oracle.klrl import EPSILON as klrl_epsilon  # numpy only

    parser = flags.Parser(prog="lmcoh", description="Coherence of goal-conditioned language-model policies on small "
                                                    "decision tasks.",
                          epilog="Exit status: 0 done; 2 a usage or input error (one line on stderr); 130 "
                                 "interrupted. Every flag has one spelling (underscores, as TRL spells them); "
                                 "older spellings still work.")
    parser.add_argument("--version", action="version", version=f"lmcoh {__version__}")
    parser.add_argument("--memory_limit_gb", type=_positive_float, metavar="GB", aliases=("--memory-limit",),
                        help="refuse work estimated to need more memory than this (default: half the "
                             f"machine's memory, at most 8; also {budget.ENV}); before or after the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    task_help = "a task YAML file, a built-in name (see `lmcoh tasks`) or a generator spec (random-tree:T=4,A=3)"

    def task(p, **kwargs):
        p.add_argument("--task", required=True, help=task_help, **kwargs)

    def overwrite(p, what: str):
        p.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} (default: refuse)")

    p = sub.add_parser("tasks", help="list the built-in tasks and generator examples")
    p.set_defaults(handler=_cmd_tasks)

    p = sub.add_parser("show", help="print a task as the model reads it, with basic stats")
    task(p, positional_alias=True)
    p.add_argument("--limit", type=_nonnegative_int, metavar="N", default=40, help="print at most this many states (default 40)")
    p.add_argument("--plot", metavar="FILE", help="draw the decision graph into FILE (.png or .svg) instead")
    p.add_argument("--policy", metavar="SPEC",
                   help=f"the policy drawn: {specs.SPECS} (an LM prompted with <success>); default p")
    overwrite(p, "--plot file")
    p.set_defaults(handler=_cmd_show)

    p = sub.add_parser("exact", help="exact success, return and incoherence along every sequence")
    task(p, positional_alias=True)
    p.add_argument("--steps", type=_nonnegative_int, metavar="K", default=4, help="sequence length K: k = 0..K (default 4)")
    p.add_argument("--delta", type=_positive_float, metavar="DELTA", default=1.0, help="incoherence temperature delta (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--no_policies", action="store_true", help="leave the policies out of the JSON")
    p.add_argument("--epsilon", type=_unit_float, metavar="EPSILON", default=klrl_epsilon,
                   help=f"the floor of q in the klrl reward R = sum log max(q, epsilon) (default {klrl_epsilon:g})")
    p.set_defaults(handler=_cmd_exact)

    p = sub.add_parser("study", help="check every claim of the paper on exact numbers; write a report")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="tasks to study instead of the built-in tasks and generated families")
    p.add_argument("--output_dir", default="outputs/study", metavar="DIR", aliases=("--out",),
                   help="the report directory to write (default outputs/study)")
    overwrite(p, "study in --output_dir")
    p.add_argument("--seed", type=_nonnegative_int, metavar="N", default=0, help="seed of the generated tasks (default 0)")
    p.add_argument("--runs", nargs="+", metavar="DIR", help="self-training output directories to compare")
    p.add_argument("--quick", action="store_true", help="fewer and smaller tasks (a few seconds)")
    p.set_defaults(handler=_cmd_study)

    from .lm.pretrain import (DEFAULTS, EMBEDDINGS, LEAST_BATCH, LORA_RATE, LORA_RATE_WIDTH,  # numpy only: keeps
                              MODEL_SIZES, PretrainConfig)  # `lmcoh exact` free of torch
    from .lm.text import FORMATS

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
    task(p, positional_alias=True)
    p.add_argument("--output_dir", required=True, metavar="DIR", aliases=("--out",), help="the model directory to write")
    overwrite(p, "model in --output_dir")
    p.add_argument("--base", metavar="MODEL",
                   help="condition this pretrained causal LM (a directory, a GGUF file, or a hub id in the local "
                        "cache): LoRA plus the embeddings, merged into OUTPUT_DIR")
    p.add_argument("--format", choices=FORMATS,
                   help="text format (default: compact, or the base model's own); natural and chat need --base")
    p.add_argument("--goal_text", metavar="TEXT", help="write this statement instead of the <success> token")
    p.add_argument("--pretrain_episodes", type=_positive_int, metavar="N", aliases=("--episodes",),
                   help=f"episodes sampled under the prior, behind their outcome token ({default('episodes')})")
    p.add_argument("--pretrain_epochs", type=_positive_float, metavar="N", aliases=("--epochs",),
                   help=f"passes over the episodes (default {DEFAULTS['built-in']['epochs']:g} for the built-in "
                        "model; with --base a budget in passes instead of --max_steps)")
    p.add_argument("--learning_rate", type=_positive_float, metavar="LR",
                   help=f"peak learning rate (default {DEFAULTS['built-in']['learning_rate']:g} for the built-in model; "
                        f"with --base {LORA_RATE:g} x sqrt({LORA_RATE_WIDTH} / the model's hidden size))")
    p.add_argument("--global_batch_size", type=_positive_int, metavar="N", aliases=("--batch-size",),
                   help=f"sequences per optimiser step, over all processes (default {DEFAULTS['built-in']['batch_size']} "
                        "for the built-in model; with --base as many as fit a step's budget of FLOPs and memory, "
                        f"each distinct transcript run once, at least {LEAST_BATCH})")
    p.add_argument("--seed", type=_nonnegative_int, metavar="N", default=defaults.seed, help="seed (default 0)")
    p.add_argument("--model_size", choices=MODEL_SIZES,
                   help=f"size of the built-in model (default {defaults.model_size})")
    p.add_argument("--lora_r", type=_positive_int, metavar="R", help=f"LoRA rank with --base (default {defaults.lora_r})")
    p.add_argument("--embeddings", choices=EMBEDDINGS,
                   help=f"with --base: the embedding rows trained beside LoRA: all, or only the new markers' (for a "
                        f"vocabulary too large to train; default {defaults.embeddings})")
    p.add_argument("--none_share", type=_share, metavar="SHARE", help="share of transcripts shown with no goal (default 1/3)")
    p.add_argument("--tolerance", type=_positive_float, metavar="TV",
                   help=f"with --base: stop once within this total variation of G(p) and of p "
                        f"(default {defaults.tolerance:g})")
    p.add_argument("--max_steps", type=_positive_int, metavar="N",
                   help=f"with --base: the budget of optimiser steps (default {DEFAULTS['base']['max_steps']})")
    p.add_argument("--disable_tqdm", action="store_true", aliases=("--quiet",), help="no progress bar")
    p.set_defaults(handler=_cmd_pretrain)

    for name, help_text in (("evaluate", "tabulate an LM policy exactly and measure it with the oracle"),
                            ("sample", "sample episodes from an LM policy with the environment in the loop")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", metavar="MODEL", help="an lmcoh or Hugging Face causal-LM directory, a GGUF file, "
                                                      "or a hub id in the local cache")
        task(p)
        p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter directory to load on top of the model")
        p.add_argument("--goal", choices=("success", "failure", "none"), default="success",
                       help="the goal written before every action: the <success> or <failure> token, or none "
                            "(default success)")
        p.add_argument("--temperature", type=_positive_float, metavar="T", default=1.0, help="logit temperature (default 1)")
        _add_layout_options(p, prompt="the model's own, else history", format="the model's own, else compact",
                            goal_text="the model's own, else the token")
        p.add_argument("--seed", type=_nonnegative_int, metavar="N", default=0, help="seed (default 0)")
        p.add_argument("--sample_batch_size", type=_positive_int, metavar="N", default=256, aliases=("--batch-size",),
                       help="sequences per forward pass (default 256)")
        if name == "evaluate":
            p.add_argument("--delta", type=_positive_float, metavar="DELTA", default=1.0, help="incoherence temperature (default 1)")
            _add_tabulation_options(p)
            p.add_argument("--reference", choices=("task", "model"),
                           help="whose prior p the re-training sequence G^k(p) starts from: the task's, or the "
                                "model's own policy with no goal (default: task for a model lmcoh conditioned, "
                                "else model)")
            p.add_argument("--json", action="store_true", help="print one JSON object")
            p.set_defaults(handler=_cmd_evaluate)
        else:
            p.add_argument("--episodes", type=_nonnegative_int, metavar="N", required=True, aliases=("-n",),
                           help="number of episodes to sample")
            p.add_argument("--output_file", required=True, metavar="FILE.jsonl", aliases=("--out",),
                           help="where to write the episodes")
            overwrite(p, "--output_file")
            p.set_defaults(handler=_cmd_sample)

    p = sub.add_parser("card", help="a model's coherence, task by task: prompted with the goal against exact "
                                    "conditioning of its own behaviour (card.json, card.md, card.png)")
    p.add_argument("model", metavar="MODEL", help="an lmcoh or Hugging Face causal-LM directory, a GGUF file, "
                                                  "or a hub id in the local cache")
    p.add_argument("--output_dir", required=True, metavar="DIR", aliases=("--out",), help="the card's directory")
    overwrite(p, "card in --output_dir")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to measure (default: the built-in tasks)")
    _add_layout_options(p, prompt="the model's own, else markov, under which G(p_M) exactly conditions the "
                                  "model's own policy",
                        format="the model's own, else chat where the tokenizer has a chat template, natural "
                               "otherwise",
                        goal_text="the model's own; for a model lmcoh did not condition, \"Choose so that you "
                                  "succeed.\"")
    p.add_argument("--seed", type=_nonnegative_int, metavar="N", default=0,
                   help="seed of the Monte Carlo estimates (default 0)")
    p.add_argument("--sample_batch_size", type=_positive_int, metavar="N", default=256, aliases=("--batch-size",),
                   help="rows per forward pass, at most (default 256; fewer where memory asks)")
    _add_tabulation_options(p)
    p.add_argument("--json", action="store_true", help="also print card.json")
    p.set_defaults(handler=_cmd_card)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status: 0 done, 2 a usage or input error (one line on stderr),
    130 interrupted (Ctrl-C), or the status an error names (`LmcohError.exit_status`)."""
    args = build_parser().parse_args(argv)  # a usage error exits here, status 2, one line
    try:
        budget.set_limit_gb(args.memory_limit_gb)
        return args.handler(args) or 0
    except LmcohError as err:
        print(f"lmcoh: error: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("lmcoh: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
