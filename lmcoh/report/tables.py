"""Markdown tables and number formatting for the reports.

Values arrive as lmcoh writes them to JSON (lmcoh.io): ``"inf"`` for infinity, ``None`` for
a missing or undefined number.
"""

from __future__ import annotations

import math

from ..io import number


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    v = number(x)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
