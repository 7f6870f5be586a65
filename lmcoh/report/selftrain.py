"""The self-training report: report.md with its table, reading and plots (success,
incoherence, TV to the exact target per round).

The functions take plain rows (dicts as in metrics.jsonl, lmcoh.io's JSON convention), so any
recipe that produces rounds can reuse them.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..io import number, write_text
from ..oracle import exact
from ..tasks.task import Task
from .plots import plot_rounds
from .tables import fmt, markdown_table
from .taskgraph import plot_policies


def _infinite_rounds(rows: list[dict], key: str) -> str:
    bad = [r["round"] for r in rows if math.isinf(number(r.get(key)))]
    return f"{key} infinite at rounds {bad} (not drawn)" if bad else ""


def selftrain_plots(out: Path, rows: list[dict], details: list[dict], optimum: float) -> list[Path]:
    """success.png, incoherence.png and tv.png for self-training rounds."""
    ks = [r["round"] for r in rows]
    lm = {"marker": "o", "color": "C0"}
    exact_style = {"marker": "x", "linestyle": "--", "color": "C1"}
    paths = [plot_rounds(
        out / "success.png",
        [("LM (success prompt)", ks, [r["success"] for r in rows], lm),
         ("exact S(G^(k+1)(p))", ks, [r["target_success"] for r in rows], exact_style),
         ("success rate of round k's samples (from round k-1's model)", ks, [r["sampled_success_rate"] for r in rows],
          {"marker": ".", "linestyle": "", "color": "C2"})],
        title="Success vs round", ylabel="success probability", hlines=[("optimum", optimum)])]
    finite = [d.get("incoherence_finite_part") for d in details]
    paths.append(plot_rounds(
        out / "incoherence.png",
        [("LM incoherence", ks, [r["incoherence"] for r in rows], lm),
         ("LM incoherence, finite part", ks, finite, {"marker": "s", "color": "C0", "alpha": 0.5}),
         ("LM token-level incoherence", ks, [r["token_incoherence"] for r in rows],
          {"marker": "^", "linestyle": ":", "color": "C3"}),
         ("exact G^(k+1)(p)", ks, [r["target_incoherence"] for r in rows], exact_style)],
        title="Incoherence vs round", ylabel="incoherence (nats)",
        note=_infinite_rounds(rows, "incoherence")))
    paths.append(plot_rounds(
        out / "tv.png", [("TV(LM, G^(k+1)(p))", ks, [r["tv_to_target"] for r in rows], lm)],
        title="Distance to the exact retraining target", ylabel="visit-weighted TV"))
    return paths


def selftrain_reading(rows: list[dict], optimum: float) -> list[str]:
    """A few sentences read off the numbers (no adjectives that the numbers don't support)."""
    tabulated = [r for r in rows if r.get("target_success") is not None]
    if not tabulated:
        return [f"Success went from {fmt(rows[0]['success'])} to {fmt(rows[-1]['success'])} "
                "(Monte Carlo; the task is too big to tabulate, so there are no exact targets)."]
    gaps = [abs(number(r["success"]) - number(r["target_success"])) for r in tabulated]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    tvs = [number(r["tv_to_target"]) for r in tabulated]
    first, last = tabulated[0], tabulated[-1]
    lines = [
        f"Success moved from {fmt(first['success'])} (round {first['round']}) to "
        f"{fmt(last['success'])} (round {last['round']}); exact retraining predicts "
        f"{fmt(first['target_success'])} to {fmt(last['target_success'])}, and the optimum is {fmt(optimum)}.",
        f"The largest gap between the LM's success and S(G^(k+1)(p)) is {fmt(gaps[worst])} "
        f"(round {tabulated[worst]['round']}); the largest TV to the target policy is {fmt(max(tvs))} "
        f"(round {tabulated[tvs.index(max(tvs))]['round']}).",
    ]
    drops = [(b["round"], number(a["success"]) - number(b["success"])) for a, b in zip(rows, rows[1:])]
    drop = max(drops, key=lambda d: d[1], default=None)
    if drop and drop[1] > 0:
        lines.append(f"The biggest round-to-round drop in success is {fmt(drop[1])} (into round {drop[0]}).")
    else:
        lines.append("Success never dropped from one round to the next.")
    inf = [r["round"] for r in rows if math.isinf(number(r["incoherence"]))]
    if inf:
        lines.append(f"The LM's incoherence is infinite at rounds {inf}: it keeps some probability on an "
                     "action that certainly fails, which every finite-temperature Boltzmann policy gives 0; "
                     "the finite part is in the table.")
    else:
        lines.append(f"The LM's incoherence went from {fmt(first['incoherence'])} to {fmt(last['incoherence'])} "
                     f"(exact target: {fmt(first['target_incoherence'])} to {fmt(last['target_incoherence'])}).")
    return lines


def final_round_plot(out: Path, task: Task, rows: list[dict], details: list[dict]) -> list[Path]:
    """final_round.png: the LM's policy after the last round (its eval.json table) beside the
    exact target G^(K+1)(p); nothing when that round has no policy table."""
    table = details[-1].get("policy") if details else None
    if table is None:
        return []
    k = rows[-1]["round"]
    target = exact.sequence(task, "retrain", k + 1)[-1]
    plot_policies(out / "final_round.png", task,
                  [(f"LM after round {k} (success prompt)", exact.policy_from_table(task, table)),
                   (f"exact target G^{k + 1}(p)", target)],
                  title=f"{task.name}: the final round's policy and its exact target")
    return [out / "final_round.png"]


def write_selftrain_report(out: Path, rows: list[dict], details: list[dict], *, task_name: str,
                           mode: str, optimum: float, config: dict, task: Task | None = None) -> Path:
    """OUTPUT_DIR/report.md plus its plots, from the metrics rows and each round's eval detail;
    with the ``task``, a picture of the final round's policy too."""
    out = Path(out)
    plots = selftrain_plots(out, rows, details, optimum) if rows else []
    if task is not None:
        plots += final_round_plot(out, task, rows, details)
    table = markdown_table(
        ["round", "success", "exact S(G^(k+1)(p))", "TV to target", "incoherence (finite part)",
         "exact incoherence", "token incoherence", "sampled success", "kept / sampled",
         "sample s", "train s", "eval s"],
        [[r["round"], fmt(r["success"]) + (f" ± {fmt(r['success_ci'])}" if r.get("success_ci") else ""),
          fmt(r["target_success"]), fmt(r["tv_to_target"]),
          f"{fmt(r['incoherence'])} ({fmt(d.get('incoherence_finite_part'))})",
          fmt(r["target_incoherence"]), fmt(r["token_incoherence"]), fmt(r["sampled_success_rate"]),
          f"{r['episodes_kept']} / {r['episodes_sampled']}",
          f"{r['sample_seconds']:.1f}", f"{r['train_seconds']:.1f}", f"{r['eval_seconds']:.1f}"]
         for r, d in zip(rows, details)])
    settings = ", ".join(f"{k}={config[k]}" for k in (
        "model", "episodes_per_round", "num_train_epochs", "learning_rate", "lora_r", "seed") if k in config)
    parts = [
        f"# Self-training on {task_name} ({mode} mode)", "",
        "Round 0 is the pretrained prior prompted with `<success>` (approximately G(p)); round k "
        "fine-tunes on episodes sampled from round k-1's model. With perfect fitting the model after "
        "round k is G^(k+1)(p), the exact target beside each number.", "",
        f"Settings: {settings}.", "", "## Rounds", "", table, "", "## Reading", "",
        *[f"- {line}" for line in (selftrain_reading(rows, optimum) if rows else ["No complete rounds yet."])],
        "", "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    path = out / "report.md"
    write_text(path, "\n".join(parts))
    return path
