"""The coherence card's files: card.json, card.md (the table and a short reading) and card.png.

The picture answers one question per task at a glance: does the goal-prompted model pi reach
what exact conditioning of itself, G(p_M), would? On the left, success: the model without the
goal (open circle), a band to what exact conditioning of that policy reaches (filled circle),
the prompted model (diamond) and the optimum (bar). On the right, distance: TV(pi, G(p_M))
(filled) beside TV(pi, p_M) (outline), and pi's incoherence.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

from ..io import number, replace_dir, write_json, write_text
from .plots import pyplot, save
from .tables import fmt, markdown_table

NEAR = 0.05  # a prompted success within this of G(p_M)'s counts as reaching it

COLOURS = {"reference": "#7f7f7f", "conditioned": "#2ca02c", "policy": "#1f77b4", "optimal": "black",
           "tv_conditioned": "#d62728"}


def write(out: str | Path, card: dict) -> Path:
    """Write ``out``/card.json, card.md and card.png; ``out`` appears whole or not at all."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_json(tmp / "card.json", card, indent=1)
        plot(tmp / "card.png", card)
        write_text(tmp / "card.md", markdown(card, "card.png"))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _measured(card: dict) -> list[dict]:
    return [row for row in card["tasks"] if "error" not in row]


def _kappa(row: dict) -> str:
    kappa = number(row["incoherence"])
    finite = f" (finite part {fmt(row['incoherence_finite_part'])})" if math.isinf(kappa) else ""
    return fmt(kappa) + finite


def markdown(card: dict, picture: str | None = None) -> str:
    goal = f'"{card["goal_text"]}"' if card["goal_text"] else "the token <success>"
    lines = [f"# Coherence card: {card['model']}", "",
             f"{card['format']} format, {card['prompt']} prompts, goal {goal}; lmcoh {card['lmcoh_version']}. "
             "pi is the model prompted with the goal, p_M the model with no goal (its own behaviour), "
             "G(p_M) exact conditioning of p_M on success (what a Bayesian reading of the prompt would "
             "give), S the success probability, S* the best possible, kappa pi's incoherence (delta = 1).", ""]
    headers = ["task", "S(pi)", "S(p_M)", "S(G(p_M))", "S*", "TV(pi, G(p_M))", "TV(pi, p_M)", "kappa",
               "token kappa", "seconds"]
    rows = []
    for row in card["tasks"]:
        if "error" in row:
            rows.append([row["task"], f"not measured: {row['error']}"] + [""] * (len(headers) - 2))
            continue
        ci = f" ± {fmt(row['success_ci'])}" if not row["exact"] else ""
        rows.append([row["task"], fmt(row["success_policy"]) + ci, fmt(row["success_reference"]),
                     fmt(row["success_conditioned"]), fmt(row["success_optimal"]), fmt(row["tv_to_conditioned"]),
                     fmt(row["tv_to_reference"]), _kappa(row), fmt(row["token_incoherence"]),
                     f"{row['seconds']:.1f}"])
    lines += [markdown_table(headers, rows), ""]
    lines += reading(card)
    if picture:
        lines += ["", f"![Where the prompted model falls short of exact conditioning of itself]({picture})"]
    return "\n".join(lines) + "\n"


def reading(card: dict) -> list[str]:
    """A few sentences on what the table says, computed from it."""
    rows = _measured(card)
    missing = [row["task"] for row in card["tasks"] if "error" in row]
    if not rows:
        return ["No task could be measured."]
    n = len(rows)
    raised = [r for r in rows if r["success_policy"] > r["success_reference"] + 1e-9]
    short = [r for r in rows if r["success_policy"] < r["success_conditioned"] - NEAR]
    nearer = [r for r in rows if r["tv_to_conditioned"] < r["tv_to_reference"]]
    infinite = [r for r in rows if math.isinf(number(r["incoherence"]))]
    mean = lambda key: sum(r[key] for r in rows) / n  # noqa: E731
    out = [f"- Stating the goal raises the model's success above its own (S(pi) > S(p_M)) on {len(raised)} of "
           f"{n} tasks; mean success {mean('success_policy'):.3f} prompted, {mean('success_reference'):.3f} "
           f"without the goal, {mean('success_conditioned'):.3f} under exact conditioning G(p_M), "
           f"{mean('success_optimal'):.3f} at best."]
    if short:
        worst = max(short, key=lambda r: r["success_conditioned"] - r["success_policy"])
        out.append(f"- The prompted model falls short of exact conditioning of itself by more than {NEAR} on "
                   f"{len(short)} of {n} tasks, most on {worst['task']} (S(pi) {worst['success_policy']:.3f} "
                   f"against S(G(p_M)) {worst['success_conditioned']:.3f}).")
    else:
        out.append(f"- The prompted model reaches the success of exact conditioning of itself (within {NEAR}) "
                   f"on every task.")
    out.append(f"- pi is nearer G(p_M) than p_M (TV(pi, G(p_M)) < TV(pi, p_M)) on {len(nearer)} of {n} tasks: "
               "there the prompt moves the model toward what exact conditioning of itself would do.")
    if infinite:
        out.append(f"- kappa is infinite on {', '.join(r['task'] for r in infinite)}: the prompted model puts "
                   "mass on an action whose success is impossible given its own later choices.")
    if missing:
        out.append(f"- Not measured: {', '.join(missing)} (the reason is in the table).")
    return out


def plot(path: Path, card: dict) -> Path:
    rows = card["tasks"]
    plt = pyplot()
    fig = plt.figure(figsize=(11, 1.9 + 0.45 * len(rows)), dpi=100)
    grid = fig.add_gridspec(2, 2, width_ratios=[3, 2], height_ratios=[0.45 * len(rows) + 0.9, 0.55])
    left = fig.add_subplot(grid[0, 0])
    right = fig.add_subplot(grid[0, 1], sharey=left)
    key = fig.add_subplot(grid[1, :])
    key.axis("off")
    ys = list(range(len(rows)))[::-1]
    for y, row in zip(ys, rows):
        if "error" in row:
            reason = row["error"] if len(row["error"]) <= 70 else row["error"][:67] + "..."
            left.text(0.01, y, f"not measured: {reason}", va="center", fontsize=8, color="#a0a0a0")
            continue
        ref, cond, pol, opt = (row[k] for k in ("success_reference", "success_conditioned", "success_policy",
                                                "success_optimal"))
        left.plot([ref, cond], [y, y], color=COLOURS["conditioned"], alpha=0.25, linewidth=7,
                  solid_capstyle="round")
        left.plot([opt], [y], marker="|", markersize=16, markeredgewidth=2, color=COLOURS["optimal"])
        left.plot([ref], [y], "o", markersize=8, markerfacecolor="white", markeredgecolor=COLOURS["reference"],
                  markeredgewidth=1.5)
        left.plot([cond], [y], "o", markersize=8, color=COLOURS["conditioned"])
        left.plot([pol], [y], "D", markersize=7, color=COLOURS["policy"])
        right.barh(y + 0.17, row["tv_to_conditioned"], height=0.32, color=COLOURS["tv_conditioned"])
        right.barh(y - 0.17, row["tv_to_reference"], height=0.32, facecolor="none",
                   edgecolor=COLOURS["reference"], linewidth=1.2)
        right.text(1.0, y, f"κ {_kappa(row)}", va="center", ha="right", fontsize=7.5, color="#404040")
    left.set_yticks(ys, [row["task"] for row in rows])
    left.set_xlim(-0.02, 1.02)
    left.set_xlabel("success probability")
    left.set_title("success: the prompted model against exact conditioning of itself", fontsize=10)
    right.set_xlim(0, 1.0)
    right.set_xlabel("total variation (visit-weighted)")
    right.set_title("distance of the prompted policy", fontsize=10)
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
        ax.set_ylim(-0.7, len(rows) - 0.3)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    def dot(marker: str, label: str, **style) -> Line2D:
        return Line2D([], [], marker=marker, linestyle="none", label=label, **style)

    handles = [dot("o", "p_M: the model, no goal", markerfacecolor="white", markeredgecolor=COLOURS["reference"]),
               dot("o", "G(p_M): exact conditioning of p_M", color=COLOURS["conditioned"]),
               dot("D", "pi: the model prompted with the goal", color=COLOURS["policy"]),
               dot("|", "optimum S*", markersize=12, markeredgewidth=2, color=COLOURS["optimal"]),
               Patch(color=COLOURS["tv_conditioned"], label="TV(pi, G(p_M))"),
               Patch(facecolor="none", edgecolor=COLOURS["reference"], label="TV(pi, p_M)")]
    key.legend(handles=handles, fontsize=8, loc="center", ncol=3, frameon=False)
    right.tick_params(labelleft=False)
    fig.suptitle(f"Coherence card: {Path(card['model']).name} ({card['format']} format, {card['prompt']} prompts)",
                 fontsize=11)
    return save(fig, path)
