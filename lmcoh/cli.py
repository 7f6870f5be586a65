"""The ``lmcoh`` command line: argument parsing and error messages only.

Each subcommand is a ``_cmd_NAME(args)`` handler plus its block in `build_parser`. Oracle
commands (``tasks``, ``show``, ``exact``) never import torch; language-model commands import
it inside their handlers, so ``lmcoh exact`` starts fast.

Every user error (bad task file, bad spec, bad model directory, bad value) ends as one line
``lmcoh: error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .task import Task, TaskError


# ---- oracle commands ---------------------------------------------------------------------------

def _cmd_tasks(args: argparse.Namespace) -> None:
    from . import generators, library

    rows = [(name, library.load_task(name)) for name in library.builtin_tasks()]
    rows += [(spec, library.load_task(spec)) for spec in generators.EXAMPLES]
    width = max(len(name) for name, _ in rows)
    print(f"{'task':<{width}}  {'states':>7}  {'horizon':>7}  dynamics       description")
    for name, task in rows:
        dynamics = "deterministic" if task.deterministic else "stochastic"
        print(f"{name:<{width}}  {task.n_states:>7}  {task.horizon:>7}  {dynamics:<13}  {task.description}")


def _cmd_show(args: argparse.Namespace) -> None:
    from . import text
    from .library import load_task

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
    print("\nAs the model reads it (state chunk, then each action chunk with prior, q and next states):")
    shown = 0
    for s in range(task.n_states):
        if shown == args.limit:
            print(f"  ... {task.n_states - shown} more states (raise --limit to see them)")
            break
        shown += 1
        if task.terminal[s]:
            print(f"  [{task.state_names[s]}] {task.state_texts[s]}  (terminal, q = {math.exp(task.terminal_logq[s]):g})")
            continue
        print(f" {text.state_chunk(task, s, 0)}")
        for a in task.actions_of(s):
            nxt = ", ".join(f"{task.state_names[n]} {p:.3g}" if p < 1 else task.state_names[n]
                            for n, p in task.successors(a))
            print(f"    {text.action_chunk(task.action_names[a]):<28} prior {task.prior[a]:.3g}"
                  f"  q {math.exp(task.action_logq[a]):.3g}  -> {nxt}")
    states, actions = _first_path(task)
    print("\nAn episode (first action everywhere), as a success-conditioned transcript:")
    print(" ", text.episode_text(task, "success", states, actions).strip())


def _start_states(task: Task) -> list[int]:
    return [int(s) for s in task.start_prob.nonzero()[0]]


def _first_path(task: Task) -> tuple[list[int], list[int]]:
    """The most likely trajectory that always takes each state's first action."""
    s, states, actions = _start_states(task)[0], [], []
    for _ in range(task.horizon):
        if task.terminal[s]:
            break
        a = task.actions_of(s)[0]
        states.append(s)
        actions.append(a)
        s = max(task.successors(a), key=lambda succ: succ[1])[0]
    return states, actions


def _cmd_exact(args: argparse.Namespace) -> None:
    from . import exact
    from .library import load_task

    task = load_task(args.task)
    if args.json:
        result = exact.analyse(task, steps=args.steps, delta=args.delta, policies=not args.no_policies)
        print(json.dumps(_jsonable(result), allow_nan=False))
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


def _jsonable(x):
    """Plain JSON values: numpy scalars to Python, infinities to the strings 'inf' / '-inf'."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return x


def _cmd_study(args: argparse.Namespace) -> None:
    from . import study, study_report

    cfg = study.StudyConfig(tasks=args.tasks or [], seed=args.seed, quick=args.quick, runs=args.runs or [])
    result = study.run_study(cfg, progress=lambda line: print(f"study: {line}", file=sys.stderr, flush=True))
    out = study_report.write(_jsonable(result), args.out)
    print(f"{out}/report.md: " + "; ".join(f"{s['id']} {s['verdict']}" for s in result["sections"]))


# ---- language-model commands ---------------------------------------------------------------------
# pretrain, evaluate, sample, study: each is a `_cmd_NAME(args)` here plus a parser block in
# `build_parser` below; import torch / transformers / lmcoh's model modules inside the handler.


# ---- parsing and errors --------------------------------------------------------------------------

def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmcoh", description="Coherence of goal-conditioned language-model policies on small decision tasks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    task_help = "a task YAML file, a built-in name (see `lmcoh tasks`) or a generator spec (random-tree:T=4,A=3)"

    p = sub.add_parser("tasks", help="list the built-in tasks and generator examples")
    p.set_defaults(handler=_cmd_tasks)

    p = sub.add_parser("show", help="print a task as the model reads it, with basic stats")
    p.add_argument("task", metavar="TASK", help=task_help)
    p.add_argument("--limit", type=_nonnegative_int, default=40, help="print at most this many states (default 40)")
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

    # Language-model subcommands (pretrain, evaluate, sample, study) are added here.
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, not a bug; `ModelError` once the model layer is loaded."""
    errors = [TaskError, ValueError, FileNotFoundError, KeyboardInterrupt]
    model = sys.modules.get("lmcoh.model")
    if model is not None and hasattr(model, "ModelError"):
        errors.append(model.ModelError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except _user_errors() as err:
        message = " ".join(str(err).split()) or "interrupted"
        print(f"lmcoh: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
