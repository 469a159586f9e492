"""A flow's MLflow parent run, ended for what really happened: FINISHED, FAILED, or KILLED (SIGTERM, Ctrl-C),
and never left RUNNING by a process that died: the rerun of a killed flow closes the run the dead process left.

The work directory of a config on a data version holds `active-run.json` (written atomically) naming the run
in progress, its process and host. A rerun that finds it, for a run still RUNNING whose process is gone, marks
that run KILLED with the tag `transflow.superseded_by` = the new run (which gets `transflow.resumes_run`).
A marker whose process is still alive on this host is left alone: that is another run in progress.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from models.durable import read_json, write_json
from tasks.tracking import Tracker

MARKER = "active-run.json"
SUPERSEDED_TAG, RESUMES_TAG = "transflow.superseded_by", "transflow.resumes_run"


class Terminated(BaseException):
    """SIGTERM arrived (a cancelled deployment, `kill`, a stopping container): unwind and end the run KILLED."""


@contextlib.contextmanager
def owned_run(tracker: Tracker, experiment: str, name: str, tags: dict[str, str], workdir: Path) -> Iterator[str]:
    """Start the parent run (closing a dead predecessor's), yield its id, end it FINISHED / FAILED / KILLED."""
    marker = workdir / MARKER
    stale = read_json(marker, "active-run marker")
    run_id = tracker.start_run(experiment, name, tags)
    with contextlib.suppress(Exception):  # bookkeeping of an older run must never stop this one
        close_stale(tracker, stale, run_id)
    write_json(marker, {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname()})
    restore = _on_sigterm()
    try:
        yield run_id
    except (Terminated, KeyboardInterrupt):
        with contextlib.suppress(Exception):
            tracker.end_run(run_id, "KILLED")
        raise
    except BaseException:
        with contextlib.suppress(Exception):  # the tracking server may be what failed: keep the first error
            tracker.end_run(run_id, "FAILED")
        raise
    else:
        tracker.end_run(run_id)
    finally:
        restore()
        if (read_json(marker) or {}).get("run_id") == run_id:
            marker.unlink(missing_ok=True)


def close_stale(tracker: Tracker, stale: Any, run_id: str) -> str | None:
    """Mark the run a dead process left RUNNING as KILLED, pointing at `run_id`; returns its id if it did."""
    if not isinstance(stale, dict) or not stale.get("run_id") or _alive(stale):
        return None
    old = str(stale["run_id"])
    if old == run_id or tracker.run_status(old) != "RUNNING":
        return None
    tracker.set_tags(old, {SUPERSEDED_TAG: run_id})
    tracker.end_run(old, "KILLED")
    tracker.set_tags(run_id, {RESUMES_TAG: old})
    print(f"run {old} of a killed process marked KILLED (superseded by {run_id})")
    return old


def _alive(stale: dict[str, Any]) -> bool:
    """Whether the marker's process still runs here (another host: assume it does, we cannot tell)."""
    if stale.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(stale.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return int(stale.get("pid", 0)) > 0 and int(stale["pid"]) != os.getpid()


def _on_sigterm() -> Any:
    """Turn SIGTERM into `Terminated` while the run is open (main thread only: where Python delivers signals)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    return lambda: signal.signal(signal.SIGTERM, previous)
