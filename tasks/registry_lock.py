"""A cross-process, cross-machine lock on one registered model, held through the tracking server.

Creating a registered model is an atomic create-if-absent, so a temporary `<model>.promotion-lock` model is the
lock; its tags name the holder and when it expires.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping

from tasks.registered_version import RegistryError
from tasks.tracking import Tracker

LOCK_SUFFIX = ".promotion-lock"
# The critical section is a handful of REST calls, but MLflow's client retries a struggling server with backoff
# for minutes: a lock older than this lost its holder (crash, server restart) and may be broken.
LOCK_TTL_S = 300.0
LOCK_WAIT_S = 420.0


class RegistryBusy(RegistryError):
    """Another promotion or rollback of the same model held the lock for longer than we were willing to wait."""


@contextlib.contextmanager
def registry_lock(
    tracker: Tracker, model: str, ttl_s: float | None = None, wait_s: float | None = None, poll_s: float = 0.25
) -> Iterator[None]:
    """Mutual exclusion across processes and machines through the tracking server: creating a registered model
    is an atomic create-if-absent. A lock older than `ttl_s` lost its holder (crash, server restart) and is broken.
    """
    ttl_s = LOCK_TTL_S if ttl_s is None else ttl_s
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    name, token = f"{model}{LOCK_SUFFIX}", uuid.uuid4().hex
    holder = f"{current_user()}@{socket.gethostname()} pid {os.getpid()}"
    deadline = time.monotonic() + wait_s
    while not tracker.create_unique(
        name, {"transflow.lock": "promotion", "token": token, "holder": holder, "expires": f"{time.time() + ttl_s:.3f}"}
    ):
        held = tracker.model_tags(name)
        if held is not None and _expired(held):
            _release(tracker, name, held.get("token", ""))
            continue
        if time.monotonic() > deadline:
            who = (held or {}).get("holder", "someone")
            raise RegistryBusy(f"{model}: {who} holds the promotion lock ({name}); try again later")
        time.sleep(poll_s)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # the server may be the thing that failed; the TTL frees it then
            _release(tracker, name, token)


def _expired(tags: Mapping[str, str]) -> bool:
    try:
        return float(tags.get("expires", "0")) < time.time()
    except ValueError:
        return True


def _release(tracker: Tracker, name: str, token: str) -> None:
    held = tracker.model_tags(name)
    if held is not None and held.get("token") == token:
        tracker.delete_model(name)


def current_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"
