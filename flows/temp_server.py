"""Prefect's temporary API server for the flow commands, started through a guard so a killed command leaves
nothing running.

With no Prefect API configured, Prefect starts a temporary server itself (a uvicorn subprocess) and stops it only
from an atexit hook, so a SIGKILLed `transflow` orphaned it (~200 MB, found 30 minutes later). Instead, a flow
command (`transflow retrain`, `promote`, …: the commands that import a flow) starts the same server here:

    transflow …             the command; waits for /api/health, sets PREFECT_API_URL for itself,
     └─ python -m flows.temp_server --parent PID -- python -m uvicorn …   the guard (standard library only)
         └─ python -m uvicorn … prefect.server.api.server:create_app       the server, as Prefect runs it

- The guard checks every 0.5 s that its parent is still the command; when the command is gone (SIGKILL included)
  it stops the server (SIGTERM, 5 s, SIGKILL) and exits. It runs in its own session: a Ctrl-C reaches only the
  command, which still reports its run's final state to the server before its atexit hook stops the guard.
- On Linux the server also gets PR_SET_PDEATHSIG=SIGKILL, tied to the guard: the guard is single-threaded and
  that thread lives as long as the guard, so this fires only if the guard itself is killed. (Never set it on a
  child of the command: it fires when the *thread* that forked exits, and Prefect forks from worker threads.)
- The command never imports Prefect's server code, which Prefect's own path does (~100 MB in the command).

Armed only by the console script (`flows.cli.main` calls `enable()`): a test or a notebook that calls a command
in-process keeps Prefect's own behaviour, and its environment is left alone.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

POLL_S = 0.5  # how often the guard checks its parent
STOP_WAIT_S = 5.0  # SIGTERM → SIGKILL, as Prefect's own stop()
PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind (Prefect retries another port on it too)
PR_SET_PDEATHSIG = 1

_enabled = False


def enable() -> None:
    """Mark this process as the `transflow` console script: flow commands may start the guarded server."""
    global _enabled
    _enabled = True


def ensure_prefect_api() -> str | None:
    """Start the guarded temporary server when this is the console script and no Prefect API is configured
    (no PREFECT_API_URL in the environment, the profile, .env or prefect.toml, as Prefect resolves it), point
    PREFECT_API_URL at it, and stop it at exit. Returns the URL it set, else None. Call before running a flow."""
    if not _enabled or os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None  # a configured server (profile, Cloud), or the user turned temporary servers off
    server = start_server(float(settings.server.ephemeral.startup_timeout_seconds))
    atexit.register(server.stop)  # registered before Prefect's exit hooks: runs after they drained to the server
    os.environ["PREFECT_API_URL"] = server.api_url
    os.environ.setdefault("PREFECT_UI_URL", "")  # no "View at" links: the UI is off and the server ends with us
    print(f"Prefect: temporary server {server.api_url} (ready in {server.started_s} s; it stops with this command)",
          file=sys.stderr)  # fmt: skip
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()  # Prefect read its settings when imported (above)
    return server.api_url


@dataclass
class TemporaryServer:
    guard: subprocess.Popen[bytes]
    port: int
    started_s: float  # seconds from spawning the guard to a healthy server

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def stop(self) -> None:
        """SIGTERM the guard (it stops the server, then exits); SIGKILL it if it hangs (the server then gets its
        death signal on Linux)."""
        if self.guard.poll() is None:
            self.guard.terminate()
            try:
                self.guard.wait(timeout=STOP_WAIT_S + 5)
            except subprocess.TimeoutExpired:
                self.guard.kill()
                self.guard.wait()


def server_command(port: int) -> list[str]:
    """The command Prefect's SubprocessASGIServer runs (prefect/server/api/server.py), on `port`."""
    return [
        sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip


def start_server(timeout_s: float) -> TemporaryServer:
    """Spawn the guard (which spawns the server) and wait until /api/health answers; RuntimeError if it does not
    within `timeout_s` (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS) or the server exits."""
    env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    started = time.monotonic()
    deadline = started + timeout_s
    for _ in range(5):  # another port when the chosen one was taken meanwhile
        port = free_port()
        guard_cmd = [sys.executable, "-m", "flows.temp_server", "--parent", str(os.getpid()), "--"]
        guard = subprocess.Popen(
            guard_cmd + server_command(port), env=env, stdin=subprocess.DEVNULL, stdout=2, start_new_session=True
        )
        server = TemporaryServer(guard, port, 0.0)
        while (code := guard.poll()) is None and time.monotonic() < deadline:
            if healthy(f"{server.api_url}/health"):
                server.started_s = round(time.monotonic() - started, 2)
                return server
            time.sleep(0.1)
        if code == PORT_IN_USE:
            continue
        server.stop()
        why = f"it exited with code {code}" if code is not None else f"no answer within {timeout_s:.0f} s"
        raise RuntimeError(
            f"Prefect's temporary server did not start ({why}): raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
            ", or run `transflow ui` (a persistent server) or set PREFECT_API_URL"
        )
    raise RuntimeError("Prefect's temporary server found no free port on 127.0.0.1 (5 tries)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:  # refused while starting, a timeout, an HTTP error
        return False


# ---- the guard: `python -m flows.temp_server --parent PID -- COMMAND…` (standard library only) ----


def guard(parent: int, command: list[str]) -> int:
    """Run `command` while process `parent` lives; stop it when `parent` dies or on SIGTERM. Exit code: the
    server's when it exits by itself (3: port taken), else 0."""
    if os.getppid() != parent:
        return 0  # the command died before we started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = subprocess.Popen(command, preexec_fn=_death_signal(os.getpid()) if sys.platform == "linux" else None)
    try:
        while (code := server.poll()) is None:
            if os.getppid() != parent:  # re-parented: the command is gone
                return 0
            time.sleep(POLL_S)
        return code
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop(server)


def _death_signal(guard_pid: int):  # type: ignore[no-untyped-def]
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls into it

    def in_child() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != guard_pid:  # the guard died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return in_child


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "--parent" or argv[2] != "--":
        print("usage: python -m flows.temp_server --parent PID -- COMMAND…", file=sys.stderr)
        return 2
    return guard(int(argv[1]), argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
