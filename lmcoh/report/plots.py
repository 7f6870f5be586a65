"""Plots, drawn with matplotlib on the Agg backend (no display needed), imported only when
a plot is drawn."""

from __future__ import annotations

import math
from pathlib import Path

from ..io import atomic_path, number


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Lay out, write atomically and close ``fig``; the format follows the suffix.

    SVG keeps its text as text and carries no date or random ids, so the same figure gives
    the same, small file (a committed picture does not churn).
    """
    import matplotlib

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    fig.tight_layout()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "lmcoh"}), atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    pyplot().close(fig)
    return path


def plot_rounds(path: Path, series: list[tuple[str, list[int], list, dict]], *, title: str,
                ylabel: str, hlines: list[tuple[str, float]] = (), note: str = "", xlabel: str = "round") -> Path:
    """One PNG: each series is (label, rounds, values, matplotlib style kwargs).

    Non-finite values are left out of their line; ``note`` (e.g. which rounds were infinite)
    goes under the title.
    """
    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=100)
    for label, xs, ys, style in series:
        pts = [(x, number(y)) for x, y in zip(xs, ys) if math.isfinite(number(y))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
    for label, y in hlines:
        ax.axhline(y, color="grey", linestyle=":", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save(fig, path)
