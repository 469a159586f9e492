"""Staged rollout of a candidate to edge servers: the waves, the decision rules and the per-target record.

Pure functions and one recording task; the flow that calls the edge servers is flows/deploy_waves.py.

The rules, applied to one target's candidate figures after the watch window (see the edge's candidate.py):
- at least `min_samples` inputs answered by both models (without traffic there is nothing to judge: fail);
- top-1 agreement with the live model ≥ `min_agreement`;
- the candidate's error rate ≤ `max_error_rate`;
- the candidate's p95 latency ÷ the live model's (measured like for like) ≤ `max_p95_ratio`.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.prefect_options import LIVE
from tasks.registry_lock import current_user
from tasks.tracking import Tracker

STRATEGIES = ("direct", "shadow", "canary")
TAG_CHARS = 4000  # MLflow tag values are limited (5000 characters on older stores)


class RolloutRules(BaseModel):
    """How long a wave is watched, what it must show, and how a canary routes (`--fraction`, `--sticky`)."""

    model_config = ConfigDict(extra="forbid")

    window_s: float = Field(60.0, ge=0)
    min_samples: int = Field(20, ge=0)
    min_agreement: float = Field(0.9, ge=0, le=1)
    max_error_rate: float = Field(0.01, ge=0, le=1)
    max_p95_ratio: float = Field(2.0, gt=0)
    fraction: float = Field(0.1, ge=0, le=1)
    sticky: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{1,64}$")


def parse_waves(spec: str, count: int) -> list[list[int]]:
    """`1,rest` → [[0], [1, …]]: counts (`2`), shares (`25%`, rounded up) and `rest` (last only) of `count`
    targets in order; the waves must cover every target. Empty waves are dropped."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--waves {spec!r}: give wave sizes such as 1,rest or 1,25%,rest")
    sizes, start = [], 0
    for i, part in enumerate(parts):
        if part == "rest":
            if i != len(parts) - 1:
                raise ValueError(f"--waves {spec!r}: 'rest' can only be the last wave")
            size = count - start
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)%", part):
            size = math.ceil(float(m.group(1)) / 100 * count)
        elif part.isdigit():
            size = int(part)
        else:
            raise ValueError(f"--waves {spec!r}: {part!r} is not a count, a share (25%) or 'rest'")
        size = min(size, count - start)
        sizes.append(list(range(start, start + size)))
        start += size
    if start != count:
        raise ValueError(f"--waves {spec!r} covers {start} of {count} targets: end with 'rest'")
    return [w for w in sizes if w]


def judge(figures: dict[str, Any], rules: RolloutRules) -> tuple[bool, list[str]]:
    """(passed, reasons): every rule's outcome in words, failures first."""
    failed, passed = [], []
    compared = int(figures.get("compared") or 0)
    (passed if compared >= rules.min_samples else failed).append(
        f"{compared} inputs compared (min {rules.min_samples})"
    )
    agreement = figures.get("agreement")
    if agreement is None or agreement < rules.min_agreement:
        failed.append(f"agreement {_fmt(agreement)} < {rules.min_agreement}")
    else:
        passed.append(f"agreement {_fmt(agreement)} ≥ {rules.min_agreement}")
    errors = (figures.get("candidate") or {}).get("error_rate", 0.0)
    (passed if errors <= rules.max_error_rate else failed).append(
        f"error rate {_fmt(errors)} {'≤' if errors <= rules.max_error_rate else '>'} {rules.max_error_rate}"
    )
    ratio = figures.get("p95_ratio")
    if ratio is None:
        passed.append("p95 ratio not measured (no like-for-like live latencies)")
    else:
        (passed if ratio <= rules.max_p95_ratio else failed).append(
            f"p95 ratio {ratio:.2f} {'≤' if ratio <= rules.max_p95_ratio else '>'} {rules.max_p95_ratio}"
        )
    return not failed, failed + passed


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def brief(figures: dict[str, Any] | None) -> dict[str, Any]:
    """The figures a record keeps: the judged ones."""
    if not figures:
        return {}
    cand = figures.get("candidate") or {}
    return {
        "watched_s": figures.get("watched_s"),
        "compared": figures.get("compared"),
        "agreement": figures.get("agreement"),
        "dropped": figures.get("dropped"),
        "error_rate": cand.get("error_rate"),
        "requests": cand.get("requests"),
        "p95_ratio": figures.get("p95_ratio"),
        "p95_ms": cand.get("p95_ms"),
    }


def step(target: str, wave: int, action: str, before: str | None, after: str | None, **extra: Any) -> dict[str, Any]:
    """One step on one target: who, when, from, to, and (for a verdict) the figures and the reasons."""
    return {
        "target": target,
        "wave": wave,
        "step": action,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "who": current_user(),
        "from": before,
        "to": after,
        **extra,
    }


def tag_key(target: str) -> str:
    """MLflow tag keys allow letters, digits, `_ - . /` and spaces: one key per target."""
    return "rollout.target." + re.sub(r"[^A-Za-z0-9_.-]+", "_", target)[:200]


@task(retries=2, retry_delay_seconds=2, **LIVE)
def record_step(
    tracking_uri: str, name: str, version: str, entry: dict[str, Any] | None, summary: dict[str, str]
) -> None:
    """Append a step to the target's `rollout.target.*` tag (oldest steps dropped past the tag limit), and set
    the `rollout.*` summary tags, as the step happens: a flow killed midway leaves its record up to the kill."""
    tracker = Tracker(tracking_uri)
    if entry is None:
        tracker.tag_version(name, version, summary)
        return
    key = tag_key(entry["target"])
    steps = [*json.loads(tracker.version_tags(name, version).get(key) or "[]"), entry]
    while len(json.dumps(steps)) > TAG_CHARS and len(steps) > 1:
        steps.pop(0)
    tracker.tag_version(name, version, {key: json.dumps(steps), **summary})


def steps_markdown(model: str, version: str, status: str, steps: list[dict[str, Any]]) -> str:
    """The steps of one run as a table, for the Prefect artifact."""
    lines = [
        f"# {model} v{version}: {status}",
        "",
        "| time | target | wave | step | from → to | verdict | agreement | error rate | p95 ratio | compared |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in steps:
        f = s.get("figures") or {}
        lines.append(
            f"| {s['time']} | {s['target']} | {s['wave']} | {s['step']} | {str(s['from'])[:12]} → {str(s['to'])[:12]} "
            f"| {s.get('verdict', '')} | {_fmt(f.get('agreement'))} | {_fmt(f.get('error_rate'))} "
            f"| {_fmt(f.get('p95_ratio'))} | {f.get('compared', '')} |"
        )
    reasons = [f"- {s['target']}: " + "; ".join(s["reasons"]) for s in steps if s.get("reasons")]
    return "\n".join(lines + (["", *reasons] if reasons else []))
