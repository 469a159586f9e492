"""A real `mlflow server` for tests: started through `mlflow/start-server.sh` (so the documented way is the
tested way) on a free loopback port, with its sqlite store and artifacts in a temp dir; stopped by PID.

The script `exec`s mlflow, and mlflow spawns uvicorn: the server runs in its own session, so stopping
sends SIGTERM to that process group (ours, by the PID we started), waits, and only then escalates.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "mlflow" / "start-server.sh"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MlflowServer:
    """One server over one store; `stop()` then `start()` brings the same store back on the same port."""

    root: Path
    port: int = field(default_factory=free_port)
    workers: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    script_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def command(self) -> list[str]:
        return [
            "bash",
            str(SCRIPT),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            *self.script_args,
        ]

    def start(self, timeout: float = 120) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_HOST": "127.0.0.1", **self.extra_env}
        env.pop("MLFLOW_TRACKING_URI", None)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not ready on {self.url} after {timeout}s:\n{self.tail()}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the server's process group, wait; SIGKILL only if it does not go."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # uvicorn's workers may outlive the parent by a moment
            os.killpg(proc.pid, signal.SIGKILL)
        self._wait_port_closed()

    def _wait_port_closed(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@contextlib.contextmanager
def running_server(root: Path, **kwargs: object) -> Iterator[MlflowServer]:
    server = MlflowServer(root, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
