"""At home in MLflow and Prefect, against real servers.

One tiny model is trained by the real retraining flow (real tweets in a real DVC repo, a random-weight BERT,
a sqlite MLflow store), reporting to a real `prefect server start`, and promoted by the real promote flow.
- MLflow: the registered version is a pyfunc over the verified ONNX bundle; in a virtual environment holding
  only mlflow and the edge distribution (no torch), `mlflow.pyfunc.load_model("models:/NAME@champion").predict`
  and `mlflow models serve … /invocations` answer what the edge server answers for the golden inputs; the run
  carries MLflow's source tags and the DVC data version as a dataset input; the version has a description.
- Prefect: the retrain summary table, the links to MLflow, the promotion decision and the deploy outcome are
  read back from the server as artifacts, with run names made from the parameters.
- CLI: each command's failure path ends in one `error:` line and its documented exit code.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.mlflow_server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]
SMOKE = str(ROOT / "configs" / "smoke-text.yaml")
MODEL = "pyfunc-tweets"
CODE = ROOT / "mlflow" / "transflow_pyfunc.py"


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server; this process's flows report to it (no temporary server)."""
    from tests.prefect_server import api_for_this_process

    with api_for_this_process(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


@pytest.fixture(scope="module")
def registered(
    prefect_api: str, tweets_repo: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    from flows.promote import promote
    from flows.retrain import retrain
    from tasks.tracking import Tracker

    tmp = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    summary = retrain(
        SMOKE,
        [
            f"data.path={tweets_repo / 'data'}",
            f"data.dvc_file={tweets_repo / 'data.dvc'}",
            f"backbone.uri={tiny_bert_dir}",
            f"output_dir={tmp / 'runs'}",
            f"registry.tracking_uri={uri}",
            f"registry.model_name={MODEL}",
            "evaluation.baselines=false",
            "stages=[{kind: full, epochs: 1, lr: 3.0e-3}]",
            "data.train_limit=200",
        ],
    )
    tracker = Tracker(uri)
    decision = promote(MODEL, summary["model_version"], tracking_uri=uri)  # re-evaluates the run's model/ dir
    assert decision["outcome"] == "promoted", decision
    golden = json.loads((Path(summary["export"]["bundle_dir"]) / "golden.json").read_text())
    return SimpleNamespace(uri=uri, summary=summary, tracker=tracker, tmp=tmp, texts=golden["inputs"], repo=tweets_repo)


def test_the_version_is_a_logged_pyfunc_model_with_signature_example_and_linked_metrics(
    registered: SimpleNamespace,
) -> None:
    from mlflow.models import Model

    client = registered.tracker.client
    mv = client.get_model_version(MODEL, registered.summary["model_version"])
    experiment = client.get_run(mv.run_id).info.experiment_id
    (logged,) = client.search_logged_models([experiment], filter_string=f"source_run_id = '{mv.run_id}'")
    assert mv.source == logged.artifact_location, "the version is the run's LoggedModel"
    assert str(logged.status).endswith("READY") and logged.name == "pyfunc"
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": MODEL, "version": int(mv.version)}]
    linked = {m.key: m.value for m in logged.metrics or []}
    assert {"test_accuracy", "test_macro_f1", "onnx_fp32_max_abs_diff"} <= set(linked), linked
    local = registered.tracker.download(f"models:/{MODEL}/{mv.version}", registered.tmp / "mlmodel")
    meta = Model.load(str(local / "MLmodel"))
    assert "python_function" in meta.flavors and meta.signature is not None
    assert [c.name for c in meta.signature.inputs.inputs] == ["text"]
    assert meta.saved_input_example_info is not None
    assert (local / "artifacts" / "bundle" / "manifest.json").is_file()
    # The training-format directory stays a run artifact: continued training, backbones and the gate use it.
    assert registered.tracker.training_model_uri(f"models:/{MODEL}@champion") == f"runs:/{mv.run_id}/model"
    assert {a.path for a in client.list_artifacts(mv.run_id)} >= {"model", "bundle", "onnx"}


def test_the_run_follows_mlflow_conventions_and_the_version_is_described(registered: SimpleNamespace) -> None:
    client = registered.tracker.client
    run = client.get_run(registered.summary["run_id"])
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "flows/retrain.py" and tags["mlflow.source.type"] == "JOB"
    assert "mlflow.source.git.commit" in tags or tags["git_commit"] == "unknown"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == registered.summary["data_version"][:36]
    assert dataset.dataset.source_type == "dvc"
    source = json.loads(dataset.dataset.source)
    assert source["dvc_file"].endswith("data.dvc") and "git_commit" in source
    assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["train"]
    described = client.get_model_version(MODEL, registered.summary["model_version"]).description
    assert registered.summary["data_version"] in described and "this model" in described
    assert "No baselines evaluated" in described  # this run turned them off


def test_the_model_code_imports_only_mlflow_and_the_edge_package() -> None:
    """The file MLflow executes at load time: what a serving box needs is mlflow + transflow-edge."""
    roots = {
        (n.module if isinstance(n, ast.ImportFrom) else n.names[0].name).split(".")[0]
        for n in ast.walk(ast.parse(CODE.read_text()))
        if isinstance(n, ast.Import | ast.ImportFrom)
    }
    assert roots == {"mlflow", "transflow_edge"}


# --- a fresh environment with only mlflow and the edge distribution ------------------------------------------


@pytest.fixture(scope="module")
def light_venv() -> Path:
    """`python -m venv` + `pip install -c constraints mlflow -e ./edge`: nothing else, no torch. Built once per
    (constraints, edge/pyproject.toml) in the user's cache dir and reused: the edge code is installed editable, so
    a reused venv still runs this checkout's edge package; a half-built one (no marker) is rebuilt."""
    import hashlib
    import shutil

    inputs = [ROOT / "requirements" / "constraints.txt", ROOT / "edge" / "pyproject.toml"]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in inputs) + sys.version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transflow" / f"light-venv-{key}"
    marker = cache / ".transflow-complete"
    if not marker.is_file():
        shutil.rmtree(cache, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(cache)], check=True, timeout=120)
        pip = [str(cache / "bin" / "pip"), "install", "-q", "-c", str(inputs[0]), "mlflow", "-e", str(ROOT / "edge")]
        proc = subprocess.run(pip, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        marker.write_text(key)
    absent = subprocess.run([str(cache / "bin" / "python"), "-c", "import torch"], capture_output=True, timeout=60)
    assert absent.returncode != 0, "the light venv must not have torch"
    return cache


def light_env(registered: SimpleNamespace, venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHON", "VIRTUAL_ENV"))}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT / ".venv"))]
    bin_dir = str(venv / "bin")  # as if activated: `mlflow models serve` runs `uvicorn` from PATH
    return env | {"MLFLOW_TRACKING_URI": registered.uri, "PATH": os.pathsep.join([bin_dir, *path])}


@pytest.fixture(scope="module")
def edge_answers(light_venv: Path, registered: SimpleNamespace) -> list[dict[str, Any]]:
    """The edge server (from the light venv) on the champion's bundle, asked about the golden inputs."""
    port = free_port()
    bundle = registered.summary["export"]["bundle_tar"]
    cmd = [str(light_venv / "bin" / "transflow-edge"), "serve", "--bundle", bundle, "--port", str(port)]
    env = light_env(registered, light_venv)
    with serving(cmd, f"http://127.0.0.1:{port}/readyz", env, registered.tmp / "edge.log"):
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": registered.texts}, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()["predictions"]


def assert_same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)
        assert g["scores"] == pytest.approx(w["scores"], abs=1e-5)


def test_pyfunc_load_model_in_a_venv_without_torch_answers_as_the_edge_server(
    light_venv: Path, registered: SimpleNamespace, edge_answers: list[dict[str, Any]]
) -> None:
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
        "out = model.predict(pd.DataFrame({'text': json.loads(sys.argv[1])}))\n"
        "heavy = [m for m in ('torch', 'transformers', 'prefect') if m in sys.modules]\n"
        "print(json.dumps({'predictions': out, 'heavy': heavy}))\n"
    )
    proc = subprocess.run(
        [str(light_venv / "bin" / "python"), "-c", script, json.dumps(registered.texts)],
        capture_output=True, text=True, timeout=300, env=light_env(registered, light_venv), cwd=registered.tmp,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert_same(result["predictions"], edge_answers)


def test_mlflow_models_serve_answers_invocations_as_the_edge_server(
    light_venv: Path, registered: SimpleNamespace, edge_answers: list[dict[str, Any]]
) -> None:
    port = free_port()
    cmd = [
        str(light_venv / "bin" / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
        "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with serving(cmd, f"{url}/ping", light_env(registered, light_venv), registered.tmp / "serve.log"):
        table = {"columns": ["text"], "data": [[t] for t in registered.texts]}
        reply = httpx.post(f"{url}/invocations", json={"dataframe_split": table}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert_same(reply.json()["predictions"], edge_answers)


class serving:
    """Start a server process in its own session, wait until `ready_url` answers 200, stop it by PID."""

    def __init__(self, cmd: list[str], ready_url: str, env: dict[str, str], log: Path, timeout: float = 120) -> None:
        self.cmd, self.ready_url, self.env, self.log, self.timeout = cmd, ready_url, env, log, timeout

    def __enter__(self) -> serving:
        self.out = self.log.open("wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.log.parent)  # fmt: skip
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                raise AssertionError(f"{self.cmd[0]} exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise AssertionError(f"{self.ready_url} not ready in {self.timeout}s: {self.log.read_text()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.out.close()


# --- Prefect: artifacts and run names, read back from the server -------------------------------------------


def artifacts(api: str, key: str) -> list[dict[str, Any]]:
    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC"}
    reply = httpx.post(f"{api}/artifacts/filter", json=body, timeout=30)
    reply.raise_for_status()
    return reply.json()


def run_name(api: str, flow_run_id: str) -> str:
    return httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30).json()["name"]


def test_retrain_publishes_its_summary_table_and_links_to_mlflow(prefect_api: str, registered: SimpleNamespace) -> None:
    (table,) = artifacts(prefect_api, f"retrain-{MODEL}")
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert table["type"] == "table" and [r["model"] for r in rows] == ["stage full"]
    assert rows[0]["test accuracy"] == pytest.approx(registered.summary["test"]["accuracy"], abs=1e-4)
    assert run_name(prefect_api, table["flow_run_id"]).startswith("retrain/smoke-text/")
    (run_link,) = artifacts(prefect_api, f"mlflow-run-{MODEL}")
    (version_link,) = artifacts(prefect_api, f"mlflow-version-{MODEL}")
    assert registered.summary["run_id"] in run_link["data"]
    assert version_link["data"] == f"[{MODEL} v1](models:/{MODEL}/1)"  # sqlite, no `transflow ui`: the model URI
    assert run_link["flow_run_id"] == table["flow_run_id"] == version_link["flow_run_id"]


def test_promotion_and_deploy_outcomes_are_markdown_keyed_per_model(
    prefect_api: str, registered: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import app
    from flows.cli_errors import run_cli

    (decision,) = artifacts(prefect_api, f"promotion-{MODEL}")
    assert decision["type"] == "markdown" and f"# {MODEL}: PROMOTED" in decision["data"]
    assert run_name(prefect_api, decision["flow_run_id"]) == f"promote/{MODEL}/v1"
    drop = registered.tmp / "drop"
    drop.mkdir()
    args = ["deploy", f"{MODEL}@champion", "--target", f"dir://{drop}", "--tracking-uri", registered.uri, "--json"]
    assert run_cli(app, args) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["status"] == "deployed" and outcome["version"] == "1"
    failing = ["deploy", f"{MODEL}@champion", "--target", "http://127.0.0.1:9", "--tracking-uri", registered.uri]
    os.environ["TRANSFLOW_TEST_TOKEN"] = "t" * 32
    try:
        assert run_cli(app, [*failing, "--token-env", "TRANSFLOW_TEST_TOKEN", "--wait", "1"]) == 1
    finally:
        del os.environ["TRANSFLOW_TEST_TOKEN"]
    failed, deployed = artifacts(prefect_api, f"deploy-{MODEL}")  # newest first: the history of one key
    assert "# pyfunc-tweets v1: failed" in failed["data"] and "# pyfunc-tweets v1: deployed" in deployed["data"]
    assert run_name(prefect_api, deployed["flow_run_id"]) == f"deploy/{MODEL}@champion"


# --- the CLI: every command's failure path is one line and a documented exit code -----------------------------


def cli_cases(r: SimpleNamespace) -> list[tuple[list[str], int, str]]:
    smoke, uri = SMOKE, ["--tracking-uri", r.uri]
    return [
        (["retrain", "-c", str(r.tmp / "missing.yaml")], 2, "missing.yaml"),
        (["retrain", "-c", smoke, "--set", "training.nope=1"], 2, "nope"),
        (["retrain", "-c", smoke, "--set", f"data.dvc_file={r.tmp / 'none.dvc'}"], 2, "none.dvc"),
        (["retrain", "-c", smoke, f"--set=data.dvc_file={r.tmp / 'changed' / 'data.dvc'}"], 1, "does not match"),
        (["export", f"{MODEL}@nope", "-o", str(r.tmp / "x"), *uri], 2, "nope"),
        (["export", f"{MODEL}/99", "-o", str(r.tmp / "x"), *uri], 2, "99"),
        (["deploy", f"{MODEL}@champion"], 2, "no targets"),
        (["deploy", f"{MODEL}@nope", "--target", f"dir://{r.tmp}", *uri], 2, "nope"),
        (["deploy", f"{MODEL}@champion", "--target", "ftp://x", *uri], 2, "ftp://x"),
        (["promote", "no-such-model", *uri], 2, "no-such-model"),
        (["rollback", MODEL, *uri], 2, MODEL),  # nothing to roll back to
        (["lineage", "no-such-model@champion", *uri], 2, "no-such-model"),
        (["lineage", "not a ref", *uri], 2, "not a ref"),
        (["data", "verify", "--dvc-file", str(r.tmp / "none.dvc")], 2, "none.dvc"),
        (["data", "status", "--dvc-file", str(r.tmp / "none.dvc")], 2, "none.dvc"),
        (["schedule", "pause", "no-such-deployment"], 2, "no-such-deployment"),
        (["report", f"{MODEL}@nope", *uri], 2, "nope"),
        (["promote"], 2, "Missing argument"),
        (["retrain", "--bogus"], 2, "--bogus"),
    ]


def test_each_commands_failure_is_one_line_with_its_exit_code(
    registered: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from flows.cli import app
    from flows.cli_errors import run_cli

    changed = registered.tmp / "changed"  # the DVC repo, one byte of its pinned data changed since `dvc add`
    shutil.copytree(registered.repo, changed, symlinks=True)
    train = changed / "data" / "train.jsonl"
    train.chmod(0o644)
    train.write_text(train.read_text().replace("a", "b", 1))
    capsys.readouterr()
    failures = []
    for args, code, named in cli_cases(registered):
        got = run_cli(app, args)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        if got != code or len(errors) != 1 or named not in errors[0] or "Traceback" in err:
            failures.append(f"{args}: exit {got} (want {code}), error lines {errors}, traceback {'Traceback' in err}")
    assert not failures, "\n".join(failures)
    assert run_cli(app, ["--version"]) == 0
    assert capsys.readouterr().out.startswith("transflow ")


def test_reexport_refreshes_the_registered_pyfunc(
    registered: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    """`transflow export` of a pyfunc version rebuilds the bundle and the version's MLflow model with it."""
    import hashlib

    from flows.cli import app
    from flows.cli_errors import run_cli

    args = ["export", f"{MODEL}@champion", "-o", str(registered.tmp / "reexport"), "--tracking-uri", registered.uri]
    assert run_cli(app, [*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    local = registered.tracker.download(f"models:/{MODEL}@champion", registered.tmp / "reexported-model")
    manifest = (local / "artifacts" / "bundle" / "manifest.json").read_bytes()
    assert hashlib.sha256(manifest).hexdigest() == report["bundle_sha256"]
