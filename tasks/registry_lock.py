"""A fenced, leased lock on one registered model, held through the tracking server (no other service needed).

The lock is a permanent registered model `<model>.promotion-lock`; each process that wants the lock creates a
*ticket*, a new version of it. The server numbers versions atomically and never reuses a number (a deleted
version keeps its row), so tickets form a queue and a ticket's number is a fencing token: the live ticket with
the lowest number holds the lock, and each holder writes its number into the model's `promotion.fence` tag.

Leases: a background thread renews its ticket every quarter lease (the server stamps the version's
last-updated time with its own clock). A waiter counts a ticket ahead of it as dead when that server stamp has
not moved for a whole lease of the waiter's own monotonic clock: no two machines' wall clocks are ever
compared. Dead tickets are deleted, so a stalled holder that wakes up finds its ticket gone.

Fencing: `Lease.check()` runs immediately before every registry write that must not come from a stale holder
(the intent record and the alias move). It refuses when this process has not renewed for three quarters of a
lease (a waiter cannot have judged it dead before a whole one), or when the fence tag names a later ticket. The
residual window is the one call after the check: MLflow has no compare-and-set, so a request that stalls inside
the server for a quarter lease after the check can still land. Recovery (tasks/promotion_commit.py) only rolls
a recorded intent forward when the champion is still the one it was judged against, which bounds such a write.

Several users: promoters need MANAGE on `<model>` and `<model>.promotion-lock` and EDIT on the experiment
`<model>-promotions` (mlflow/README.md); `prepare` creates both once so an admin can grant them.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tasks.registered_version import RegistryError
from tasks.tracking import Tracker

LOCK_SUFFIX = ".promotion-lock"
LOG_SUFFIX = "-promotions"  # the experiment holding one run per decision (and the lock's anchor run)
FENCE_TAG = "promotion.fence"
SOURCE_TAG, ANCHOR_TAG = "transflow.lock.source", "transflow.lock.anchor_run"
ANCHOR_RUN_TAG = "transflow.lock_anchor"
# MLflow's client retries a struggling server for minutes; a lease is renewed four times per period, so only a
# process (or a link) stalled for a whole lease loses it.
LEASE_S = 30.0
LOCK_WAIT_S = 420.0
# A waiter passes over a ticket only a whole lease after it last saw the ticket's stamp move, and that stamp is
# no older than the start of the holder's last renewal: a holder whose renewal is younger than this share of the
# lease has the rest of the lease for the one write it checked for.
SAFE_FRACTION = 0.75


class RegistryBusy(RegistryError):
    """Another promotion or rollback of the same model held the lock for longer than we were willing to wait."""


class LeaseLost(RegistryError):
    """This process no longer holds the lock (it stalled past its lease, or a later ticket took over): it must not
    change the registry. A decision it already recorded as intent is completed by the next holder."""


@dataclass
class Lease:
    """The held lock: its fencing token (`ticket`) and the monotonic time of the last successful renewal."""

    tracker: Tracker
    model: str
    lock: str
    ticket: int
    lease_s: float
    renewed: float = field(default_factory=time.monotonic)
    lost: str | None = None

    def check_local(self) -> None:
        if self.lost:
            raise LeaseLost(f"{self.model}: lost the promotion lock: {self.lost}")
        age = time.monotonic() - self.renewed
        if age > self.lease_s * SAFE_FRACTION:
            raise LeaseLost(
                f"{self.model}: the promotion lock was last renewed {age:.1f}s ago (lease {self.lease_s:g}s): "
                "this process stalled and may have been replaced, so it changes nothing"
            )

    def check(self) -> None:
        """The fence: call immediately before a write only the holder may make. Raises LeaseLost."""
        self.check_local()
        fence = (self.tracker.model_tags(self.model) or {}).get(FENCE_TAG)
        if fence != str(self.ticket):
            raise LeaseLost(f"{self.model}: ticket {fence} holds the promotion lock now, not ours ({self.ticket})")
        self.check_local()  # the read itself may have stalled


@contextlib.contextmanager
def registry_lock(
    tracker: Tracker, model: str, lease_s: float | None = None, wait_s: float | None = None, poll_s: float = 0.25
) -> Iterator[Lease]:
    """Hold the promotion lock of `model` (which must exist) while the block runs; yields the `Lease` whose
    `check()` fences each critical write. Raises RegistryBusy after `wait_s` seconds of waiting."""
    lease_s = LEASE_S if lease_s is None else lease_s
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    lock, source, anchor = lock_model(tracker, model)
    holder = f"{current_user()}@{socket.gethostname()} pid {os.getpid()}"
    started = time.monotonic()
    ticket = int(tracker.create_ticket(lock, source, anchor, {"holder": holder, "transflow.lock": "ticket"}))
    lease = Lease(tracker, model, lock, ticket, lease_s, renewed=started)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lease, stop), name=f"lease-{lock}", daemon=True)
    renewer.start()
    try:
        _wait_turn(lease, wait_s, poll_s)
        lease.check_local()
        tracker.set_model_tag(model, FENCE_TAG, str(ticket))
        yield lease
    finally:
        stop.set()
        renewer.join(lease_s)
        with contextlib.suppress(Exception):  # the server may be what failed: the lease frees it then
            tracker.delete_version(lock, str(ticket))


def _renew(lease: Lease, stop: threading.Event) -> None:
    period = lease.lease_s / 4
    while not stop.wait(max(0.0, lease.renewed + period - time.monotonic())):  # on schedule, not after each call
        started = time.monotonic()
        try:
            if lease.tracker.touch_version(lease.lock, str(lease.ticket)):
                lease.renewed = started
            else:
                lease.lost = f"ticket {lease.ticket} was removed: another process judged this one dead"
                return
        except Exception:  # the server struggles: no renewal; the lease runs down and check() says so
            continue


def _wait_turn(lease: Lease, wait_s: float, poll_s: float) -> None:
    """Wait until no live ticket is ahead of ours; tickets whose server stamp stood still for a lease are dead."""
    deadline = time.monotonic() + wait_s
    seen: dict[int, tuple[int, float]] = {}  # ticket → (server stamp, when we first saw that stamp)
    while True:
        tickets = lease.tracker.tickets(lease.lock)
        now = time.monotonic()
        if lease.ticket not in {number for number, _, _ in tickets}:
            raise LeaseLost(f"{lease.model}: our lock ticket {lease.ticket} was removed while we waited (stalled)")
        ahead = []
        for number, stamp, tags in tickets:
            if number >= lease.ticket:
                continue
            if seen.get(number, (None, 0.0))[0] != stamp:
                seen[number] = (stamp, now)
            if now - seen[number][1] >= lease.lease_s:
                with contextlib.suppress(Exception):  # a dead holder: whoever sees it first removes it
                    lease.tracker.delete_version(lease.lock, str(number))
            else:
                ahead.append((number, tags.get("holder", "an unknown holder")))
        if not ahead:
            return
        if now > deadline:
            number, who = ahead[0]
            raise RegistryBusy(f"{lease.model}: {who} holds the promotion lock (ticket {number}); try again later")
        time.sleep(poll_s)


def lock_model(tracker: Tracker, model: str) -> tuple[str, str, str]:
    """The lock model's name, the source its tickets point at, and the run that anchors that source (MLflow
    requires a version's source to lie under its run's artifacts); created on first use (`prepare`)."""
    lock = model + LOCK_SUFFIX
    tags = tracker.model_tags(lock) or {}
    if SOURCE_TAG in tags and ANCHOR_TAG in tags:
        return lock, tags[SOURCE_TAG], tags[ANCHOR_TAG]
    return prepare(tracker, model)


def prepare(tracker: Tracker, model: str) -> tuple[str, str, str]:
    """Create the lock model and the decision-log experiment of `model` (with the anchor run). Idempotent; two
    first users racing each tag their own anchor, and tickets on either are equally valid."""
    lock = model + LOCK_SUFFIX
    tracker.create_unique(lock, {"transflow.lock": "promotion"})
    anchor = tracker.start_run(model + LOG_SUFFIX, "promotion lock anchor", {ANCHOR_RUN_TAG: lock})
    tracker.end_run(anchor)
    source = f"{tracker.artifact_uri(anchor)}/lock"
    tracker.set_model_tag(lock, ANCHOR_TAG, anchor)
    tracker.set_model_tag(lock, SOURCE_TAG, source)
    return lock, source, anchor


def current_user() -> str:
    """Who decides: the tracking server's user when credentials are set (what an auth-enabled server knows),
    else the operating-system user."""
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return os.environ["MLFLOW_TRACKING_USERNAME"]
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"
