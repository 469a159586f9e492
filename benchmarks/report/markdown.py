"""Markdown building blocks every benchmark's section uses, and the section of a benchmark that has none."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.2g}"
        return f"{value:,.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def status(met: bool | None) -> str:
    return "–" if met is None else "**met**" if met else "**not met**"


def generic(r: dict[str, Any]) -> str:
    """Any other result: top-level scalars as one table, then one table per group of same-shaped leaf dicts."""
    scalars = [[k, v] for k, v in r.items() if isinstance(v, (int, float, str, bool)) or v is None]
    out = [md_table(["metric", "value"], scalars)] if scalars else []
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for path, leaf in _leaf_dicts(r):
        groups.setdefault(path.split(".")[0], []).append((path, leaf))
    for group, leaves in groups.items():
        columns = list(dict.fromkeys(k for _, leaf in leaves for k in leaf))[:10]
        rows = [
            [path.removeprefix(group).lstrip(".") or group, *(leaf.get(c) for c in columns)] for path, leaf in leaves
        ]
        out.append(f"`{group}`\n\n" + md_table(["", *columns], rows))
    return "\n\n".join(out) or "(no results)"


def _leaf_dicts(tree: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, dict[str, Any]]]:
    """(path, the dict's scalar values) for every nested dict that has scalar values."""
    for key, value in tree.items():
        if not isinstance(value, dict) or key == "machine":
            continue
        path = f"{prefix}{key}"
        leaf = {k: v for k, v in value.items() if isinstance(v, (int, float, str, bool))}
        if leaf:
            yield path, leaf
        yield from _leaf_dicts(value, f"{path}.")
