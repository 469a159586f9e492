"""`transflow deploy MODEL@ALIAS --target URL …`: put a registered version's bundle on edge servers, or nothing.

The recipe: fetch the version's bundle (run artifact `bundle/bundle.tar.gz`) and verify it here (safe extract,
manifest hashes, sha256 = the version's `bundle_sha256` tag); look at every target before touching any (an
unreachable one fails the deploy while nothing has changed); then target by target: push, wait until
`/v1/model` reports the new bundle, run the golden inputs through `/v1/predict`. If any step fails, every
target this deploy changed goes back to what it served before, and the flow fails naming the target.
The outcome is recorded as `deploy.*` tags on the model version.

Targets: `http(s)://host:port` (an edge server's admin API, bearer token from an environment variable) or
`dir:///path` (air-gapped sites: the archive is written there atomically for `transflow edge serve
--watch-dir`; rolling back deletes it, or restores its timestamp, so the previous archive is the newest again).

Every task with an effect is safe to retry: the server answers "unchanged" to a bundle it already serves,
the folder keeps one file per bundle, and a rollback first looks at what the target serves now.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from transflow_edge.bundle import sha256_file
from transflow_edge.client import EdgeClient, EdgeError

from flows.prefect_artifacts import deploy_run_name, publish_deploy
from tasks.prefect_options import LIVE
from tasks.registered_version import RegistryError, fetch_verified_bundle
from tasks.tracking import Tracker, resolve_tracking_uri

DIR_PREFIX = "dir://"
GOLDEN_CHUNK = 16  # golden inputs per predict request, well under the server's max_items
HISTORY_CHARS = 4000  # MLflow tag values are limited (5000 characters on older stores)


class DeployError(RuntimeError):
    """A deploy that cannot go on; the message names the version and the target."""


class DeployInputError(DeployError):
    """Bad input, found before anything changed: no or malformed targets, no token, an unknown version (exit 2)."""


class TargetError(DeployError):
    """A target that refused or failed; `transient` errors (network, 5xx) are worth a Prefect retry."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry network and store trouble, never a refusal (bad token, rejected bundle)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, DeployError) or (isinstance(exc, TargetError) and exc.transient)


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """An edge server's base URL (`kind="http"`) or a watched folder (`kind="dir"`)."""

    text: str
    kind: str
    location: str

    @classmethod
    def parse(cls, text: str) -> Target:
        if text.startswith(("http://", "https://")):
            return cls(text, "http", text.rstrip("/"))
        if text.startswith(DIR_PREFIX) and len(text) > len(DIR_PREFIX):
            return cls(text, "dir", text.removeprefix(DIR_PREFIX))
        raise DeployInputError(f"target {text!r}: expected http(s)://host:port or dir:///path/to/watched/folder")


@dataclass(frozen=True)
class Fetched:
    """A verified bundle archive of one registered version."""

    name: str
    version: str
    archive: str
    sha256: str
    manifest_name: str
    manifest_version: str
    golden: dict[str, Any]

    @property
    def filename(self) -> str:
        """What a dir target calls the archive: readable, unique per bundle."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.manifest_name}-v{self.manifest_version}")
        return f"{stem}-{self.sha256[:12]}.tar.gz"


@contextmanager
def _edge(target: Target, token_env: str | None = None) -> Iterator[EdgeClient]:
    """The edge package's client for an http target; its errors become TargetErrors naming the target."""
    token = os.environ.get(token_env, "").strip() if token_env else None
    try:
        with EdgeClient(target.location, token=token or "") as client:
            yield client
    except EdgeError as exc:
        raise TargetError(f"{target.text}: {exc}", exc.transient) from None


def _serving(target: Target) -> str | None:
    """The bundle sha256 an edge server serves now; None when it has no model loaded."""
    with _edge(target) as client:
        return client.serving()


# ---------------------------------------------------------------- tasks


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, **LIVE)
def fetch_bundle(tracking_uri: str, model_uri: str, workdir: Path) -> Fetched:
    """Resolve the version, download its bundle archive, and verify it against its manifest and its tag."""
    tracker = Tracker(tracking_uri)
    try:
        name, version = tracker.resolve_version(model_uri)
        record = tracker.model_version(name, version)
    except Exception as exc:  # MLflow's own error types stay in tasks/tracking.py
        raise DeployInputError(f"{model_uri}: not found in the registry at {tracking_uri} ({exc})") from None
    if record is None:
        raise DeployInputError(f"{model_uri}: not found in the registry at {tracking_uri}")
    try:
        archive, bundle = fetch_verified_bundle(tracker, record, workdir)
    except RegistryError as exc:
        raise DeployError(str(exc)) from None
    golden = bundle.json("golden.json") if "golden.json" in bundle.manifest["files"] else {}
    manifest = bundle.manifest
    manifest_ids = str(manifest.get("name", name)), str(manifest.get("version", version))
    return Fetched(name, version, str(archive), bundle.sha256, *manifest_ids, golden)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, **LIVE)
def snapshot(target: Target, filename: str) -> dict[str, Any]:
    """What a target serves before the deploy: an edge server's bundle sha256, or the folder's file state."""
    if target.kind == "http":
        return {"bundle_sha256": _serving(target)}
    folder = Path(target.location)
    if not folder.is_dir():
        raise TargetError(f"{target.text}: {folder} is not a directory")
    path = folder / filename
    return {"exists": path.is_file(), "mtime_ns": path.stat().st_mtime_ns if path.is_file() else None}


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, **LIVE)
def push(target: Target, fetched: Fetched, token_env: str) -> str:
    """Upload to an edge server (it answers "unchanged" to what it already serves), or write into the folder."""
    if target.kind == "dir":
        return _write_archive(Path(target.location), fetched)
    with _edge(target, token_env) as client:
        answer = client.upload(Path(fetched.archive))
    if answer.get("bundle_sha256") != fetched.sha256:
        raise TargetError(f"{target.text}: serves {answer.get('bundle_sha256')} after the upload, not {fetched.sha256}")
    return str(answer["status"])


def _write_archive(folder: Path, fetched: Fetched) -> str:
    """Temp name, fsync, rename: a watcher sees the whole archive or none. Same bytes already there: made newest."""
    final = folder / fetched.filename
    if final.is_file() and sha256_file(final) == sha256_file(Path(fetched.archive)):
        newest = max((p.stat().st_mtime_ns for p in folder.glob("*.tar.gz") if not p.name.startswith(".")), default=0)
        if final.stat().st_mtime_ns >= newest:
            return "unchanged"
        os.utime(final)  # the watcher serves the newest archive: make ours the newest again
        return "refreshed"
    tmp = folder / f".{fetched.filename}.{os.getpid()}.tmp"
    try:
        with tmp.open("wb") as out, Path(fetched.archive).open("rb") as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return "written"


@task(**LIVE)
def wait_until_serving(target: Target, sha256: str, timeout_s: float) -> None:
    """Poll `/v1/model` until the target reports the new bundle (a folder target: the file is in place)."""
    if target.kind == "dir":
        return
    deadline, seen = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            seen = _serving(target)
        except TargetError as exc:
            seen = str(exc)
        if seen == sha256:
            return
        time.sleep(0.2)
    raise TargetError(f"{target.text}: still reports bundle {seen} after {timeout_s:.0f} s, not {sha256}")


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, **LIVE)
def golden_check(target: Target, fetched: Fetched) -> dict[str, Any]:
    """The bundle's golden inputs through `/v1/predict`: same labels (clear winners) and scores within atol."""
    golden = fetched.golden
    if target.kind == "dir" or not golden.get("inputs"):
        return {"checked": 0}
    inputs, logits = golden["inputs"], np.asarray(golden["logits"], dtype=np.float64)
    atol = float(golden.get("atol", 1e-3))
    predictions = []
    for start in range(0, len(inputs), GOLDEN_CHUNK):
        with _edge(target) as client:
            body = client.predict(inputs[start : start + GOLDEN_CHUNK])
        if str(body["model"]["version"]) != fetched.manifest_version:
            raise TargetError(f"{target.text}: golden inputs answered by version {body['model']['version']}")
        predictions += body["predictions"]
    return compare_golden(target.text, predictions, logits, golden.get("labels"), atol)


def compare_golden(
    where: str, predictions: list[dict[str, Any]], logits: np.ndarray, labels: list[Any] | None, atol: float
) -> dict[str, Any]:
    """Scores are a softmax of the logits, which moves by at most half the logit change: atol bounds both."""
    z = logits - logits.max(axis=1, keepdims=True)
    expected = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    worst = 0.0
    for i, prediction in enumerate(predictions):
        got = np.asarray(list(prediction["scores"].values()), dtype=np.float64)
        worst = max(worst, float(np.abs(got - expected[i]).max()))
        names = list(prediction["scores"])
        top2 = np.sort(logits[i])[-2:]
        clear = len(top2) < 2 or top2[1] - top2[0] > 2 * atol  # near-ties may flip within atol
        want = labels[i] if labels is not None else int(np.argmax(logits[i]))
        if clear and want not in (prediction["label"], names.index(prediction["label"])):
            raise TargetError(f"{where}: golden input {i} predicted as {prediction['label']!r}, expected {want!r}")
    if worst > atol:
        raise TargetError(f"{where}: golden scores differ by {worst:.3g} (atol {atol})")
    return {"checked": len(predictions), "max_score_diff": worst}


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, **LIVE)
def restore(target: Target, before: dict[str, Any], fetched: Fetched, token_env: str) -> str:
    """Put a target back on what it served before; looks first, so a retried or repeated call changes nothing."""
    if target.kind == "dir":
        return _restore_folder(Path(target.location) / fetched.filename, before)
    previous, now = before["bundle_sha256"], _serving(target)
    if now == previous:
        return "unchanged"
    if now != fetched.sha256:
        raise TargetError(f"{target.text}: serves {now}, neither this deploy's bundle nor the previous one; left alone")
    if previous is None:
        raise TargetError(f"{target.text}: had no model before this deploy, so there is nothing to roll back to")
    with _edge(target, token_env) as client:
        answer = client.rollback()
    if answer.get("bundle_sha256") != previous:
        raise TargetError(f"{target.text}: rolled back to {answer.get('bundle_sha256')}, not {previous}")
    return "rolled_back"


def _restore_folder(path: Path, before: dict[str, Any]) -> str:
    if not before["exists"]:
        if path.exists():
            path.unlink()
            return "removed"
        return "unchanged"
    if path.is_file() and path.stat().st_mtime_ns != before["mtime_ns"]:
        os.utime(path, ns=(before["mtime_ns"], before["mtime_ns"]))
        return "restored"
    return "unchanged"


@task(retries=2, retry_delay_seconds=2, **LIVE)
def record(tracking_uri: str, name: str, version: str, outcome: dict[str, Any]) -> None:
    """The deployment as `deploy.*` tags on the version, plus a short history of earlier ones."""
    tracker = Tracker(tracking_uri)
    entry = {k: outcome[k] for k in ("time", "status", "targets", "bundle_sha256")}
    history = [entry, *json.loads(tracker.version_tags(name, version).get("deploy.history") or "[]")]
    while len(json.dumps(history)) > HISTORY_CHARS and len(history) > 1:
        history.pop()
    tracker.tag_version(
        name,
        version,
        {
            "deploy.status": outcome["status"],
            "deploy.time": outcome["time"],
            "deploy.targets": json.dumps(outcome["targets"]),
            "deploy.bundle_sha256": outcome["bundle_sha256"],
            "deploy.error": outcome.get("error", "")[:HISTORY_CHARS],
            "deploy.history": json.dumps(history),
        },
    )


# ---------------------------------------------------------------- the flow


@flow(name="deploy-edge", flow_run_name=deploy_run_name)
def deploy(
    model_uri: str,
    targets: list[str],
    token_env: str = "TRANSFLOW_EDGE_TOKEN",
    tracking_uri: str | None = None,
    wait_s: float = 60.0,
    strategy: str = "direct",
    waves: str = "1,rest",
    rules: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Push one registered version to every target, check each, roll every changed one back if any fails.
    `strategy` shadow or canary: staged waves of candidates judged by `rules` instead (flows/deploy_waves.py)."""
    parsed = _check_inputs(targets, token_env)
    if strategy != "direct":
        from flows.deploy_waves import check_rollout, roll_out_waves

        check_rollout(parsed, strategy, waves, rules)
    uri = resolve_tracking_uri(tracking_uri)
    model_uri = model_uri if model_uri.startswith("models:/") else f"models:/{model_uri}"
    with tempfile.TemporaryDirectory(prefix="transflow-deploy-") as tmp:
        fetched = fetch_bundle(uri, model_uri, Path(tmp))
        outcome: dict[str, Any] = {
            "model": fetched.name,
            "version": fetched.version,
            "bundle_sha256": fetched.sha256,
            "targets": [t.text for t in parsed],
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            if strategy != "direct":
                outcome |= roll_out_waves(uri, parsed, fetched, token_env, wait_s, strategy, waves, rules)
            else:
                outcome |= {"results": _roll_out(parsed, fetched, token_env, wait_s), "status": "deployed"}
        except DeployError as exc:
            _record(uri, fetched, outcome | {"status": "failed", "error": str(exc)})
            raise
    _record(uri, fetched, outcome)
    return outcome


def _record(uri: str, fetched: Fetched, outcome: dict[str, Any]) -> None:
    """A registry that is down must not hide what happened to the targets: log it and go on."""
    try:
        record(uri, fetched.name, fetched.version, outcome)
    except Exception as exc:
        get_run_logger().error("could not record the deployment on %s v%s: %s", fetched.name, fetched.version, exc)
    publish_deploy(outcome)  # the Prefect UI's view, keyed per model


def _check_inputs(targets: list[str], token_env: str) -> list[Target]:
    """Fail before anything is fetched: no or malformed targets, or a missing token."""
    if not targets:
        raise DeployInputError("no targets: give --target URL (repeatable) or deploy.targets in the run config")
    parsed = [Target.parse(t) for t in dict.fromkeys(targets)]
    if any(t.kind == "http" for t in parsed) and not os.environ.get(token_env, "").strip():
        raise DeployInputError(f"${token_env} is not set: export the edge servers' admin token")
    return parsed


def _roll_out(parsed: list[Target], fetched: Fetched, token_env: str, wait_s: float) -> list[dict[str, Any]]:
    logger = get_run_logger()
    try:  # every target is looked at before any is touched: one that is down fails the deploy unchanged
        before = {t: snapshot(t, fetched.filename) for t in parsed}
    except Exception as exc:
        raise DeployError(f"deploy of {fetched.name} v{fetched.version} stopped before any change: {exc}") from None
    results, touched = [], []
    for target in parsed:
        touched.append(target)
        try:
            status = push(target, fetched, token_env)
            wait_until_serving(target, fetched.sha256, wait_s)
            golden = golden_check(target, fetched)
        except Exception as exc:  # whatever went wrong (refusal, network, disk full), nothing stays half-deployed
            logger.error("%s failed: %s; rolling back %d target(s)", target.text, exc, len(touched))
            rolled_back = _roll_back(fetched, touched, before, token_env)
            reason = str(exc).removeprefix(f"{target.text}: ")
            raise DeployError(
                f"deploy of {fetched.name} v{fetched.version} failed on {target.text}: {reason}\n{rolled_back}"
            ) from None
        logger.info("%s: %s, serving %s, golden %s", target.text, status, fetched.sha256[:12], golden)
        results.append({"target": target.text, "status": status, "before": before[target], "golden": golden})
    return results


def _roll_back(fetched: Fetched, touched: list[Target], before: dict[Target, dict[str, Any]], token_env: str) -> str:
    """Roll back every target this deploy touched (the failing one too: it may have half-taken the bundle)."""
    lines = ["rollback:"]
    for target in reversed(touched):
        try:
            lines.append(f"  {target.text}: {restore(target, before[target], fetched, token_env)}")
        except Exception as err:  # one target that cannot be restored must not keep the others from it
            lines.append(f"  {target.text}: NOT rolled back: {err}")
    return "\n".join(lines)
