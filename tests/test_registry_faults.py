"""The registry through stalls, crashes and concurrency, against a real `mlflow server` on loopback.

Crash injection: every Tracker call (each one a request to the registry) and the event are counted, and at
call N the process "dies": that call and every later one raise `Killed` (a BaseException, so no cleanup runs
either: nothing reaches the server after the crash point, as with SIGKILL), and the lease renewals stop. Then
a fresh caller recovers, and the registry must be consistent: champion, `previous_champion`, the decision log,
exactly one event. Decisions here are built by hand (the gate's evaluation is tested in test_promote.py):
what is under test is applying them.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.mlflow_server import running_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]
LEASE = 2.0  # short leases: a dead holder's ticket is passed over after 2 s (kept safe on 2 loaded cores)
_names = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def http_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        mp.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tasks.tracking import Tracker

    with running_server(tmp_path_factory.mktemp("faults-server"), workers=1) as srv:
        yield Tracker(srv.url)


@pytest.fixture(autouse=True)
def short_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.registry_lock

    monkeypatch.setattr(tasks.registry_lock, "LEASE_S", LEASE)
    monkeypatch.setattr(tasks.registry_lock, "LOCK_WAIT_S", 30.0)


def model_with_versions(tracker: Any, n: int) -> tuple[str, list[str]]:
    model = f"faults-{next(_names)}"
    versions = []
    for i in range(n):
        run = tracker.start_run("faults", f"v{i + 1}", {})
        tracker.end_run(run)
        versions.append(tracker.register(run, model, "model", {"which": str(i + 1)}))
    return model, versions


def promotion(model: str, to: str, before: str | None) -> Any:
    from tasks.registry_gate import Decision

    return Decision(
        model=model, action="promote", outcome="promoted", challenger=to, champion_before=before,
        champion_after=to, user="tester", time="t", metric="macro_f1", challenger_metrics={"macro_f1": 0.9},
        reasons=["wins"],
    )  # fmt: skip


@dataclass
class Events:
    """The `transflow.model.promoted` events the sequence sends (by log run and event id)."""

    sent: list[tuple[str, str, str]] = field(default_factory=list)

    def __call__(self, decision: Any, event_id: str) -> None:
        self.sent.append((decision.log_run_id, event_id, str(decision.champion_after)))

    def distinct(self) -> set[tuple[str, str, str]]:
        return set(self.sent)


class Killed(BaseException):
    pass


class Crash:
    """Count every Tracker call; from call number `at` on, the process is dead (see the module docstring)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int | None, events: Events) -> None:
        from tasks.tracking import Tracker

        self.at, self.calls, self.dead = at, [], False
        every = {n for cls in Tracker.__mro__[:-1] for n in vars(cls)}  # its registry mixin's calls too
        for name in sorted(n for n in every if not n.startswith("_") and callable(getattr(Tracker, n))):
            monkeypatch.setattr(Tracker, name, self.wrap(name, getattr(Tracker, name)))
        self.events = self.wrap("notify", events)

    def wrap(self, name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "touch_version":  # renewals: not a crash point, but a dead process renews nothing
                if self.dead:
                    raise ConnectionError("dead")
                return real(*args, **kwargs)
            if not self.dead:
                self.calls.append(name)
                self.dead = self.at is not None and len(self.calls) >= self.at
            if self.dead:
                raise Killed(f"killed at call {self.at} ({self.calls[-1]})")
            return real(*args, **kwargs)

        return call


def consistent(tracker: Any, model: str, before: str, after: str, action: str, events: Events) -> list[str]:
    """What is wrong with the registry after one decision `before → after` was (or was not) applied."""
    from tasks.promote import history
    from tasks.promotion_commit import INTENT_PREFIX

    problems = []
    champion = tracker.alias_version(model, "champion")
    entries = history(tracker, model)
    log = [e for e in entries if (e["action"], e["champion_before"], e["champion_after"]) == (action, before, after)]
    applied = [e for e in log if e["run_status"] == "FINISHED"]
    if champion == after:
        if len(applied) != 1:
            problems.append(f"{len(applied)} finished decision runs for the move")
        tags = tracker.version_tags(model, after if action == "promote" else before)
        key = "promotion.previous_champion" if action == "promote" else "promotion.rolled_back_to"
        if tags.get(key) != (before if action == "promote" else after):
            problems.append(f"v{after}/{before} lacks {key}")
        moved = {e for e in events.distinct() if e[2] == after and e[0] in {a["log_run_id"] for a in applied}}
        if len({e[1] for e in moved}) != 1:
            problems.append(f"{len(moved)} distinct events for the move")
    elif champion == before:
        if applied or any(e[2] == after for e in events.sent):
            problems.append("a decision logged or announced as applied but the champion did not move")
    else:
        problems.append(f"champion is v{champion}")
    if any(e["run_status"] == "RUNNING" for e in entries):
        problems.append("a decision run is still RUNNING")
    if any(k.startswith(INTENT_PREFIX) for k in tracker.model_tags(model) or {}):
        problems.append("an intent is still recorded")
    return problems


def test_a_duplicated_create_post_yields_one_version(tracker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's client retries a POST whose answer was lost: the server then made two versions for one run."""
    import mlflow.utils.rest_utils as rest

    real, duplicated = rest.http_request, []

    def post_twice(**kwargs: Any) -> Any:
        if kwargs["endpoint"].endswith("/model-versions/create"):
            duplicated.append(real(**kwargs))  # the first POST: created on the server, its answer lost
        return real(**kwargs)

    monkeypatch.setattr(rest, "http_request", post_twice)
    model = f"dup-{next(_names)}"
    runs = []
    for _ in range(3):
        runs.append(tracker.start_run("faults", "registered once", {}))
        version = tracker.register(runs[-1], model, "model", {"k": "v"})
        assert tracker.register(runs[-1], model, "model", {"k": "v"}) == version  # and a re-run finds it
    monkeypatch.setattr(rest, "http_request", real)
    assert len(duplicated) == 3
    assert tracker.version_numbers(model) == ["1", "3", "5"]  # 2, 4, 6 were the duplicates: deleted
    assert [tracker.model_version(model, v).run_id for v in ("1", "3", "5")] == runs


def test_tagless_ticket_honours_wait_s(tracker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.registry_lock import RegistryBusy, lock_model, registry_lock
    from tasks.tracking import Tracker

    model, _ = model_with_versions(tracker, 1)
    lock, source, anchor = lock_model(tracker, model)
    tracker.create_ticket(lock, source, anchor, {})  # no holder, no token: someone else's or a broken one
    polls = []
    real = Tracker.tickets
    monkeypatch.setattr(Tracker, "tickets", lambda self, name: polls.append(1) or real(self, name))
    started = time.monotonic()
    busy = pytest.raises(RegistryBusy, match="an unknown holder holds the promotion lock")
    with busy, registry_lock(tracker, model, lease_s=30.0, wait_s=1.0, poll_s=0.2):
        pass
    assert 1.0 <= time.monotonic() - started < 5 and len(polls) <= 8  # waited, did not spin
    assert len(tracker.tickets(lock)) == 1  # ours was withdrawn


def test_a_holder_stalled_past_its_lease_cannot_move_the_alias(tracker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stalls (no renewal reaches the server); B passes over A's ticket after one lease, promotes v3; A wakes
    and tries to promote v2: refused by its own lease clock, and, even with a fresh-looking lease, by the fence."""
    import tasks.registry_lock
    from tasks.promote import apply_decision, history, rollback
    from tasks.promotion_commit import commit
    from tasks.registry_lock import LeaseLost, registry_lock
    from tasks.tracking import Tracker

    # A longer lease here: B's own renewals must keep up while it waits A out; 2 s lost B's lease on a loaded box
    monkeypatch.setattr(tasks.registry_lock, "LEASE_S", 5.0)
    model, (v1, v2, v3) = model_with_versions(tracker, 3)
    assert apply_decision(tracker, promotion(model, v1, None)) is not None
    stalled: set[str] = set()
    touch = Tracker.touch_version

    def renew(self: Any, name: str, version: str) -> bool:
        if version in stalled:
            raise ConnectionError("stalled")
        return touch(self, name, version)

    monkeypatch.setattr(Tracker, "touch_version", renew)
    with registry_lock(tracker, model, lease_s=5.0) as lease_a:
        stalled.add(str(lease_a.ticket))
        done = apply_decision(tracker, promotion(model, v3, v1))  # B, another promoter: waits one lease, wins
        assert done is not None and tracker.alias_version(model, "champion") == v3
        with pytest.raises(LeaseLost, match="last renewed"):
            commit(tracker, lease_a, promotion(model, v2, v1))
        lease_a.renewed = time.monotonic()  # a holder whose own clock says all is well: the fence still refuses
        with pytest.raises(LeaseLost, match="holds the promotion lock now"):
            commit(tracker, lease_a, promotion(model, v2, v1))
    assert tracker.alias_version(model, "champion") == v3
    assert tracker.version_tags(model, v3)["promotion.previous_champion"] == v1
    assert [e["run_status"] for e in history(tracker, model)] == ["FINISHED", "FINISHED", "FAILED", "FAILED"]
    assert rollback(tracker, model).champion_after == v1  # the true previous champion: nothing was skipped


def test_concurrent_promoters_exactly_one_champion_move(tracker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several processes (threads here: each its own lock ticket and lease) apply a decision judged against the
    same champion, some after a dead holder left a ticket: exactly one moves it, each time."""
    import tasks.registry_lock
    from tasks.promote import apply_decision, history
    from tasks.registry_lock import lock_model

    # eight threads of one process share its GIL on two loaded cores: a longer lease keeps renewals in time
    monkeypatch.setattr(tasks.registry_lock, "LEASE_S", 5.0)

    rounds, racers = 3, 4
    for round_ in range(rounds):
        model, versions = model_with_versions(tracker, racers + 1)
        assert apply_decision(tracker, promotion(model, versions[0], None)) is not None
        if round_ == 0:  # a crashed holder's ticket: never renewed, passed over after one lease
            lock, source, anchor = lock_model(tracker, model)
            tracker.create_ticket(lock, source, anchor, {"holder": "crashed"})
        results: dict[str, Any] = {}
        start = threading.Barrier(racers)

        def race(version: str, model: str, first: str, start: threading.Barrier, results: dict[str, Any]) -> None:
            start.wait()
            results[version] = apply_decision(tracker, promotion(model, version, first))

        args = [(v, model, versions[0], start, results) for v in versions[1:]]
        threads = [threading.Thread(target=race, args=a) for a in args]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        winners = [v for v, d in results.items() if d is not None]
        assert len(results) == racers and len(winners) == 1, results
        assert tracker.alias_version(model, "champion") == winners[0]
        assert [e["champion_after"] for e in history(tracker, model)] == [versions[0], winners[0]]


def crash_points(monkeypatch: pytest.MonkeyPatch, act: Any) -> int:
    with monkeypatch.context() as mp:
        crash = Crash(mp, None, Events())
        act(crash.events)
    return len(crash.calls)


def add_version(tracker: Any, model: str) -> str:
    run = tracker.start_run("faults", "another version", {})
    tracker.end_run(run)
    return tracker.register(run, model, "model", {})


def test_crash_at_every_registry_call_of_a_promotion_and_a_rollback_then_recover(
    tracker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round k: a new version's promotion dies at call k, is recovered (`--recover`, or the next action), and
    checked; then a rollback of it dies at call k, is recovered (by `--recover` or by the next rollback, which
    completes the interrupted one first), and checked. One model carries on from round to round."""
    from tasks.promote import apply_decision, recover_model, rollback

    model, (champion,) = model_with_versions(tracker, 1)
    assert apply_decision(tracker, promotion(model, champion, None)) is not None
    new = add_version(tracker, model)
    promote_calls = crash_points(monkeypatch, lambda ev: apply_decision(tracker, promotion(model, new, champion), ev))
    rollback_calls = crash_points(monkeypatch, lambda ev: rollback(tracker, model, "t", notify=ev))
    survived: dict[str, list[str]] = {"promote": [], "rollback": []}
    for at in range(1, max(promote_calls, rollback_calls) + 1):
        new, events = add_version(tracker, model), Events()
        with monkeypatch.context() as mp:
            crash = Crash(mp, at if at <= promote_calls else None, events)
            with contextlib.suppress(Killed):
                apply_decision(tracker, promotion(model, new, champion), crash.events)
        assert crash.dead == (at <= promote_calls), (at, crash.calls)
        recover_model(tracker, model, notify=events)  # `transflow promote --recover`, after the dead lease
        if tracker.alias_version(model, "champion") == champion:  # died before the intent: promote again
            assert apply_decision(tracker, promotion(model, new, champion), events) is not None
        problems = consistent(tracker, model, champion, new, "promote", events)
        assert not problems, ("promote", at, crash.calls[-1], problems)
        survived["promote"] += [crash.calls[-1]] if at <= promote_calls else []
        if at > rollback_calls:
            champion = new
            continue
        with monkeypatch.context() as mp:
            crash = Crash(mp, at, events)
            with pytest.raises(Killed):
                rollback(tracker, model, "t", notify=crash.events)
        if at % 2 or tracker.alias_version(model, "champion") != new:
            recover_model(tracker, model, notify=events)
        if tracker.alias_version(model, "champion") == new:  # not recovered yet, or died before the intent
            done = rollback(tracker, model, "again", notify=events)  # completes an interrupted one first
            assert (done.champion_before, done.champion_after) == (new, champion)
        problems = consistent(tracker, model, new, champion, "rollback", events)
        assert not problems, ("rollback", at, crash.calls[-1], problems)
        survived["rollback"].append(crash.calls[-1])
    for action, total in (("promote", promote_calls), ("rollback", rollback_calls)):
        print(f"{action}: {len(survived[action])}/{total} crash points consistent after recovery: {survived[action]}")
    assert [len(survived["promote"]), len(survived["rollback"])] == [promote_calls, rollback_calls]


def test_rollback_after_a_promotion_killed_before_its_tags_returns_to_the_true_previous(
    tracker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.promote import apply_decision, rollback

    model, (v1, v2) = model_with_versions(tracker, 2)
    assert apply_decision(tracker, promotion(model, v1, None)) is not None
    with monkeypatch.context() as mp:
        crash = Crash(mp, None, Events())
        apply_decision(tracker, promotion(model, v2, v1))
        at = crash.calls.index("tag_version") + 1  # the alias has moved, no version tag is written yet
    model, (v1, v2) = model_with_versions(tracker, 2)
    assert apply_decision(tracker, promotion(model, v1, None)) is not None
    with monkeypatch.context() as mp:
        crash = Crash(mp, at, Events())
        with pytest.raises(Killed):
            apply_decision(tracker, promotion(model, v2, v1))
    assert tracker.alias_version(model, "champion") == v2
    assert "promotion.previous_champion" not in tracker.version_tags(model, v2)  # the half-done state
    done = rollback(tracker, model)
    assert (done.champion_before, done.champion_after) == (v2, v1) == (v2, tracker.alias_version(model, "champion"))
