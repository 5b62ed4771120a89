"""Fixed-width tables for the CLI's console output (eval, train-hash, eval-fine).

Why one helper: three commands printed their own hand-aligned f-string tables, each keeping its
header widths in step with its row formats by hand. Here a column is declared once.
"""
from __future__ import annotations

import re
from typing import Callable, Union

Key = Union[str, Callable[[dict], object]]


def _width(spec: str) -> int:
    match = re.match(r"[<>^]?(\d+)", spec)
    if not match:
        raise ValueError(f"column format {spec!r} must start with a width, e.g. '8.1f' or '<14'")
    return int(match.group(1))


def _cell(value, spec: str) -> str:
    """A value in its column; ``None`` (not measured) as a dash of the column's width."""
    if value is None:
        return f"{'—':{'<' if spec.startswith('<') else '>'}{_width(spec)}}"
    return format(value, spec)


def text_table(rows: list[dict], columns: list[tuple[str, Key, str]]) -> str:
    """Header, rule and one line per row; a column is (header, key or function of the row, format spec).

    Text columns are left-aligned by a spec starting with ``<``, everything else right-aligned; a
    value that is ``None`` (not measured) prints as a dash.
    """
    head = "".join(f"{header:{'<' if spec.startswith('<') else '>'}{_width(spec)}}" for header, _, spec in columns)
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append("".join(_cell(key(row) if callable(key) else row[key], spec) for _, key, spec in columns))
    return "\n".join(lines)
