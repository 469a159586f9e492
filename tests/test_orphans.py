"""A killed flow leaves nothing running: the temporary Prefect server of a `transflow` command is started through a
guard (flows/temp_server.py) that stops it when the command dies, SIGKILL included. The guard is tested on its own
with a stand-in server (seconds), then with the real command and the real server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows import temp_server
from tests.conftest import ROOT

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
# a stand-in for the command: starts the guard around `argv[1:]`, prints the guard's PID, then waits to be killed
COMMAND = (
    "import os, subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-m', 'flows.temp_server', '--parent', str(os.getpid()), '--', "
    "*sys.argv[1:]], start_new_session=True)\n"
    "print(g.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def env_without_api(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return env | {"PYTHONPATH": str(ROOT)} | extra


def guarded_sleeper() -> tuple[subprocess.Popen[str], psutil.Process, psutil.Process]:
    """The stand-in command, its guard and the guard's child (the 'server'), once all three run."""
    command = subprocess.Popen([sys.executable, "-c", COMMAND, *SLEEPER], env=env_without_api(),
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert command.stdout is not None
    guard = psutil.Process(int(command.stdout.readline()))
    deadline = time.monotonic() + 20
    while not guard.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (server,) = guard.children()
    return command, guard, server


def gone(procs: list[psutil.Process], timeout: float) -> tuple[list[psutil.Process], float]:
    """The processes still alive after `timeout` s, and how long the others took to go."""
    started = time.monotonic()
    while (alive := [p for p in procs if running(p)]) and time.monotonic() - started < timeout:
        time.sleep(0.05)
    return alive, time.monotonic() - started


def running(p: psutil.Process) -> bool:
    """Alive and not a zombie (an exited child its parent has not reaped yet holds no memory and no port)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def test_guard_stops_its_server_when_the_command_is_sigkilled() -> None:
    command, guard, server = guarded_sleeper()
    try:
        command.kill()
        command.wait()
        alive, took = gone([guard, server], timeout=10)
        assert alive == [], f"left running after the command's SIGKILL: {alive}"
        assert took < 10
    finally:
        kill_all([guard, server])


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only; elsewhere only the poll")
def test_server_dies_with_a_sigkilled_guard() -> None:
    command, guard, server = guarded_sleeper()
    try:
        guard.kill()
        alive, _ = gone([server], timeout=5)
        assert alive == [], "the server outlived its guard"
    finally:
        command.kill()
        command.wait()
        kill_all([guard, server])


def test_guard_sigterm_stops_the_server_and_a_failed_server_ends_the_guard_with_its_code() -> None:
    command, guard, server = guarded_sleeper()
    try:
        guard.terminate()  # what the command's atexit hook does
        alive, _ = gone([guard, server], timeout=10)
        assert alive == []
    finally:
        command.kill()
        command.wait()
        kill_all([guard, server])
    port_taken = [sys.executable, "-c", "raise SystemExit(3)"]  # uvicorn's code when its port is taken
    ran = subprocess.run([sys.executable, "-m", "flows.temp_server", "--parent", str(os.getpid()), "--", *port_taken],
                         env=env_without_api(), timeout=30)  # fmt: skip
    assert ran.returncode == temp_server.PORT_IN_USE


def test_no_server_unless_the_console_script_armed_it_or_without_a_configured_api(tmp_path: Path) -> None:
    assert temp_server.ensure_prefect_api() is None  # in-process (a test, a notebook): Prefect's own behaviour
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('active = "remote"\n[profiles.remote]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    probe = "from flows import temp_server as t; t.enable(); print(t.ensure_prefect_api())"
    ran = subprocess.run([sys.executable, "-c", probe], env=env_without_api(PREFECT_PROFILES_PATH=str(profiles)),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip() == "None", "an API in the active profile: no temporary server"


@pytest.mark.slow
@pytest.mark.integration
def test_sigkilled_retrain_leaves_no_process_behind(tiny_bert_dir: Path, tweets_repo: Path, tmp_path: Path) -> None:
    """The real command (`python -m flows.cli`, what the `transflow` script runs) on the smoke config, with no
    Prefect API configured: SIGKILLed once its temporary server answers, nothing it started survives."""
    out = tmp_path / "runs"
    overrides = [
        f"backbone.uri={tiny_bert_dir}", f"data.path={tweets_repo / 'data'}",
        f"data.dvc_file={tweets_repo / 'data.dvc'}", f"output_dir={out}",
        f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "data.train_limit=160", "stages.0.epochs=50",
        "export.enabled=false", "evaluation.baselines=false",
    ]  # fmt: skip
    sets = [arg for o in overrides for arg in ("--set", o)]
    env = env_without_api(PREFECT_HOME=str(tmp_path / "prefect"), TOKENIZERS_PARALLELISM="false")
    log = tmp_path / "retrain.log"
    with log.open("w") as sink:
        command = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "retrain", "-c", str(ROOT / "configs/smoke-text.yaml"), *sets],
            env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and command.poll() is None and "temporary server" not in log.read_text():
            time.sleep(0.1)
        assert command.poll() is None, log.read_text()[-3000:]
        assert "temporary server http://127.0.0.1:" in log.read_text(), "the server did not start in time"
        started = psutil.Process(command.pid).children(recursive=True)
        cmdlines = [" ".join(p.cmdline()) for p in started]
        assert any("flows.temp_server" in c for c in cmdlines), cmdlines
        assert any("uvicorn" in c and "prefect.server.api.server" in c for c in cmdlines), cmdlines
        os.kill(command.pid, signal.SIGKILL)
        command.wait()
        alive, took = gone(started, timeout=15)
        assert alive == [], f"left running after the SIGKILL: {[p.cmdline() for p in alive]}"
        print(f"\n{len(started)} processes started by the command, all gone {took:.1f} s after its SIGKILL")
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
        kill_all(started)


@pytest.mark.slow
@pytest.mark.integration
def test_what_the_guard_prevents_prefects_own_temporary_server_outlives_a_sigkill(tmp_path: Path) -> None:
    """The failure this guards against, so the test above is known to catch it: a process that let Prefect start
    its temporary server, SIGKILLed, leaves the server running."""
    start = "from prefect.server.api.server import SubprocessASGIServer as S; S().start(); import time; time.sleep(120)"
    command = subprocess.Popen([sys.executable, "-c", start], env=env_without_api(PREFECT_HOME=str(tmp_path)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    server: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not server:
            server = [p for p in psutil.Process(command.pid).children() if "uvicorn" in " ".join(p.cmdline())]
            time.sleep(0.1)
        assert server, "Prefect started no server"
        command.kill()
        command.wait()
        alive, _ = gone(server, timeout=3)
        assert alive == server, "Prefect's own server now dies with its process: the guard may be unnecessary"
    finally:
        command.kill()
        command.wait()
        kill_all(server)


def test_every_command_that_imports_a_flow_starts_the_guarded_server_first() -> None:
    """A flow command that forgets `ensure_prefect_api()` falls back to Prefect's own, unguarded server."""
    import ast

    flow_modules = {f"flows.{p.stem}" for p in (ROOT / "flows").glob("*.py") if "@flow(" in p.read_text()}
    checked = []
    for path in sorted((ROOT / "flows").glob("cli*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            nodes = list(ast.walk(fn))
            ensured = [
                n.lineno for n in nodes if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "ensure_prefect_api"
            ]
            for node in nodes:
                if isinstance(node, ast.ImportFrom) and node.module in flow_modules:
                    where = f"{path.name}:{node.lineno} {fn.name}"
                    assert ensured and min(ensured) < node.lineno, f"{where} imports {node.module} before ensuring"
                    checked.append(fn.name)
    # retrain, pretrain, experiment, export, deploy, promote, rollback, recover, report, watch-drift
    assert len(checked) >= 10, checked
