"""`transflow ui` hands its Prefect server to later commands only while that server's process is alive; the
errors module maps each error class to its documented exit code and one line. (The servers themselves are
started for real in the benchmark of docs/ and by tests/test_ecosystem.py's Prefect server.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli_errors import EXIT_BAD_INPUT, EXIT_REFUSED, exit_code_for, one_line
from flows.cli_ui import running_state, use_local_ui


def write_state(path: Path, pid: int) -> Path:
    path.write_text(json.dumps({"prefect_api": "http://127.0.0.1:4999/api", "prefect_pid": pid}))
    return path


def test_a_live_ui_server_becomes_prefect_api_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first: monkeypatch records only what it changes, and use_local_ui sets the variable itself; without
    # this it would leak into every later test (their subprocesses then talk to a server that is not there)
    monkeypatch.setenv("PREFECT_API_URL", "unset-by-this-test")
    monkeypatch.delenv("PREFECT_API_URL")
    state = write_state(tmp_path / "ui.json", os.getpid())
    assert use_local_ui(state) == "http://127.0.0.1:4999/api"
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4999/api"


def test_a_dead_or_overridden_ui_server_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # setenv first: monkeypatch records only what it changes, and use_local_ui sets the variable itself; without
    # this it would leak into every later test (their subprocesses then talk to a server that is not there)
    monkeypatch.setenv("PREFECT_API_URL", "unset-by-this-test")
    monkeypatch.delenv("PREFECT_API_URL")
    state = write_state(tmp_path / "ui.json", gone.pid)
    assert running_state(state) is None and use_local_ui(state) is None
    assert "PREFECT_API_URL" not in os.environ
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere/api")  # the user's own setting wins
    assert use_local_ui(write_state(state, os.getpid())) is None
    (tmp_path / "bad.json").write_text("{not json")
    assert running_state(tmp_path / "bad.json") is None


def test_error_classes_map_to_documented_exit_codes() -> None:
    from flows.deploy import DeployError, DeployInputError
    from runconfig import ConfigError
    from tasks.data import DataError, DataNotFound

    assert exit_code_for(ConfigError("x")) == EXIT_BAD_INPUT
    assert exit_code_for(DataNotFound("x")) == EXIT_BAD_INPUT
    assert exit_code_for(DataError("x")) == EXIT_REFUSED
    assert exit_code_for(DeployInputError("x")) == EXIT_BAD_INPUT
    assert exit_code_for(DeployError("x")) == EXIT_REFUSED
    assert exit_code_for(KeyError("bug")) is None  # a bug keeps its traceback
    assert one_line("no match:\n  a: missing\n\n  b: changed") == "no match:; a: missing; b: changed"
    assert len(one_line("x" * 5000)) == 600
