"""Markdown tables, the one way every summary, report and eval.py's table is written (and that table read back).
A leaf: nothing of the package is imported here."""
from typing import Iterable, Sequence


def row(cells: Sequence) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def rule(columns: int) -> str:
    return "|" + "---|" * columns


def markdown(head: Sequence[str], rows: Iterable[Sequence], *, aligned: bool = False) -> str:
    """``head`` and ``rows`` as a markdown table. ``aligned`` pads every column but the last to its widest cell, for
    tables read on a console (the same markdown either way)."""
    rows = [[str(c) for c in r] for r in rows]
    if not aligned:
        return "\n".join([row(head), rule(len(head)), *map(row, rows)])
    widths = [max(len(r[i]) for r in [list(head), *rows]) for i in range(len(head) - 1)]
    pad = lambda cells: [c.ljust(w) for c, w in zip(cells, widths)] + list(cells[len(widths):])
    dashes = "|" + "|".join("-" * (w + 2) for w in [*widths, len(head[-1])]) + "|"
    return "\n".join([row(pad(head)), dashes, *(row(pad(r)) for r in rows)])


def cells(line: str) -> list[str]:
    """The stripped cells of one row that ``row`` wrote."""
    return [c.strip() for c in line.strip().strip("|").split("|")]
