"""The training benchmark's section: samples/s per loop, the ratios and their goals, padding, the profile of `fit`."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import fmt, md_table, status

TITLE = "Training throughput"


def section(r: dict[str, Any]) -> str:
    loops = r.get("loops", {})
    out = [
        md_table(
            ["loop", "samples/s (best of rounds)", "per round", "median step s", "optimizer", "threads"],
            [
                [
                    name,
                    x["samples_per_s"],
                    ", ".join(fmt(v) for v in x.get("samples_per_s_rounds", [])),
                    x["median_step_s"],
                    x.get("optimizer", "–"),
                    ", ".join(str(t) for t in x.get("threads", [])),
                ]
                for name, x in loops.items()
            ],
        )
    ]
    goals = r.get("goals", {})
    out.append(
        md_table(
            ["ratio", "value", "goal", "status"],
            [
                [k, fmt(v, 3) + "×", goals.get(k, {}).get("target", "–"), status(goals.get(k, {}).get("met"))]
                for k, v in r.get("ratios", {}).items()
            ],
        )
    )
    pad = r.get("padding")
    if pad:
        out.append(
            "Padding on these tweets (tokens per example the encoder computes on): "
            f"real {fmt(pad['mean_tokens'], 1)}, dynamic (longest in batch) {fmt(pad['dynamic_padded_tokens'], 1)} "
            f"({fmt(100 * pad['dynamic_real_fraction'], 0)}% real), fixed {fmt(pad['fixed_padded_tokens'], 0)} "
            f"({fmt(100 * pad['fixed_real_fraction'], 0)}% real); length-grouped batches (estimate, sorting windows "
            f"of 50 batches) would compute on {fmt(pad.get('grouped_padded_tokens'), 1)} "
            f"({fmt(100 * pad.get('grouped_real_fraction', float('nan')), 0)}% real)."
        )
    setup = r.get("setup")
    if setup:
        out.append("Setup: " + ", ".join(f"{k} {fmt(v)}" for k, v in setup.items()) + ".")
    if r.get("profile"):
        out.append("### Profile of the training hot path\n\n" + profile(r["profile"]))
    return "\n\n".join(out)


def profile(p: dict[str, Any]) -> str:
    """Where one step of `fit` spends its time: phases, top operators, AdamW implementations."""
    out = [
        f"{p['steps']} steps of the real `fit` after the warm-up ({fmt(p['step_s'])} s/step), phases timed by wrapping "
        "what `fit` calls:",
        md_table(["phase", "% of step"], [[k, fmt(v, 1)] for k, v in p["phases_pct"].items()]),
        "torch.profiler, top operators by self CPU time:",
        md_table(
            ["operator", "% self CPU", "calls"],
            [[o["op"], fmt(o["self_cpu_pct"], 1), o["calls"]] for o in p["top_ops"]],
        ),
        "One AdamW step over the whole model on the same gradients:",
        md_table(["AdamW implementation", "ms"], [[k, v] for k, v in p["optimizer_step_ms"].items()]),
    ]
    return "\n\n".join(out)
