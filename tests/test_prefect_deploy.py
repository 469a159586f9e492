"""Scheduled retraining on real Prefect deployments.

A real `prefect server start` on loopback (own home, own sqlite), the real prefect.yaml and pool templates
applied by `transflow schedule install`, a real `prefect worker` on the `cpu` pool running `retrain` on the
smoke config (random 2-block BERT, real tweets in a DVC repo, sqlite MLflow in a temp dir); the data-change
trigger; the GPU preflight on this CPU machine; the promotion event. Plus fast unit tests without a server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from runconfig import load_config
from tasks.gpu import GpuPreflightError, preflight
from tests.prefect_server import ROOT, Service, api_for_this_process, prefect_env, start_worker, stop

integration, slow = pytest.mark.integration, pytest.mark.slow
SMOKE = "configs/smoke-text.yaml"


@dataclass(frozen=True)
class Api:
    url: str
    home: Path


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A real Prefect server; this test process talks to it for the whole module."""
    home = tmp_path_factory.mktemp("prefect-server")
    with api_for_this_process(home) as url:
        yield Api(url, home)


@pytest.fixture(scope="module")
def installed(prefect_api: Api) -> str:
    """`transflow schedule install`: pools from deploy/work-pools/*.json, then `prefect deploy --all`."""
    result = CliRunner().invoke(app, ["schedule", "install"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def cpu_worker(installed: str, prefect_api: Api) -> Iterator[Service]:
    worker = start_worker(prefect_api.home, prefect_api.url, "cpu")
    yield worker
    stop(worker)


def sync_client():
    from prefect import get_client

    return get_client(sync_client=True)


def pinned(repo: Path) -> str:
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"].removesuffix(".dir")


# --- deployments, pools, schedule commands ----------------------------------------------------


@integration
@slow
def test_install_applies_prefect_yaml_and_the_pool_templates(installed: str) -> None:
    spec = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert {"retrain", "retrain-gpu", "train-gpu", "watch-data", "promote", "deploy-edge"} <= set(spec)
    with sync_client() as client:
        for pool in ("cpu", "gpu"):
            found = client.read_work_pool(pool)
            assert found.type == "process"
            assert found.base_job_template == json.loads((ROOT / f"deploy/work-pools/{pool}.json").read_text())
        deployed = {d.name: d for d in client.read_deployments()}
        assert client.read_deployment_by_name("retrain/retrain-gpu").id == deployed["retrain-gpu"].id
        assert client.read_deployment_by_name("train/train-gpu").work_pool_name == "gpu"
        for name, want in spec.items():
            got = deployed[name]
            assert got.entrypoint == want["entrypoint"] and got.work_pool_name == want["work_pool"]["name"]
            assert got.parameters == want["parameters"]
            assert [_schedule_fields(s.schedule, s.slug) for s in got.schedules] == [
                _schedule_fields(SimpleNamespace(**s), s["slug"]) for s in want.get("schedules", [])
            ]
            assert got.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        automation = client.read_automations_by_name("deploy-edge__automation_1")[0]
        assert automation.enabled and automation.trigger.expect == {"transflow.model.promoted"}
    retrain = spec["retrain"]["schedules"][0]
    assert retrain["cron"] and retrain["timezone"], "the cron schedule names its time zone"
    assert spec["watch-data"]["schedules"][0]["interval"] == 900


def _schedule_fields(schedule: object, slug: str) -> tuple:
    """What prefect.yaml says of a schedule, comparable between the YAML and the server's copy."""
    interval = getattr(schedule, "interval", None)
    seconds = interval if isinstance(interval, int) else interval and interval.total_seconds()
    return slug, getattr(schedule, "cron", None), seconds, schedule.timezone


@integration
@slow
def test_schedule_list_and_pause_resume(installed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    monkeypatch.setattr("flows.cli_schedule.console", Console(width=200))  # one table row per line
    runner = CliRunner()
    listed = runner.invoke(app, ["schedule", "list"])
    assert listed.exit_code == 0, listed.output
    assert "retrain/retrain" in listed.output and "cron 30 3 * * 1 (UTC)" in listed.output
    assert "every 0:15:00 (UTC)" in listed.output and "retrain/retrain-gpu" in listed.output
    assert len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", listed.output)) == 6, "3 next runs per schedule"
    paused = runner.invoke(app, ["schedule", "pause", "retrain"])
    assert paused.exit_code == 0, paused.output
    with sync_client() as client:
        assert [s.active for s in client.read_deployment_by_name("retrain/retrain").schedules] == [False]
    assert "paused" in runner.invoke(app, ["schedule", "list"]).output
    resumed = runner.invoke(app, ["schedule", "pause", "retrain/retrain", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    with sync_client() as client:
        assert [s.active for s in client.read_deployment_by_name("retrain/retrain").schedules] == [True]
    for bad, error, code in (("no-such", "no deployment named", 2), ("retrain-gpu", "has no schedule", 1)):
        result = runner.invoke(app, ["schedule", "pause", bad])  # 2: bad input, 1: cannot be done (cli_errors)
        assert result.exit_code == code and error in result.output


# --- retrain through the worker ---------------------------------------------------------------


@integration
@slow
def test_retrain_deployment_runs_on_the_cpu_worker_and_registers_a_version(
    cpu_worker: Service, tweets_repo: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    from prefect.deployments import run_deployment

    overrides = smoke_overrides(tweets_repo, tiny_bert_dir, tmp_path)
    started = time.perf_counter()
    run = run_deployment(
        "retrain/retrain",
        parameters={"config_path": SMOKE, "overrides": overrides},  # relative: resolved in the deployment's dir
        timeout=480,
        poll_interval=2,
        as_subflow=False,
    )
    assert run.state is not None and run.state.is_completed(), f"{run.state}\n--- worker log:\n{cpu_worker.tail()}"
    assert run.work_pool_name == "cpu" and run.infrastructure_pid, "ran in a process the worker started"
    version = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_model_version_by_alias("smoke-text", "challenger")
    assert version.tags["data_version"] == pinned(tweets_repo)
    assert version.tags["backbone"] == str(tiny_bert_dir)
    print(f"retrain through the worker: {time.perf_counter() - started:.0f}s")


# --- data-change trigger ----------------------------------------------------------------------


def git(repo: Path, *args: str) -> None:
    identity = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", *identity, *args], cwd=repo, check=True, capture_output=True)


def commit_pin(repo: Path, md5: str) -> None:
    (repo / "data.dvc").write_text(f"outs:\n- md5: {md5}.dir\n  nfiles: 3\n  hash: md5\n  path: data\n")
    git(repo, "add", "data.dvc")
    git(repo, "commit", "-q", "-m", f"data {md5[:6]}")


def register(tracking_uri: str, model: str, data_versions: list[str], champion: int | None) -> None:
    """Versions 1..n of `model`, tagged with these data versions; alias `champion` on version `champion`."""
    client = MlflowClient(tracking_uri)
    client.create_registered_model(model)
    run = client.create_run(client.create_experiment(f"watch-{model}"))
    for data_version in data_versions:
        tags = {"data_version": data_version}
        client.create_model_version(model, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags)
    if champion:
        client.set_registered_model_alias(model, "champion", str(champion))


@contextmanager
def pool_paused(name: str) -> Iterator[None]:
    """Hold the pool's runs (the cpu worker may be up): the test counts started runs, it does not train them."""
    from prefect.client.schemas.actions import WorkPoolUpdate

    with sync_client() as client:
        client.update_work_pool(name, WorkPoolUpdate(is_paused=True))
        try:
            yield
        finally:
            client.update_work_pool(name, WorkPoolUpdate(is_paused=False))


def triggered_runs() -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterTags

    with sync_client() as client:
        deployment = client.read_deployment_by_name("retrain/retrain")
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["trigger:watch-data"])),
        )


@integration
@slow
def test_watch_data_starts_exactly_one_retrain_per_new_data_version(installed: str, tmp_path: Path) -> None:
    from flows.watch import trained_version, watch_data

    v1, v2, v3 = ("1" * 32, "2" * 32, "3" * 32)
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    commit_pin(repo, v1)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register(tracking, "m", [v1, v2], champion=1)  # the champion decides, not the newer version 2
    register(tracking, "fresh", [v1, v2], champion=None)
    assert trained_version.fn(tracking, "m") == {"version": "1", "alias": "champion", "data_version": v1}
    assert trained_version.fn(tracking, "fresh") == {"version": "2", "alias": "latest", "data_version": v2}
    assert trained_version.fn(tracking, "never-registered") is None
    overrides = [f"data.dvc_file={repo / 'data.dvc'}", f"registry.tracking_uri={tracking}", "registry.model_name=m"]
    config = str(ROOT / SMOKE)
    with pool_paused("cpu"):
        try:
            assert watch_data(config, overrides)["action"] == "up-to-date"
            assert triggered_runs() == []

            commit_pin(repo, v2)
            first = watch_data(config, overrides)
            again = watch_data(config, overrides)
            assert (first["action"], again["action"]) == ("started", "already-started")
            assert first["flow_run"]["id"] == again["flow_run"]["id"] and first["data_version"] == v2

            (repo / "data.dvc").write_text((repo / "data.dvc").read_text().replace(v2, v3))  # not committed
            assert watch_data(config, overrides)["flow_run"]["id"] == first["flow_run"]["id"], "reads the ref"

            commit_pin(repo, v3)
            second = watch_data(config, overrides)
            assert second["action"] == "started" and second["flow_run"]["id"] != first["flow_run"]["id"]

            runs = triggered_runs()
            assert sorted(str(r.id) for r in runs) == sorted([first["flow_run"]["id"], second["flow_run"]["id"]])
            assert {r.idempotency_key for r in runs} == {first["key"], second["key"]}
            assert all(r.parameters == {"config_path": config, "overrides": overrides} for r in runs)
        finally:
            with sync_client() as client:
                for run in triggered_runs():
                    client.delete_flow_run(run.id)


# --- GPU preflight --------------------------------------------------------------------------------


def smoke_overrides(tweets_repo: Path, tiny_bert_dir: Path, tmp_path: Path) -> list[str]:
    return [
        f"data.path={tweets_repo / 'data'}",
        f"data.dvc_file={tweets_repo / 'data.dvc'}",
        f"backbone.uri={tiny_bert_dir}",
        f"output_dir={tmp_path / 'runs'}",
        f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]


def runs_of(deployment: str, parent_run_id: object) -> list:
    """Flow runs of `deployment` started as subflows of `parent_run_id` (run_deployment links them by task run)."""
    with sync_client() as client:
        found = [r for r in flow_runs_of(deployment) if r.parent_task_run_id]
        return [r for r in found if client.read_task_run(r.parent_task_run_id).flow_run_id == parent_run_id]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@integration
@slow
def test_training_runs_as_its_own_deployment_passing_data_and_model_by_reference(
    cpu_worker: Service, prefect_api: Api, tweets_repo: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """`retrain` with `train_deployment`: the stages run in another flow run (here `train/train-cpu` on the cpu
    pool, as `train/train-gpu` would on the gpu pool); the model comes back through MLflow, then register+export."""
    from prefect.deployments import run_deployment

    deploy = ["deploy", "flows/train.py:train", "--name", "train-cpu", "--pool", "cpu"]
    deployed = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *deploy],
        cwd=ROOT,
        env=prefect_env(prefect_api.home, prefect_api.url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    overrides = smoke_overrides(tweets_repo, tiny_bert_dir, tmp_path)
    parent = run_deployment(
        "retrain/retrain",
        parameters={"config_path": SMOKE, "overrides": overrides, "train_deployment": "train/train-cpu"},
        timeout=600,
        poll_interval=2,
        as_subflow=False,
    )
    assert parent.state is not None and parent.state.is_completed(), f"{parent.state}\n{cpu_worker.tail()}"
    [child] = runs_of("train/train-cpu", parent.id)
    assert child.state is not None and child.state.is_completed()
    assert child.infrastructure_pid and child.infrastructure_pid != parent.infrastructure_pid, "its own process"
    assert set(child.parameters) >= {"data_version", "run_id", "tracking_uri"}, "handed over by reference"
    assert child.parameters["data_version"] == pinned(tweets_repo)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias("smoke-text", "challenger")
    assert version.run_id == child.parameters["run_id"], "the version is the model the train run logged"
    assert version.tags["data_version"] == pinned(tweets_repo) and version.tags["exported"] == "true"
    assert version.tags["onnx.parity_passed"] == "true", "exported from the model read back from MLflow"
    top = {a.path for a in client.list_artifacts(version.run_id)}
    assert {"model", "training.json", "bundle", "config.json"} <= top
    stage_runs = client.search_runs(
        [client.get_run(version.run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{version.run_id}'",
    )
    assert len(stage_runs) == len(load_config(str(ROOT / SMOKE)).stages), "one nested run per stage, in the parent"


@integration
@slow
@pytest.mark.parametrize(
    ("name", "message"), [("train/no-such", "no deployment 'train/no-such' on http"), ("x", "give FLOW/DEPLOYMENT")]
)
def test_unknown_train_deployment_fails_before_any_run_is_opened(
    installed: str, tweets_repo: Path, tiny_bert_dir: Path, tmp_path: Path, name: str, message: str
) -> None:
    from flows.retrain import TrainDeploymentError, retrain

    with pytest.raises(TrainDeploymentError, match=message):
        retrain(str(ROOT / SMOKE), smoke_overrides(tweets_repo, tiny_bert_dir, tmp_path), train_deployment=name)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


@integration
@slow
def test_gpu_training_deployment_fails_fast_with_the_preflight_message(
    cpu_worker: Service, prefect_api: Api, tweets_repo: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """`retrain/retrain-gpu` runs on the cpu pool and hands the stages to `train/train-gpu` on the gpu pool,
    whose preflight fails on this machine: both runs fail with the preflight's message, nothing is trained."""
    import torch
    from prefect.deployments import run_deployment

    if torch.cuda.is_available():
        pytest.skip("this test proves the failure on a machine without a usable GPU")
    overrides = smoke_overrides(tweets_repo, tiny_bert_dir, tmp_path)
    parent = run_deployment(
        "retrain/retrain-gpu", parameters={"config_path": SMOKE, "overrides": overrides}, timeout=0, as_subflow=False
    )
    [child] = wait_for(lambda: runs_of("train/train-gpu", parent.id), 300, "the train-gpu run")
    worker = start_worker(prefect_api.home, prefect_api.url, "gpu", "--run-once", "--limit", "1")
    try:
        worker.proc.wait(timeout=300)
    finally:
        stop(worker)
    with sync_client() as client:
        final = wait_for(lambda: (r := client.read_flow_run(parent.id)).state.is_final() and r, 120, "the parent")
        child = client.read_flow_run(child.id)
    for run in (child, final):
        assert run.state is not None and run.state.is_failed(), f"{run.state}\n{worker.tail()}"
        assert "GPU preflight failed" in run.state.message and "CUDA is not visible" in run.state.message
    assert (child.work_pool_name, final.work_pool_name) == ("gpu", "cpu")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("transflow").experiment_id])
    assert run.info.status == "FAILED", "the orchestrator closed its MLflow run as failed"
    assert client.search_registered_models() == [], "nothing registered"
    assert not list((tmp_path / "runs").glob("*/stages")), "failed before any training"


def fake_torch(cuda: str | None = "12.4", visible: bool = True, free_gib: float = 70, bf16: bool = True):
    gib = 1024**3
    return SimpleNamespace(
        __version__="2.5.0",
        version=SimpleNamespace(cuda=cuda),
        cuda=SimpleNamespace(
            is_available=lambda: visible,
            device_count=lambda: int(visible),
            current_device=lambda: 0,
            mem_get_info=lambda i: (int(free_gib * gib), 80 * gib),
            get_device_name=lambda i: "Fake H100",
            get_device_capability=lambda i: (9, 0),
            is_bf16_supported=lambda: bf16,
        ),
    )


@pytest.mark.parametrize(
    ("torch_kw", "kwargs", "message"),
    [
        ({"cuda": None}, {}, "has no CUDA support"),
        ({"visible": False}, {}, "CUDA is not visible"),
        ({"free_gib": 0.5}, {"min_free_gib": 2.0}, "has 0.50 GiB free of 80.00 GiB, need at least 2 GiB"),
        ({"bf16": False}, {"require_bf16": True}, "no bf16 support but training.bf16 is true"),
    ],
)
def test_preflight_names_what_is_missing(monkeypatch, torch_kw: dict, kwargs: dict, message: str) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch", fake_torch(**torch_kw))
    with pytest.raises(GpuPreflightError, match="GPU preflight failed on .*" + message.replace("(", r"\(")):
        preflight(**kwargs)


def test_preflight_reports_a_usable_gpu(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch", fake_torch(bf16=False))
    found = preflight(min_free_gib=2.0)  # bf16 missing is not an error unless required
    assert (found["device"], found["name"], found["free_gib"], found["bf16"]) == ("cuda:0", "Fake H100", 70.0, False)


def test_preflight_on_this_machine_is_clear_or_passes() -> None:
    import torch

    if torch.cuda.is_available():
        assert preflight(min_free_gib=0)["device"].startswith("cuda")
    else:
        with pytest.raises(GpuPreflightError, match=r"CUDA is not visible|no CUDA support"):
            preflight()


# --- promotion event → deploy-edge ------------------------------------------------------------------


def flow_runs_of(deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with sync_client() as client:
        found = client.read_deployment_by_name(deployment)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])))


EMIT_TWO_PROMOTIONS = """
import json
from tasks.events import emit_promoted
first = emit_promoted("smoke-text", "3", previous="2", reason="won", tracking_uri="sqlite:///m.db")
second = emit_promoted("other", "7")  # no tracking URI in this one
print(json.dumps([None if e is None else str(e.id) for e in (first, second)]))
"""


@integration
@slow
def test_promoted_event_is_stored_and_starts_deploy_edge_for_that_version(installed: str, prefect_api: Api) -> None:
    from prefect.events.filters import EventFilter, EventNameFilter

    from tasks.events import PROMOTED

    with pool_paused("cpu"):  # the deploy-edge run is counted, not run
        try:
            # emitted from its own process, as the promote flow does: this test process's events worker may still
            # hold a queue of events from earlier tests, sent one slow failure at a time, ahead of ours
            sent = subprocess.run(
                [sys.executable, "-c", EMIT_TWO_PROMOTIONS],
                env=prefect_env(prefect_api.home, prefect_api.url),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert sent.returncode == 0, sent.stderr[-3000:]
            event_id, other_id = json.loads(sent.stdout.strip().splitlines()[-1])
            assert event_id is not None and other_id is not None, "no event emitted although the API is reachable"
            deadline, stored, runs = time.monotonic() + 60, [], []
            while not (stored and len(runs) == 2) and time.monotonic() < deadline:
                time.sleep(1)
                with sync_client() as client:
                    page = client.read_events(EventFilter(event=EventNameFilter(name=[PROMOTED])), limit=50)
                stored = [e for e in page.events if str(e.id) == event_id]
                runs = flow_runs_of("deploy-edge/deploy-edge")
            assert stored, "event not stored by the server"
            assert stored[0].resource.id == "transflow.model.smoke-text"
            assert stored[0].resource["transflow.model.version"] == "3"
            assert (stored[0].payload["version"], stored[0].payload["previous"]) == ("3", "2")
            started = sorted((r.parameters for r in runs), key=lambda p: p["model_uri"])
            spec = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
            defaults = spec["deploy-edge"]["parameters"]  # targets [], strategy direct, waves, rules
            assert started == [
                defaults | {"model_uri": "models:/other/7", "tracking_uri": None},
                defaults | {"model_uri": "models:/smoke-text/3", "tracking_uri": "sqlite:///m.db"},
            ], "the trigger starts one deploy-edge run per promotion, pinned to the promoted version"
        finally:
            with sync_client() as client:
                for run in flow_runs_of("deploy-edge/deploy-edge"):
                    client.delete_flow_run(run.id)
