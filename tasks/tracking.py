"""The only module that calls MLflow. Runs are addressed by explicit `run_id` (MLflow's active run is
thread-local, and Prefect tasks may run in other threads); metrics go in batches.

Default store: `mlflow/store/mlflow.db` (sqlite) with artifacts in `mlflow/store/artifacts`;
`registry.tracking_uri` or `MLFLOW_TRACKING_URI` switch to a shared `mlflow server`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.tracking_registry import RegistryCalls, missing, quote

DEFAULT_STORE = Path("mlflow/store")
CHALLENGER = "challenger"
LINEAGE_KEYS = ("data_version", "git_commit", "git_dirty", "config_hash", "backbone")
PYFUNC_NAME = "pyfunc"  # the LoggedModel of a run that its registered version points at
# MLflow's "model from code" file: outside every product package, so the edge package never imports MLflow.
PYFUNC_CODE = Path(__file__).resolve().parents[1] / "mlflow" / "transflow_pyfunc.py"


def resolve_tracking_uri(configured: str | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_STORE.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_STORE.resolve() / 'mlflow.db'}"


@dataclass(frozen=True)
class Tracker(RegistryCalls):
    """A tracking URI and the calls the pipeline needs; cheap to pass between tasks. The registry's lock and
    tag primitives live in tasks/tracking_registry.py."""

    uri: str

    @property
    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def experiment_id(self, name: str) -> str:
        client = self.client
        found = client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in ./mlruns
            location = (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "artifacts").as_uri()
        return client.create_experiment(name, artifact_location=location)

    def start_run(self, experiment: str, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        return self.client.create_run(self.experiment_id(experiment), run_name=name, tags=tags).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @contextmanager
    def system_metrics(self, run_id: str, enabled: bool, interval_s: float = 10.0) -> Iterator[None]:
        """MLflow's own system-metrics monitor sampling into `run_id` while the block runs (`system/…` metrics;
        `training.system_metrics`). A thread of this process: nothing to do when disabled."""
        if not enabled:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100], synchronous=True)

    def log_metrics(self, run_id: str, rows: list[tuple[str, float, int]]) -> None:
        """Many (key, value, step) points in as few calls as MLflow allows (1000 per batch)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for k, v, step in rows]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000], synchronous=True)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_artifacts(self, run_id: str, local: Path, artifact_path: str | None = None) -> None:
        if local.is_dir():
            self.client.log_artifacts(run_id, str(local), artifact_path)
        else:
            self.client.log_artifact(run_id, str(local), artifact_path)

    def register(
        self,
        run_id: str,
        model_name: str,
        artifact_path: str,
        tags: dict[str, str],
        alias: str = CHALLENGER,
        model_id: str | None = None,
    ) -> str:
        """Register `runs:/<run_id>/<artifact_path>` as a new version with `alias` (default `challenger`); with
        `model_id`, register that LoggedModel instead (its artifact location is the version's source).

        Exactly one version per run: a retried or re-run registration returns the version it made before, and a
        create that the client itself retried (the server made a version, the answer was lost, the POST went
        again) is caught by checking after the create: the run's lowest version stays, duplicates are deleted.
        """
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            client.create_registered_model(model_name, description="Registered by transflow.")
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        existing = self._run_versions(model_name, run_id)
        if existing:
            version = existing[0]
        else:
            if model_id:  # the location itself, not models:/<id>: MLflow would resolve that on its global URI
                source = client.get_logged_model(model_id).artifact_location
            else:
                source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
            client.create_model_version(model_name, source, run_id=run_id, tags=tags, model_id=model_id)
            version, *duplicates = self._run_versions(model_name, run_id)  # every writer keeps the lowest
            for extra in duplicates:
                self.delete_version(model_name, extra)
            if model_id:
                self._link_version(model_id, model_name, str(version))
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version, key, value)
        if alias.lower() != "latest":  # MLflow reserves @latest: it always means the newest version
            client.set_registered_model_alias(model_name, alias, version)
        return str(version)

    def _run_versions(self, model_name: str, run_id: str) -> list[str]:
        found = self.client.search_model_versions(f"name='{quote(model_name)}' and run_id='{run_id}'")
        return sorted((str(v.version) for v in found), key=int)

    def log_onnx(self, run_id: str, onnx_path: Path, workdir: Path, artifact_path: str = "onnx") -> None:
        """Log an ONNX file in MLflow's onnx flavour (MLmodel + model.onnx, no pickle) under the run."""
        import shutil

        import mlflow.onnx
        import onnx

        out = workdir / artifact_path
        shutil.rmtree(out, ignore_errors=True)
        mlflow.onnx.save_model(onnx.load(str(onnx_path)), str(out))
        self.log_artifacts(run_id, out, artifact_path)

    # --- the registered version as an MLflow model: a pyfunc over the verified ONNX bundle ---------------------

    def create_logged_model(self, run_id: str, name: str = PYFUNC_NAME) -> str:
        """An empty LoggedModel of the run, registered before it is filled (`log_pyfunc`): the bundle's manifest
        names the version, so the version must exist before the bundle that becomes the model."""
        run = self.client.get_run(run_id)
        found = self.client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'"
        )
        if found:  # a retried task reuses the model it created
            return found[0].model_id
        return self.client.create_logged_model(
            run.info.experiment_id, name=name, source_run_id=run_id, model_type="transflow-onnx-bundle"
        ).model_id

    def log_pyfunc(
        self, model_name: str, version: str, bundle_dir: Path, workdir: Path, metrics: dict[str, float]
    ) -> str | None:
        """Fill the version's LoggedModel: MLmodel (pyfunc, model from code), the bundle as its one artifact,
        signature and input example from the bundle's golden inputs, `metrics` linked to it; mark it READY.
        None for a version that has no LoggedModel (a plain directory: a backbone, or export disabled)."""
        import shutil
        from importlib.metadata import version as installed

        import mlflow
        import pandas as pd
        from mlflow.entities import LoggedModelOutput, Metric
        from mlflow.models import Model
        from transflow_edge import mlflow_model

        mv = self.client.get_model_version(model_name, version)
        if not _model_id(mv):
            return None
        logged = self.client.get_logged_model(_model_id(mv))
        out = workdir / "pyfunc"
        shutil.rmtree(out, ignore_errors=True)
        mlflow.pyfunc.save_model(
            str(out),
            python_model=str(PYFUNC_CODE),
            artifacts={mlflow_model.BUNDLE_KEY: str(bundle_dir)},
            input_example=pd.DataFrame(mlflow_model.input_example(bundle_dir)),
            # Named, not inferred: inference re-imports the model in a subprocess (slow) and cannot see that
            # transflow-edge is what the code needs.
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"transflow-edge=={installed('transflow-edge')}"],
            mlflow_model=Model(
                artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=mv.run_id,
                model_id=logged.model_id,
            ),
        )  # fmt: skip
        self.client.log_model_artifacts(logged.model_id, str(out))
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, 0, run_id=mv.run_id, model_id=logged.model_id) for k, v in metrics.items()]
        self.client.log_batch(mv.run_id, metrics=rows, synchronous=True)
        outputs = self.client.get_run(mv.run_id).outputs
        if logged.model_id not in {o.model_id for o in (outputs.model_outputs if outputs else [])}:
            self.client.log_outputs(mv.run_id, [LoggedModelOutput(logged.model_id, step=0)])  # once: a re-export
        self.client.finalize_logged_model(logged.model_id, "READY")
        return logged.model_id

    def training_model_uri(self, model_uri: str, artifact_path: str = "model") -> str:
        """Where a registered version's training-format directory is (to fine-tune on, use as a backbone, or
        re-evaluate): the run's `model/` artifact for a pyfunc version, the version itself for a plain one."""
        name, version = self.resolve_version(model_uri)
        mv = self.client.get_model_version(name, version)
        return f"runs:/{mv.run_id}/{artifact_path}" if _model_id(mv) and mv.run_id else f"models:/{name}/{version}"

    def _link_version(self, model_id: str, name: str, version: str) -> None:
        """The LoggedModel lists its registered versions (`mlflow.modelVersions`, as `log_model` records it): a
        tracking server does it on registration, a local store does not."""
        found = json.loads(self.client.get_logged_model(model_id).tags.get("mlflow.modelVersions") or "[]")
        if {"name": name, "version": int(version)} not in found and {"name": name, "version": version} not in found:
            found.append({"name": name, "version": int(version)})
            self.client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(found)})

    def describe_version(self, model_name: str, version: str, description: str) -> None:
        self.client.update_model_version(model_name, version, description=description)

    def log_dataset(self, run_id: str, name: str, digest: str, source: dict[str, str], context: str) -> None:
        """A DVC data version as the run's dataset input (MLflow has no DVC source type: source is a JSON pointer;
        the digest keeps MLflow's 36-character limit, enough for the 32-hex md5)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name, digest[:36], "dvc", json.dumps(source, sort_keys=True))
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def tag_version(self, model_name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(model_name, version, key, value)

    def version_tags(self, model_name: str, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(model_name, version).tags)

    def download(self, model_uri: str, dst: Path) -> Path:
        """Fetch `models:/name@alias` (or `models:/name/3`, `runs:/…`) into `dst`."""
        import mlflow.artifacts

        dst.mkdir(parents=True, exist_ok=True)
        if model_uri.startswith("models:/"):  # resolve through this registry, not MLflow's global one
            model_uri = self.client.get_model_version_download_uri(*self.resolve_version(model_uri))
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst), tracking_uri=self.uri)
        )

    def resolve_version(self, model_uri: str) -> tuple[str, str]:
        """`models:/name@alias` or `models:/name/N` → (name, version)."""
        name, _, ref = model_uri.removeprefix("models:/").partition("@")
        if ref.lower() == "latest":
            versions = self.client.search_model_versions(f"name='{name}'")
            if not versions:
                raise ValueError(f"registered model {name!r} has no versions")
            return name, str(max(int(v.version) for v in versions))
        if ref:
            return name, str(self.client.get_model_version_by_alias(name, ref).version)
        name, _, number = name.rpartition("/")
        return name, number

    # --- registry lifecycle: promotion gate, rollback, lineage (tasks/promote.py) ---------------------------

    def model_exists(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException as exc:
            if missing(exc):
                return False
            raise
        return True

    def version_numbers(self, name: str) -> list[str]:
        """Every version of a registered model, oldest first."""
        found = self.client.search_model_versions(f"name='{quote(name)}'")
        return sorted((str(v.version) for v in found), key=int)

    def model_version(self, name: str, version: str) -> VersionRecord | None:
        """The version's run, tags and aliases, or None when the model or the version does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(name, version)
        except MlflowException as exc:
            if missing(exc):
                return None
            raise
        return VersionRecord(name, str(mv.version), mv.run_id, dict(mv.tags), list(mv.aliases), mv.source)

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version an alias points at, or None when the alias is not set."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            if missing(exc):
                return None
            raise

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """One call, atomic on the server: the alias points at the old version or the new one, never neither."""
        self.client.set_registered_model_alias(name, alias, version)

    def run_artifact(self, run_id: str, path: str, dst: Path) -> Path | None:
        """Download one artifact file of a run into `dst`; None when the run has no such file."""
        parent = path.rpartition("/")[0] or None
        if path not in {a.path for a in self.client.list_artifacts(run_id, parent) if not a.is_dir}:
            return None
        return self.download(f"runs:/{run_id}/{path}", dst)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def runs(self, experiment: str, status: str | None = None) -> list[RunRecord]:
        """Every run of an experiment (or those with `status`), oldest first; [] when the experiment does not exist."""
        found = self.client.get_experiment_by_name(experiment)
        if not found:
            return []
        out, token = [], None
        where = f"attributes.status = '{status}'" if status else ""
        while True:
            page = self.client.search_runs(
                [found.experiment_id], where, order_by=["attributes.start_time ASC"], max_results=1000, page_token=token
            )
            out += [RunRecord(r.info.run_id, r.info.status, r.info.start_time, dict(r.data.tags)) for r in page]
            token = page.token
            if not token:
                return out

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    def run_status(self, run_id: str) -> str | None:
        """RUNNING, FINISHED, FAILED, KILLED; None when there is no such run."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_run(run_id).info.status)
        except MlflowException as exc:
            if missing(exc):
                return None
            raise

    def artifact_uri(self, run_id: str) -> str:
        return str(self.client.get_run(run_id).info.artifact_uri)


@dataclass(frozen=True)
class VersionRecord:
    """What the gate and lineage read of a model version (plain values, no MLflow entity)."""

    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]
    aliases: list[str]
    source: str


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    status: str
    start_time: int
    tags: dict[str, str]


def _model_id(mv: Any) -> str | None:
    """The LoggedModel a version was registered from. SQL stores keep no `model_id` column, so it is read back
    from the source, which is the LoggedModel's artifact location (`…/models/m-<id>/artifacts`)."""
    import re

    found = re.search(r"/models/(m-[0-9a-f]{32})/artifacts/?$", mv.source or "")
    return mv.model_id or (found.group(1) if found else None)


def tracking_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a tracking-server call can raise, for callers that report them (no mlflow import there)."""
    from mlflow.exceptions import MlflowException

    return (MlflowException, OSError)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'c': [{'d': 2}]} → {'a.b': 1, 'c.0.d': 2}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out
