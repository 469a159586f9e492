"""`transflow ui`: a persistent local Prefect server and the MLflow UI on loopback, state beside the project.

    .transflow/ui/prefect/   PREFECT_HOME of the server (its sqlite database: flow runs, artifacts)
    .transflow/ui/ui.json    the two URLs and PIDs; while the Prefect server in it answers, every later
                             `transflow` command reports there (PREFECT_API_URL) instead of starting Prefect's
                             temporary server (10-25 s per command on a 2-core machine)
    .transflow/ui/*.log      the servers' output

The MLflow UI serves the project's own store (`mlflow/store/`, what the pipeline writes by default), so runs,
models and the registry appear as they are written; commands keep writing to the store directly. Both servers
run in their own sessions and outlive this command; `transflow ui --stop` stops them by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import typer

STATE_DIR = Path(".transflow") / "ui"
STATE_FILE = STATE_DIR / "ui.json"
HEALTH_TIMEOUT_S = 180.0  # a first start migrates Prefect's database: slow on a busy 2-core machine


def ui_cmd(
    prefect_port: int = typer.Option(4200, help="Port of the Prefect server (UI and API)."),
    mlflow_port: int = typer.Option(5000, help="Port of the MLflow UI."),
    stop: bool = typer.Option(False, "--stop", help="Stop the servers a previous `transflow ui` started."),
    json_out: bool = typer.Option(False, "--json", help="Print the URLs and PIDs as JSON."),
) -> None:
    """Start (or find running) the local Prefect server and MLflow UI on 127.0.0.1 and print both URLs.

    While it runs, every transflow command uses this Prefect server (no temporary server per command)."""
    from flows.cli_errors import EXIT_BAD_INPUT, fail

    if stop:
        stopped = stop_ui()
        typer.echo(f"stopped {', '.join(stopped)}" if stopped else "no transflow ui running")
        return
    state = running_state() or {}
    if not state:
        for port in (prefect_port, mlflow_port):
            if port_busy(port):
                fail(f"port {port} on 127.0.0.1 is in use: choose --prefect-port/--mlflow-port", EXIT_BAD_INPUT)
        state = start_ui(prefect_port, mlflow_port)
    if json_out:
        typer.echo(json.dumps(state, indent=2))
        return
    typer.echo(f"Prefect UI  {state['prefect_ui']}   (API {state['prefect_api']})")
    typer.echo(f"MLflow UI   {state['mlflow_ui']}   (store {state['mlflow_store']})")
    typer.echo(f"state in {STATE_DIR}/; later transflow commands report to this Prefect server; "
               "`transflow ui --stop` stops both")  # fmt: skip


def start_ui(prefect_port: int, mlflow_port: int) -> dict[str, object]:
    from flows.cli_errors import EXIT_REFUSED, fail
    from tasks.tracking import DEFAULT_STORE

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    DEFAULT_STORE.mkdir(parents=True, exist_ok=True)
    home = (STATE_DIR / "prefect").resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    bin_dir = Path(sys.executable).parent
    prefect = spawn(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        env, STATE_DIR / "prefect.log",
    )  # fmt: skip
    store = DEFAULT_STORE.resolve()
    mlflow = spawn(
        [
            str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--default-artifact-root",
            (store / "artifacts").as_uri(),
        ],
        # no job runner (GenAI judge jobs, ~8 processes): nothing here uses it
        {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        STATE_DIR / "mlflow.log",
    )  # fmt: skip
    state: dict[str, object] = {
        "prefect_api": f"http://127.0.0.1:{prefect_port}/api",
        "prefect_ui": f"http://127.0.0.1:{prefect_port}",
        "mlflow_ui": f"http://127.0.0.1:{mlflow_port}",
        "mlflow_store": f"sqlite:///{store / 'mlflow.db'}",
        "prefect_pid": prefect.pid,
        "mlflow_pid": mlflow.pid,
        "prefect_home": str(home),
    }
    STATE_FILE.write_text(json.dumps(state, indent=2) + "\n")
    for name, proc, url in (
        ("Prefect server", prefect, f"{state['prefect_api']}/health"),
        ("MLflow UI", mlflow, f"{state['mlflow_ui']}/health"),
    ):
        if not wait_healthy(proc, url):
            stop_ui()
            fail(f"{name} did not start (see {STATE_DIR}/{'prefect' if 'Prefect' in name else 'mlflow'}.log)",
                 EXIT_REFUSED)  # fmt: skip
    return state


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own handle; ours closes at once
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        time.sleep(0.5)
    return False


def port_busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_state(state_file: Path = STATE_FILE) -> dict[str, object] | None:
    """The state of a `transflow ui` whose Prefect server process is still alive, else None."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and alive(state.get("prefect_pid")) else None


def use_local_ui(state_file: Path = STATE_FILE) -> str | None:
    """Point Prefect at a running `transflow ui` server unless PREFECT_API_URL is already set; its URL or None.
    Called by the CLI entry point only (importing flows.cli changes no environment)."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    state = running_state(state_file)
    if state is None:
        return None
    os.environ["PREFECT_API_URL"] = str(state["prefect_api"])
    return str(state["prefect_api"])


def stop_ui() -> list[str]:
    """SIGTERM each server's process group (we started them as group leaders), wait, then SIGKILL leftovers."""
    try:
        state = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return []
    stopped = []
    for name in ("prefect", "mlflow"):
        pid = state.get(f"{name}_pid")
        if not alive(pid):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid), signal.SIGTERM)
        deadline = time.monotonic() + 20
        while alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(pid), os.WNOHANG)
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid), signal.SIGKILL)
        stopped.append(f"{name} (pid {pid})")
    STATE_FILE.unlink(missing_ok=True)
    return stopped
