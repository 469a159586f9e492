"""The candidate report as a Prefect flow (`transflow report MODEL@ALIAS [--against ALIAS]`), and the step the
retraining flow runs after every export. The work is `tasks.report.build_version_report`; here: resolve the
target, publish the Markdown as a Prefect artifact beside the flow run, and never fail a retrain for a report."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow

from tasks.lineage import resolve_target
from tasks.registered_version import CHAMPION
from tasks.report import build_version_report
from tasks.tracking import Tracker, resolve_tracking_uri


@flow(name="report", log_prints=True)
def report(
    target: str, against: str = CHAMPION, out: str | None = None, tracking_uri: str | None = None, log: bool = True
) -> dict[str, Any]:
    """Rebuild the candidate report of `target` (NAME@ALIAS or NAME/VERSION) against the version `against` names
    (an alias or a version number); write it to `out` (default: ./reports/NAME-vN), log it to the version."""
    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    name, version = resolve_target(tracker, target)
    out_dir = Path(out) if out else Path("reports") / f"{name}-v{version}"
    with tempfile.TemporaryDirectory(prefix="transflow-report-") as tmp:
        written = build_version_report(tracker, name, str(version), out_dir, against, work=Path(tmp), log=log)
    publish(out_dir, name, str(version))
    print(f"{name} v{version} against {against}: {written['html']} ({written['bytes']} bytes, {written['seconds']}s)")
    return written


def report_after_export(
    tracker: Tracker, name: str, version: str, out_dir: Path, trained: Any, work: Path, batch_size: int
) -> dict[str, Any]:
    """The retraining flow's report step, against the current champion. A report that cannot be built (e.g. the
    data is not DVC-versioned, so no test split can be proven the same) is recorded, not raised: the version is
    registered and exported either way, and the gate says what is missing if it requires significance. Any other
    failure is printed and recorded the same way (the tests build real reports, so a bug cannot hide there)."""
    try:
        live = (trained.model, trained.adapter, challenger_predictions(trained, batch_size))
        written = build_version_report(tracker, name, version, out_dir, CHAMPION, work=work, live=live)
    except Exception as exc:  # the version is registered and exported: a failed report must not lose the run
        print(f"candidate report of {name} v{version} NOT built: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}
    publish(out_dir, name, version)
    return written


def challenger_predictions(trained: Any, batch_size: int) -> np.ndarray | None:
    """The training run's own test logits, put back in split order: the report then runs no second test pass of
    the challenger (they come length-sorted, in the order of the test batches the export also uses)."""
    if trained.test_logits is None:  # trained on another deployment: the report predicts again
        return None
    order = trained.encoded.batches(trained.adapter, "test", batch_size, sort=True).order
    preds = np.empty(len(order), dtype=np.int64)
    preds[np.asarray(order, dtype=np.int64)] = np.asarray(trained.test_logits).argmax(-1)
    return preds


def publish(out_dir: Path, name: str, version: str) -> None:
    """The report's Markdown as a Prefect artifact of the current flow run (a no-op outside one)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    key = re.sub(r"[^a-z0-9-]+", "-", f"report-{name}-v{version}".lower()).strip("-")[:100]
    create_markdown_artifact(markdown=(out_dir / "report.md").read_text(), key=key,
                             description=f"candidate report of {name} v{version}")  # fmt: skip
