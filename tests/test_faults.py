"""Faults during a run: the MLflow tracking server goes away mid-training. The flow fails clearly, nothing
is registered, and a re-run once the server is back resumes the finished work and registers exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tests.mlflow_server import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.integration]
WORKER = "import sys\nfrom flows.retrain import retrain\nretrain(sys.argv[1], sys.argv[2:])\n"


def test_tracking_server_down_mid_run_then_back(tiny_bert_dir: Path, tweets_repo: Path, tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        overrides = [
            f"backbone.uri={tiny_bert_dir}",
            f"data.path={tweets_repo / 'data'}",
            f"data.dvc_file={tweets_repo / 'data.dvc'}",
            f"output_dir={tmp_path / 'runs'}",
            f"registry.tracking_uri={server.url}",
            "data.train_limit=200",
            "stages.1.epochs=4",
            "evaluation.baselines=false",
        ]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        }
        cmd = [sys.executable, "-c", WORKER, str(ROOT / "configs/smoke-text.yaml"), *overrides]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and not list((tmp_path / "runs").glob("*/stages/probe/done.json")):
            time.sleep(0.1)
        server.stop()
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0, "the flow must fail while the tracking server is gone"
        assert "ConnectionError" in output or "Connection refused" in output or "MlflowException" in output, output[
            -3000:
        ]

        server.start()
        client = MlflowClient(server.url)
        assert client.search_model_versions("name='smoke-text'") == [], "nothing half-registered"
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
        versions = client.search_model_versions("name='smoke-text'")
        assert len(versions) == 1 and versions[0].tags["exported"] == "true"
        summary = next((tmp_path / "runs").glob("*/run-summary.json")).read_text()
        assert '"resumed": true' in summary, "the probe finished before the outage is not trained again"
    finally:
        server.stop()
