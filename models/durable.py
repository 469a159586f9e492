"""Durable local state: the markers and JSON files that resume logic trusts are written so that a crash or a
power cut at any instant leaves either the old file or the new one, complete, never a torn one.

The recipe is the POSIX one: write a temporary file in the same directory, fsync it, rename it over the target
(atomic within one file system), then fsync the directory so the rename itself survives a power cut. Reading
goes through `read_json`, which reports a damaged file and returns None, so the caller recomputes instead of
crashing on a JSONDecodeError.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("transflow.durable")


def fsync_dir(folder: Path) -> None:
    """Persist the directory entry itself (a rename or a new file in it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Replace `path` with `data` atomically and durably (temp file, fsync, rename, directory fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_json(path: Path, value: Any) -> Path:
    return write_atomic(path, json.dumps(value, indent=2) + "\n")


def read_json(path: Path, what: str = "file") -> Any | None:
    """The parsed file, or None when it is missing or damaged (a damaged one is reported, never raised)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("%s %s is damaged (%s): ignoring it, the work it marks is redone", what, path, exc)
        return None
