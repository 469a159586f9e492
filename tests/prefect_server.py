"""A real `prefect server start` and real `prefect worker start` as subprocesses, for integration tests.

The server listens on a free loopback port with its own PREFECT_HOME (and so its own sqlite database) in a
temp dir; its scheduler is off, so the schedules in prefect.yaml never start a run during a test. Each
process gets its own session, and is stopped by PID: terminate, wait, then kill its process group if it is
still there (a worker shuts down slowly).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Service:
    """A started subprocess and the file its output goes to."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for a Prefect subprocess: own home, no telemetry, the venv's tools first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env | extra


def spawn(name: str, args: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> Service:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it never touches anything else
        )
    return Service(name, proc, log)


def start_server(home: Path, timeout: float = 120) -> tuple[Service, str]:
    """`prefect server start` on a free loopback port; returns it and its API URL once /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server = spawn(
        "prefect server",
        ["server", "start", "--host", "127.0.0.1", "--port", str(port)],
        prefect_env(home),
        home / "server.log",
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.proc.returncode}:\n{server.tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(server)
    raise RuntimeError(f"prefect server not healthy after {timeout:.0f}s:\n{server.tail()}")


def start_worker(home: Path, api_url: str, pool: str, *extra: str) -> Service:
    """`prefect worker start --pool <pool>` against the test server, run from the repository root."""
    return spawn(
        f"prefect worker ({pool})",
        ["worker", "start", "--pool", pool, "--name", f"test-{pool}-{os.getpid()}", *extra],
        prefect_env(home, api_url),
        home / f"worker-{pool}.log",
    )


def flush_to_server(timeout: float = 120) -> None:
    """Send this process's buffered run logs and events now, while the server it ran against still listens.

    Draining also stops Prefect's log and events workers, so the next flow run in this process starts new ones
    for whatever API it is then given. A worker left running would keep the address of a server that a module
    fixture has since stopped: every later event of the session fails against it, slowly, one after another,
    and the interpreter's exit then waits for all of them (CI lost 45 minutes that way).
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout)
    EventsWorker.drain_all(timeout=timeout)


@contextlib.contextmanager
def api_for_this_process(home: Path) -> Iterator[str]:
    """A real Prefect server that this test process's flows and clients report to (a module fixture's body);
    flushed while it still listens, then stopped."""
    import prefect.main  # noqa: F401  (sets up Prefect's log handlers on pytest's stderr, not a CliRunner stream)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server, url = start_server(home)
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
            flush_to_server()
    finally:
        stop(server)


def stop(service: Service, timeout: float = 30) -> int | None:
    """Terminate by PID and wait; kill the process group (its flow-run children too) if it does not exit."""
    proc = service.proc
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group we created for it; leftovers only
    if proc.poll() is None:
        proc.wait(10)
    return proc.returncode
