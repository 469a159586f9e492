"""The state directory: verified bundles under `bundles/<sha256>/` and the serving state."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from transflow_edge.bundle import Bundle, BundleError, verify_bundle

log = logging.getLogger("transflow.edge")


STATE = "state.json"


def _sha_or_none(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise BundleError(f"{where}: not a bundle sha256")
    return value


_KEEP: Any = object()  # write_state: leave the candidate as state.json has it


class BundleStore:
    """`bundles/<sha256>/` plus `state.json` ({"current", "previous", "candidate"}), which changes in one atomic
    write: a crash leaves the old state or the new one, never a mix of the two. The candidate (see candidate.py)
    is {"sha256", "mode", "fraction", "sticky"} or null."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bundles = root / "bundles"
        self.staging = root / "staging"
        root.mkdir(parents=True, exist_ok=True)
        self._lock_file = (root / ".lock").open("w")
        try:  # one server per state dir: two would race on the state
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"{root}: state directory is in use by another edge server") from None
        self.bundles.mkdir(exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)  # leftovers of a crash mid-upload
        self.staging.mkdir()

    def close(self) -> None:
        self._lock_file.close()

    def read_state(self) -> dict[str, str | None]:
        """{"current": sha256 | None, "previous": sha256 | None}; BundleError when the file is damaged."""
        path = self.root / STATE
        if not path.is_file():  # a state dir of an older server: one pointer file each
            return {name: self._legacy_pointer(name) for name in ("current", "previous")}
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: unreadable ({exc})") from None
        if not isinstance(state, dict):
            raise BundleError(f"{path}: not a JSON object")
        return {name: _sha_or_none(state.get(name), f"{path} {name}") for name in ("current", "previous")}

    def _legacy_pointer(self, name: str) -> str | None:
        path = self.root / name
        return _sha_or_none(path.read_text().strip(), str(path)) if path.is_file() else None

    def read_candidate(self) -> dict[str, Any] | None:
        """The candidate state.json names; None when there is none or its entry is unusable (logged)."""
        path = self.root / STATE
        try:
            entry = json.loads(path.read_text()).get("candidate") if path.is_file() else None
            if entry is not None:
                _sha_or_none(entry["sha256"], f"{path} candidate")
            return entry
        except (OSError, ValueError, TypeError, KeyError, AttributeError, BundleError) as exc:
            log.error("%s: candidate entry unusable, ignored (%s)", path, exc)
            return None

    def write_candidate(self, candidate: dict[str, Any] | None) -> None:
        state = self.read_state()
        self.write_state(state["current"], state["previous"], candidate=candidate)

    def write_state(self, current: str | None, previous: str | None, candidate: Any = _KEEP) -> None:
        """Temp file, fsync, rename over state.json, fsync the directory: the one commit point of a swap."""
        if candidate is _KEEP:
            candidate = self.read_candidate()
        tmp = self.root / f".{STATE}.tmp"
        with tmp.open("w") as fh:
            extra = {} if candidate is None else {"candidate": candidate}  # no candidate: the format of before
            json.dump({"current": current, "previous": previous, **extra}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / STATE)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for name in ("current", "previous"):  # the older layout, now superseded
            (self.root / name).unlink(missing_ok=True)

    def new_staging(self) -> Path:
        path = self.staging / uuid.uuid4().hex
        path.mkdir()
        return path

    def adopt(self, staged: Path, sha256: str) -> Path:
        """Move a verified staged bundle to `bundles/<sha256>/` (same filesystem: one rename). An intact copy
        already there (the previous bundle uploaded again) is kept, so the state never names a missing one."""
        final = self.bundles / sha256
        if final.exists():
            try:
                self.load(sha256)
            except BundleError:  # damaged: replace it, moving the old copy aside first
                trash = self.staging / f"damaged-{uuid.uuid4().hex}"
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                shutil.rmtree(staged, ignore_errors=True)
                return final
        staged.rename(final)
        return final

    def load(self, sha256: str) -> Bundle:
        """Verify a stored bundle again; its manifest must still hash to the name it is stored under."""
        bundle = verify_bundle(self.bundles / sha256)
        if bundle.sha256 != sha256:
            raise BundleError(f"manifest.json: changed on disk (sha256 {bundle.sha256}, stored as {sha256})")
        return bundle

    def prune(self, keep: set[str | None]) -> None:
        """Only the current, previous and candidate bundles stay: edge disks are small."""
        candidate = self.read_candidate()
        with contextlib.suppress(BundleError):  # a damaged state.json: keep what the caller named
            keep = keep | set(self.read_state().values()) | {candidate and candidate["sha256"]}
        for path in self.bundles.iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
