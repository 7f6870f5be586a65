"""The KL-regularised RL report: report.md with its table, reading and plots (success and TV to the
exact optimum of J_beta per evaluation, the final policy beside that optimum)."""

from __future__ import annotations

from pathlib import Path

from ..io import number, write_text
from ..oracle import exact
from ..tasks.task import Task
from .plots import plot_rounds
from .tables import fmt, markdown_table
from .taskgraph import plot_policies


def klrl_plots(out: Path, task: Task, rows: list[dict], target: exact.Policy | None) -> list[Path]:
    """success.png and tv.png over the steps, and final_policy.png beside the exact optimum."""
    steps = [r["step"] for r in rows]
    lm, exact_style = {"marker": "o", "color": "C0"}, {"marker": "x", "linestyle": "--", "color": "C1"}
    paths = [plot_rounds(out / "success.png",
                         [("LM (no goal)", steps, [r["success"] for r in rows], lm),
                          ("exact optimum of J_beta", steps, [r["target_success"] for r in rows], exact_style)],
                         title="Success vs optimiser step", ylabel="success probability", xlabel="optimiser step"),
             plot_rounds(out / "tv.png", [("TV(LM, optimum of J_beta)", steps, [r["tv_to_target"] for r in rows], lm)],
                         title="Distance to the exact KL-RL optimum", ylabel="visit-weighted TV",
                         xlabel="optimiser step")]
    if target is not None and rows[-1].get("policy"):
        plot_policies(out / "final_policy.png", task,
                      [(f"LM after step {rows[-1]['step']}", exact.policy_from_table(task, rows[-1]["policy"])),
                       (f"exact optimum, beta = {rows[-1]['beta']:g}", target)],
                      title=f"{task.name}: the KL-RL policy and its exact target")
        paths.append(out / "final_policy.png")
    return paths


def write_klrl_report(out: Path, rows: list[dict], task: Task, config: dict,
                      target: exact.Policy | None = None) -> Path:
    """OUTPUT_DIR/report.md and its plots, from the evaluations' metrics rows (and the exact target)."""
    out = Path(out)
    plots = klrl_plots(out, task, rows, target) if rows else []
    table = markdown_table(
        ["step", "success", "exact optimum's success", "TV to optimum", "incoherence (finite part)",
         "episodes sampled", "train s", "eval s"],
        [[r["step"], fmt(r["success"]) + (f" ± {fmt(r['success_ci'])}" if r.get("success_ci") else ""),
          fmt(r["target_success"]), fmt(r["tv_to_target"]),
          f"{fmt(r.get('incoherence'))} ({fmt(r.get('incoherence_finite_part'))})", r["episodes_sampled"],
          f"{r['train_seconds']:.1f}", f"{r['eval_seconds']:.1f}"] for r in rows])
    settings = ", ".join(f"{k}={config[k]}" for k in (
        "reward", "beta", "q_floor", "reference", "learning_rate", "global_batch_size", "max_steps", "lora_r",
        "seed") if k in config)
    parts = [f"# KL-regularised RL on {task.name}", "",
             "The policy is the model prompted with no goal, trained by REINFORCE (TRL's GRPOTrainer on whole "
             "episodes) to maximise E[R] - beta KL(pi || p), p being the model with its adapter disabled. Beside "
             "each evaluation: the exact optimum of that objective (docs/theory.md, \"A fourth pressure: "
             "KL-regularised RL\"), which is not a coherent policy.", "",
             f"Settings: {settings}.", "", "## Evaluations", "", table, "", "## Reading", "",
             *[f"- {line}" for line in reading(rows)], "", "## Plots", "",
             *[f"![{p.stem}]({p.name})" for p in plots], ""]
    path = out / "report.md"
    write_text(path, "\n".join(parts))
    return path


def reading(rows: list[dict]) -> list[str]:
    """A few sentences read off the numbers."""
    if not rows:
        return ["No complete evaluation yet."]
    last = rows[-1]
    if last.get("tv_to_target") is None:
        return [f"Success went from {fmt(rows[0]['success'])} to {fmt(last['success'])} (Monte Carlo; the task is "
                "too big to tabulate, so there is no exact target)."]
    tvs = [number(r["tv_to_target"]) for r in rows]
    best = min(range(len(tvs)), key=tvs.__getitem__)
    return [f"After {last['step']} steps ({last['episodes_sampled']} episodes, {last['train_seconds']:.0f} s of "
            f"training) the policy is at TV {fmt(last['tv_to_target'])} from the exact optimum, with success "
            f"{fmt(last['success'])} against the optimum's {fmt(last['target_success'])}.",
            f"It started at TV {fmt(rows[0]['tv_to_target'])}; the closest evaluation was step {rows[best]['step']} "
            f"(TV {fmt(tvs[best])})."]
