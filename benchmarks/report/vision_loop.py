"""The vision-loop benchmark's section and goal: images/s of `fit` on a small ViT against a minimal loop and against
the loop before the tensor cache (bench_vision_loop.py)."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import fmt, md_table

TITLE = "Vision training loop (small ViT, Fashion-MNIST)"


def section(r: dict[str, Any]) -> str:
    loops = {k: v for k, v in r.items() if isinstance(v, dict) and "images_per_s" in v}
    out = [
        md_table(
            ["loop", "images/s (best of rounds)", "median of rounds"],
            [[name, x["images_per_s"], x.get("median_round_images_per_s")] for name, x in loops.items()],
        ),
        md_table(["ratio", "value"], [[k, fmt(v, 3) + "×"] for k, v in r.get("ratios", {}).items()]),
        f"Setup: {fmt(r.get('arch'))}, batch {fmt(r.get('batch'))}, {fmt(r.get('steps'))} steps of which "
        f"{fmt(r.get('warmup'))} untimed, {fmt(r.get('rounds'))} rounds.",
    ]
    return "\n\n".join(out)


def goals(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(goal, target, measured, met): bench_vision_loop reports `goal_fit_vs_plain` and `meets_goal`."""
    value = r.get("ratios", {}).get("fit_vs_plain")
    if value is None or "goal_fit_vs_plain" not in r:
        return []
    return [("fit vs plain loop, images/s", f"≥ {r['goal_fit_vs_plain']}×", fmt(value, 3) + "×", r.get("meets_goal"))]
