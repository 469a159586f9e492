"""`watch-data`: start `retrain` when the data pinned on a git ref is not what the current model was trained on.

Scheduled every 15 minutes (prefect.yaml). It reads `data.dvc` at `ref` with `git show` (the committed pin,
not the working tree), compares its md5 with the `data_version` tag of the registered model's `champion`
(or of its latest version while there is no champion) and, when they differ, starts the `retrain`
deployment without waiting for it. The run's idempotency key is data version + config hash, so one data
version starts one retrain, however often the watcher runs and even while that retrain is still going.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task

from runconfig import load_config
from tasks.registered_version import CHAMPION
from tasks.tracking import Tracker, resolve_tracking_uri


class WatchError(RuntimeError):
    """The watcher cannot tell which data is pinned; the message names the file, ref or command."""


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise WatchError(f"`git {' '.join(args)}` failed in {cwd}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def parse_pin(text: str, where: str) -> str:
    """The data version in a .dvc file's text: its single output's md5 without DVC's '.dir' suffix."""
    outs = (yaml.safe_load(text) or {}).get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise WatchError(f"{where}: expected exactly one output with an md5")
    return str(outs[0]["md5"]).removesuffix(".dir")


@task(retries=2, retry_delay_seconds=10)
def pinned_version(dvc_file: Path, ref: str, fetch: bool = False) -> str:
    """The data version `dvc_file` pins at git `ref` (after `git fetch` when asked, so `origin/main` moves)."""
    repo = dvc_file.parent
    if fetch:
        git(repo, "fetch", "--quiet")
    return parse_pin(git(repo, "show", f"{ref}:./{dvc_file.name}"), f"{dvc_file} at {ref}")


@task
def trained_version(tracking_uri: str | None, model_name: str) -> dict[str, str] | None:
    """Version, alias and data version of the champion (else the latest version); None before any version."""
    client = Tracker(resolve_tracking_uri(tracking_uri)).client
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{model_name}'")}
    if not versions:
        return None
    aliases = client.get_registered_model(model_name).aliases
    number = str(aliases[CHAMPION]) if CHAMPION in aliases else max(versions, key=int)
    return {
        "version": number,
        "alias": CHAMPION if CHAMPION in aliases else "latest",
        "data_version": versions[number].tags.get("data_version", ""),
    }


def idempotency_key(model_name: str, data_version: str, config_hash: str) -> str:
    return f"transflow.retrain:{model_name}:{data_version}:{config_hash}"


@task
def start_retrain(deployment: str, parameters: dict[str, Any], key: str, tags: list[str]) -> dict[str, Any]:
    """Start `deployment` once per `key` and return at once: the run started now, or the one started before."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.client.schemas.filters import FlowRunFilterIdempotencyKey as KeyFilter
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(deployment)
        earlier = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[target.id])),
            flow_run_filter=FlowRunFilter(idempotency_key=KeyFilter(any_=[key])),
            limit=1,
        )
    if earlier:
        run = earlier[0]
    else:  # with the key the server also hands back the earlier run if two watchers race past the check above
        run = run_deployment(
            target.id, parameters=parameters, timeout=0, idempotency_key=key, tags=tags, as_subflow=False
        )
    return {"id": str(run.id), "name": run.name, "state": run.state_name, "new": not earlier}


@flow(name="watch-data", log_prints=True)
def watch_data(
    config_path: str = "configs/text-tweets.yaml",
    overrides: list[str] | None = None,
    ref: str = "HEAD",
    fetch: bool = False,
    deployment: str = "retrain/retrain",
) -> dict[str, Any]:
    """Start `deployment` (with this config) once for each data version on `ref` the model was not trained on."""
    cfg = load_config(config_path, overrides or [])
    if cfg.data.dvc_file is None:
        raise WatchError(f"{config_path}: data.dvc_file is null, so there is no DVC pin to watch")
    pinned = pinned_version(cfg.data.dvc_file, ref, fetch)
    current = trained_version(cfg.registry.tracking_uri, cfg.registry.model_name)
    outcome = {"model": cfg.registry.model_name, "ref": ref, "data_version": pinned, "current": current}
    if current and current["data_version"] == pinned:
        print(f"{cfg.registry.model_name} v{current['version']} ({current['alias']}) already trained on {pinned}")
        return outcome | {"action": "up-to-date"}
    key = idempotency_key(cfg.registry.model_name, pinned, cfg.config_hash())
    tags = ["transflow", "trigger:watch-data", f"data:{pinned[:12]}"]
    run = start_retrain(deployment, {"config_path": config_path, "overrides": list(overrides or [])}, key, tags)
    was = f"v{current['version']} ({current['alias']}) on {current['data_version'] or '?'}" if current else "none"
    verb = "started" if run["new"] else "already started earlier:"
    print(f"data {pinned} on {ref} (model: {was}): {verb} {deployment} run {run['name']} [{run['state']}]")
    return outcome | {"action": "started" if run["new"] else "already-started", "flow_run": run, "key": key}
