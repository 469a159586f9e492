"""The state directory: verified bundles under `bundles/<sha256>/` and the serving state."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path

from transflow_edge.bundle import Bundle, BundleError, verify_bundle

log = logging.getLogger("transflow.edge")


class BundleStore:
    """`bundles/<sha256>/` plus `current` and `previous` pointer files, each written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bundles = root / "bundles"
        self.staging = root / "staging"
        root.mkdir(parents=True, exist_ok=True)
        self._lock_file = (root / ".lock").open("w")
        try:  # one server per state dir: two would race on the pointers
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"{root}: state directory is in use by another edge server") from None
        self.bundles.mkdir(exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)  # leftovers of a crash mid-upload
        self.staging.mkdir()

    def close(self) -> None:
        self._lock_file.close()

    def read_pointer(self, name: str) -> str | None:
        path = self.root / name
        if not path.is_file():
            return None
        value = path.read_text().strip()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise BundleError(f"{path}: not a bundle sha256")
        return value

    def write_pointer(self, name: str, value: str) -> None:
        tmp = self.root / f".{name}.tmp"
        with tmp.open("w") as fh:
            fh.write(value + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / name)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def new_staging(self) -> Path:
        path = self.staging / uuid.uuid4().hex
        path.mkdir()
        return path

    def adopt(self, staged: Path, sha256: str) -> Path:
        """Move a verified staged bundle to `bundles/<sha256>/` (same filesystem: one rename)."""
        final = self.bundles / sha256
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
        return final

    def load(self, sha256: str) -> Bundle:
        """Verify a stored bundle again; its manifest must still hash to the name it is stored under."""
        bundle = verify_bundle(self.bundles / sha256)
        if bundle.sha256 != sha256:
            raise BundleError(f"manifest.json: changed on disk (sha256 {bundle.sha256}, stored as {sha256})")
        return bundle

    def prune(self, keep: set[str]) -> None:
        """Only the current and previous bundles stay: edge disks are small."""
        for path in self.bundles.iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
