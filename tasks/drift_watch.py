"""The fleet's drift, judged: read every edge server's `GET /v1/drift`, add up the live counts of servers that
serve the same bundle (same reference, same bins), score each statistic with the edge's own PSI, and decide
whether a model version drifted. The cooldown state (when an event went out for which version) lives in a
Prefect variable per model, so it survives worker restarts and is shared by every worker of the deployment.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import numpy as np
from prefect import task
from transflow_edge import drift
from transflow_edge.client import EdgeClient, EdgeError

STATE_PREFIX = "transflow-drift-"
KEEP_VERSIONS = 30  # per model: well under Prefect's 5,000-character limit on a variable's value
EVENT_NAMESPACE = uuid.UUID("6f1d3c52-5d0e-4c55-9d84-2b7f1f7c2a10")


@task(retries=1, retry_delay_seconds=5)
def read_fleet(targets: list[str], timeout: float = 10.0) -> list[dict[str, Any]]:
    """One entry per target: its drift report, or why there is none (unreachable, no model, older server)."""
    out: list[dict[str, Any]] = []
    for target in targets:
        if not target.startswith(("http://", "https://")):
            out.append({"target": target, "error": "not an HTTP server: a watched folder reports no drift"})
            continue
        try:
            with EdgeClient(target, timeout=timeout) as client:
                response = client.request("GET", "/v1/drift", ok=(200, 404, 503))
        except EdgeError as exc:
            out.append({"target": target, "error": str(exc)})
            continue
        if response.status_code == 404:
            out.append({"target": target, "error": "no /v1/drift: an edge server older than drift tracking"})
        elif response.status_code == 503:
            out.append({"target": target, "error": "no model loaded"})
        else:
            out.append({"target": target, "report": response.json()})
    return out


def _usable(report: dict[str, Any]) -> bool:
    stats = report.get("statistics")
    return bool(report.get("available")) and isinstance(stats, dict) and all(
        isinstance(s, dict) and len(s.get("counts", [])) == len(s.get("reference", [])) for s in stats.values()
    )  # fmt: skip


def fleet_figures(fleet: list[dict[str, Any]], threshold: float, min_count: int) -> list[dict[str, Any]]:
    """Per served bundle: the servers' counts added up, PSI per statistic, and the statistics that drifted (PSI at
    or above `threshold` with at least `min_count` live observations; fewer is noise, not drift)."""
    groups: dict[tuple[str, str, str], list[tuple[str, dict[str, Any]]]] = {}
    for entry in fleet:
        report = entry.get("report")
        if report and _usable(report):
            key = (str(report["name"]), str(report["version"]), str(report["bundle_sha256"]))
            groups.setdefault(key, []).append((entry["target"], report))
    figures = []
    for (name, version, sha), members in sorted(groups.items()):
        first = members[0][1]["statistics"]
        psi, counts, per_target = {}, {}, {t: {k: v["psi"] for k, v in r["statistics"].items()} for t, r in members}
        for stat, spec in first.items():
            total = np.sum([np.asarray(r["statistics"][stat]["counts"], dtype=np.int64) for _, r in members], axis=0)
            counts[stat] = int(total.sum())
            value = drift.psi(np.asarray(spec["reference"], dtype=np.float64), total)
            psi[stat] = None if np.isnan(value) else round(value, 6)
        drifted = sorted(s for s, v in psi.items() if v is not None and v >= threshold and counts[s] >= min_count)
        figures.append({
            "model_name": name, "version": version, "bundle_sha256": sha, "targets": [t for t, _ in members],
            "psi": psi, "counts": counts, "per_target": per_target, "drifted": drifted,
            "threshold": threshold, "min_count": min_count,
        })  # fmt: skip
    return figures


def state_name(model_name: str) -> str:
    """The Prefect variable holding a model's cooldown state (names: lowercase letters, digits, - and _)."""
    return STATE_PREFIX + re.sub(r"[^a-z0-9_-]", "-", model_name.lower())[:200]


def read_state(model_name: str) -> dict[str, Any]:
    from prefect.variables import Variable

    value = Variable.get(state_name(model_name), default=None)
    return value if isinstance(value, dict) else {}


def write_state(model_name: str, state: dict[str, Any]) -> None:
    from prefect.variables import Variable

    newest = sorted(state.items(), key=lambda kv: kv[1].get("at", 0))[-KEEP_VERSIONS:]
    Variable.set(state_name(model_name), dict(newest), tags=["transflow", "drift"], overwrite=True)


def decide(record: dict[str, Any] | None, now: float, cooldown_s: float) -> str:
    """'emit' (no event for this version within the cooldown), 'resend' (recorded but not confirmed sent: a crash
    between the two; the same event id again), or 'cooldown'."""
    if record is None or now - float(record.get("at", 0)) >= cooldown_s:
        return "emit"
    return "cooldown" if record.get("sent") else "resend"


def event_id(model_name: str, version: str, bundle_sha: str, at: float) -> str:
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{model_name}/{version}/{bundle_sha}/{at:.3f}"))


def state_key(figure: dict[str, Any]) -> str:
    """Cooldown per model version (a re-export of the same version, i.e. a new bundle, shares it)."""
    return str(figure["version"])


def now() -> float:
    return time.time()
