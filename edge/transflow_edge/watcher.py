"""The watched folder of air-gapped sites: the newest `*.tar.gz` dropped there is installed."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transflow_edge.bundle import BundleError

log = logging.getLogger("transflow.edge")


class DirectoryWatcher:
    """Install the newest `*.tar.gz` of a folder whenever it changes (by name, mtime and size).

    Writers rename complete archives into place (dot-prefixed temp names are skipped), so a half-copied file
    is never seen. Each archive is tried once: a rejected one is logged and the running model keeps serving.
    Deleting the newest archive makes the one before it the newest, which is how a deploy rolls a site back;
    when the deleted archive was the one served and no archive is left, the server rolls back to the bundle it
    served before (`rollback`), so deleting always undoes the drop.
    """

    def __init__(
        self,
        folder: Path,
        interval_s: float,
        install: Callable[[Path, str], dict[str, Any]],
        rollback: Callable[[], dict[str, Any]],
    ) -> None:
        if not folder.is_dir():
            raise ValueError(f"{folder}: the watched folder does not exist")
        self.folder, self.interval_s, self.install, self.rollback = folder, interval_s, install, rollback
        self._seen: tuple[str, int, int] | None = None
        self._served: Path | None = None  # the archive whose bundle this watcher installed last
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def newest(self) -> tuple[Path, tuple[str, int, int]] | None:
        found = []
        for path in self.folder.iterdir():
            if path.name.endswith(".tar.gz") and not path.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):  # removed while we looked
                    stat = path.stat()
                    found.append((stat.st_mtime_ns, path.name, stat.st_size, path))
        if not found:
            return None
        mtime, name, size, path = max(found)
        return path, (name, mtime, size)

    def poll(self) -> None:
        """One look at the folder; never raises, so the watching thread outlives any bad archive."""
        try:
            newest = self.newest()
        except OSError as exc:
            log.error("cannot list the watched folder %s: %s", self.folder, exc)
            return
        if newest is None:
            if self._served is not None and not self._served.exists():
                self._undo_deleted(self._served)
            return
        if newest[1] == self._seen:
            return
        path, self._seen = newest
        try:
            result = self.install(path, "watch")
        except BundleError as exc:
            log.error("%s rejected, still serving the previous model: %s", path.name, exc)
        except Exception:  # an unreadable file must not stop the watching thread
            log.exception("%s could not be installed", path.name)
        else:
            self._served = path
            log.info("%s: %s (bundle %s)", path.name, result["status"], result["bundle_sha256"][:12])

    def _undo_deleted(self, path: Path) -> None:
        self._served, self._seen = None, None
        try:
            result = self.rollback()
        except (LookupError, BundleError) as exc:
            log.error("%s was deleted and no archive is left, but rolling back failed: %s", path.name, exc)
        except Exception:
            log.exception("%s was deleted; rolling back failed", path.name)
        else:
            log.info("%s deleted, none left: rolled back to bundle %s", path.name, result["bundle_sha256"][:12])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        self.poll()
        while not self._stop.wait(self.interval_s):
            self.poll()
