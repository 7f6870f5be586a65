"""The study's output directory: study.json, report.md and one PNG per plotted section.

Written to a temporary sibling directory and renamed at the end, so an interrupted study
leaves no half-written output. matplotlib (Agg) is imported only when plotting.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

from .. import io
from ..errors import TaskError
from ..io import replace_dir, write_json, write_text
from ..oracle import exact
from ..report.plots import pyplot, save
from ..report.tables import markdown_table
from ..report.taskgraph import plot_policies
from ..tasks.library import load_task

MAX_ROWS = 60  # longer tables are cut in report.md (study.json has every row)


def cell(x) -> str:
    """A table cell: 4 significant digits, scientific when tiny or huge, strings as given."""
    if isinstance(x, bool) or x is None:
        return "-" if x is None else ("yes" if x else "no")
    if isinstance(x, (int, float)):
        v = float(x)
        if math.isnan(v):
            return "-"
        if isinstance(x, int):
            return str(x)
        return f"{v:.2e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.4g}"
    return str(x)


def markdown(result: dict, plots: dict[int, str]) -> str:
    cfg = result["config"]
    lines = ["# lmcoh study: the paper's claims on exact numbers", "",
             f"Karwowski & Douglas, arXiv 2510.06545. Exact oracle only (no sampling); seed {cfg['seed']}"
             f"{', quick mode' if cfg['quick'] else ''}; {result['seconds']:.1f} s. Every verdict below is computed "
             "from the table under it through the thresholds in study.json (`thresholds`).", "",
             "## Verdicts", "",
             markdown_table(["section", "verdict", "claim"],
                            [[f"{s['id']}. {s['title']}", f"**{s['verdict']}**", s["claim"]]
                             for s in result["sections"]]), ""]
    for s in result["sections"]:
        lines += [f"## {s['id']}. {s['title']}", "", f"**Claim.** {s['claim']}", "",
                  f"**Verdict: {s['verdict']}.**", ""]
        lines += [f"- [{c['verdict']}] {c['check']}: {c['evidence']}" for c in s["checks"]]
        if s.get("observations"):
            lines += ["", "Observations (shown, not part of the verdict):", ""]
            lines += [f"- [{c['verdict']}] {c['check']}: {c['evidence']}" for c in s["observations"]]
        if s["rows"]:
            rows = [s["rows"][i] for i in s.get("shown", range(len(s["rows"])))][:MAX_ROWS]
            cols = [c for c in s["columns"] if any(c in r for r in rows)]
            lines += ["", markdown_table(cols, [[cell(r.get(c)) for c in cols] for r in rows])]
            if len(rows) < len(s["rows"]):
                lines += ["", f"({len(rows)} of {len(s['rows'])} rows; study.json has them all.)"]
        if s["note"]:
            lines += ["", s["note"]]
        if s["id"] in plots:
            lines += ["", f"![{s['title']}]({plots[s['id']]})"]
        lines.append("")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------

def _finite(x) -> float:
    v = float(x) if isinstance(x, (int, float)) else math.nan
    return v if math.isfinite(v) else math.nan


def _plot_bars(ax, section: dict) -> None:
    spec = section["plot"]
    groups = list(dict.fromkeys(r[spec["group"]] for r in section["rows"]))
    width = 0.8 / len(spec["series"])
    for i, name in enumerate(spec["series"]):
        vals = [max([r[name] for r in section["rows"] if r[spec["group"]] == g], default=0.0) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], [max(v, 1e-17) for v in vals], width, label=name)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(groups, rotation=25, ha="right", fontsize=7)
    ax.set_ylabel(f"{spec.get('measure', 'max |pi - rho|')} (floored at 1e-17)")


def _plot_rate(ax, section: dict) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in section["rows"]))
    for i, task in enumerate(tasks):
        rows = [r for r in section["rows"] if r["task"] == task and r["k"] >= 2]
        ks = [r["k"] for r in rows]
        ax.plot(ks, [_finite(r["increment / printed"]) for r in rows], "o-", color=f"C{i % 10}",
                label=task[:40], markersize=3)
        ax.plot(ks, [_finite(r["increment / J'(k-1/2)"]) for r in rows], "x--", color=f"C{i % 10}", markersize=3)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xlabel("k")
    ax.set_ylabel("measured increment / prediction")
    ax.set_title("solid: printed term; dashed: J'(k - 1/2)", fontsize=8)
    ax.legend(fontsize=6)


def _plot_incoherence(ax, section: dict) -> None:
    import numpy as np

    deltas = list(dict.fromkeys(r["delta"] for r in section["rows"]))
    ks = [int(c[2:]) for c in section["columns"] if c.startswith("k=")]
    for i, d in enumerate(deltas):
        rows = [r for r in section["rows"] if r["delta"] == d]
        med = [float(np.nanmedian([_finite(r[f"k={k}"]) for r in rows] or [math.nan])) for k in ks]
        ax.plot([max(k, 0.5) for k in ks], med, "o-", label=f"delta = {d:g}", color=f"C{i}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("k (k = 0 drawn at 0.5)")
    ax.set_ylabel("median over tasks of kappa_delta(G^k(p))")
    ax.legend(fontsize=7)


def _plot_scatter(fig, section: dict) -> None:
    stats = section["plot"]["stats"]
    for i, col in enumerate(("kappa(p)", "kappa(G(p))")):
        ax = fig.add_subplot(1, 2, i + 1)
        xs = [r["effective horizon k"] for r in section["rows"]]
        ax.scatter(xs, [_finite(r[col]) for r in section["rows"]], s=8, alpha=0.6)
        st = stats[col]
        ax.set_title(f"{col}: r = {st['r']:.2f} (paper {st['paper']})", fontsize=9)
        ax.set_xlabel("effective horizon k")
        ax.set_ylabel(col)


def _plot_slip(ax, section: dict) -> None:
    rows = [r for r in section["rows"] if "slip" in r]
    slips = [r["slip"] for r in rows]
    ax.plot(slips, [r["TV"] for r in rows], "o-", label="max_k TV(retrain, temperature)")
    ax.plot(slips, [abs(r["success gap"]) for r in rows], "s--", label="max_k |S(retrain) - S(temperature)|")
    ax.set_xlabel("slip")
    ax.legend(fontsize=7)


def _plot_policies(out: Path, section: dict) -> str:
    """TASK.png: the task's decision graph under each of the section's policies, side by side."""
    spec = section["plot"]
    task = load_task(spec["task"])
    name = f"{spec['task']}.png"
    plot_policies(out / name, task, [(label, exact.policy_from_table(task, table))
                                     for label, table in spec["policies"].items()],
                  title=f"{section['title']}: the policies, computed")
    return name


def plots(result: dict, out: Path) -> dict[int, str]:
    """One PNG per section that asks for a plot; returns {section id: file name}."""
    plt = pyplot()
    drawn = {}
    for s in result["sections"]:
        kind = s.get("plot", {}).get("kind")
        if kind is None or not s["rows"] or (kind == "slip" and not any("slip" in r for r in s["rows"])):
            continue
        if kind == "policies":
            drawn[s["id"]] = _plot_policies(out, s)
            continue
        fig = plt.figure(figsize=(9, 4) if kind == "scatter" else (6.5, 4.2), dpi=100)
        if kind == "scatter":
            _plot_scatter(fig, s)
        else:
            ax = fig.add_subplot(1, 1, 1)
            {"bars": _plot_bars, "rate": _plot_rate, "incoherence": _plot_incoherence, "slip": _plot_slip}[kind](ax, s)
            ax.grid(alpha=0.3)
            if kind == "bars":
                ax.legend(fontsize=7)
        fig.suptitle(f"{s['id']}. {s['title']} ({s['verdict']})", fontsize=10)
        name = f"section{s['id']}_{kind}.png"
        save(fig, out / name)
        drawn[s["id"]] = name
    return drawn


# ---- the directory -------------------------------------------------------------------------------

def check_output(out: str | Path, overwrite: bool = False) -> Path:
    """``out`` as a Path, refused (`LmcohError`) before the study runs when it holds anything
    without ``overwrite``, or, with it, anything but an earlier study."""
    out = io.check_output(out, overwrite, "--output_dir")
    if out.is_dir() and any(out.iterdir()) and not (out / "study.json").exists():
        raise TaskError(f"--output_dir {out} holds something other than an earlier study; choose another --output_dir")
    return out


def write(result: dict, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``out``/study.json, report.md and plots atomically (`check_output` first); with
    ``overwrite`` an earlier study there is replaced."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_json(tmp / "study.json", result, indent=1)
        drawn = plots(result, tmp)
        write_text(tmp / "report.md", markdown(result, drawn))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
