"""`transflow deploy MODEL@ALIAS --strategy shadow|canary --waves 1,rest`: the bundle goes to each wave of edge
servers as a *candidate* beside the live model, is watched for a window while traffic flows, judged by rule
(tasks/rollout.py), and promoted there (then the next wave) or dropped everywhere (the flow stops, exit 1).

Order of a run:
1. look at every target before touching any (one that is down stops the run unchanged);
2. leftovers of an earlier run: a candidate of *another* bundle is dropped; a candidate of *this* bundle (a run
   killed mid-wave) is kept with its figures and judged when its window is full; a target already serving this
   bundle is done (a killed run promoted it) and skipped;
3. wave by wave: install the candidate on the wave's targets, wait until each has watched it for `window_s`,
   judge each; all pass → promote each, wait until it serves the bundle, run the golden inputs; any fails (or
   any step errs) → drop the candidate on every target that holds it, roll back the targets this run promoted,
   and fail naming the wave and the reasons.

Every step is recorded as it happens (tasks.rollout.record_step: `rollout.target.<target>` tags on the version),
so a killed run leaves its record up to the kill, plus a Prefect Markdown artifact `rollout-<model>` at the end.
A kill leaves every server serving its live version (a candidate never replaces it until promoted, and a
promotion is one atomic swap on the server); a canary candidate goes on answering its fraction until a rerun
judges or drops it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from pydantic import ValidationError

from flows.deploy import (
    DeployError,
    DeployInputError,
    Fetched,
    Target,
    TargetError,
    _edge,
    _transient,
    golden_check,
    restore,
    wait_until_serving,
)
from flows.prefect_artifacts import artifact_key
from tasks.prefect_options import LIVE
from tasks.rollout import RolloutRules, brief, judge, parse_waves, record_step, step, steps_markdown

POLL_S = 0.5


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, **LIVE)
def look(target: Target) -> dict[str, Any]:
    """What a server serves, its previous bundle and its candidate (with figures), before anything changes."""
    with _edge(target) as client:
        info = client.model() or {}
    held = info.get("candidate") or {}
    return {
        "bundle_sha256": info.get("bundle_sha256"),
        "version": info.get("version"),
        "previous": info.get("previous_bundle_sha256"),
        "candidate": held.get("bundle_sha256"),
        "figures": held.get("figures"),
    }


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, **LIVE)
def put_candidate(target: Target, fetched: Fetched, token_env: str, mode: str, rules: RolloutRules) -> str:
    """Send the bundle as the candidate (verified and golden-checked there); "unchanged" keeps its figures."""
    with _edge(target, token_env) as client:
        fraction = rules.fraction if mode == "canary" else None
        answer = client.upload_candidate(Path(fetched.archive), mode, fraction, rules.sticky)
    if (answer.get("candidate") or {}).get("bundle_sha256") != fetched.sha256:
        raise TargetError(f"{target.text}: holds {answer.get('candidate')} as candidate, not {fetched.sha256}")
    return str(answer["status"])


@task(**LIVE)
def watch(targets: list[Target], sha256: str, window_s: float, slack_s: float) -> dict[str, dict[str, Any]]:
    """Wait until every target has watched the candidate for `window_s` (a server restarted meanwhile starts
    its window again), then return each one's figures."""
    deadline = time.monotonic() + 2 * window_s + slack_s
    figures: dict[str, dict[str, Any]] = {}
    while True:
        for target in targets:
            seen = look.fn(target)
            if seen["candidate"] != sha256:
                raise TargetError(f"{target.text}: the candidate is gone (holds {seen['candidate']}), not judged")
            figures[target.text] = seen["figures"] or {}
        if all(f.get("watched_s", 0) >= window_s for f in figures.values()):
            return figures
        if time.monotonic() > deadline:
            raise TargetError(f"window of {window_s:.0f} s not completed by {sorted(figures)} in time")
        time.sleep(POLL_S)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, **LIVE)
def promote_candidate(target: Target, sha256: str, token_env: str) -> str:
    """Make the candidate current; looks first, so a retried call changes nothing."""
    seen = look.fn(target)
    if seen["bundle_sha256"] == sha256:
        return "unchanged"
    if seen["candidate"] != sha256:
        raise TargetError(f"{target.text}: holds candidate {seen['candidate']}, not {sha256}: not promoted")
    with _edge(target, token_env) as client:
        answer = client.promote_candidate()
    if answer.get("bundle_sha256") != sha256:
        raise TargetError(f"{target.text}: serves {answer.get('bundle_sha256')} after the promotion, not {sha256}")
    return "promoted"


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, **LIVE)
def drop_candidate(target: Target, sha256: str, token_env: str) -> str:
    """Drop the candidate if it is `sha256`; another one (someone else's) is left alone."""
    seen = look.fn(target)
    if seen["candidate"] is None:
        return "none"
    if seen["candidate"] != sha256:
        return f"left alone (holds {seen['candidate'][:12]})"
    with _edge(target, token_env) as client:
        client.drop_candidate()
    return "dropped"


def check_rollout(
    parsed: list[Target], strategy: str, waves: str, rules: dict[str, Any] | None
) -> tuple[RolloutRules, list[list[int]]]:
    """Bad input, found before anything is fetched or changed (exit 2)."""
    if strategy not in ("shadow", "canary"):
        raise DeployInputError(f"--strategy {strategy!r}: expected direct, shadow or canary")
    if any(t.kind != "http" for t in parsed):
        raise DeployInputError(f"--strategy {strategy} needs edge servers (http/https targets), not folders")
    try:
        return RolloutRules(**(rules or {})), parse_waves(waves, len(parsed))
    except (ValueError, ValidationError) as exc:
        raise DeployInputError(str(exc).replace("\n", " ")) from None


class _Record:
    """The steps of this run: each recorded on the version as it happens (never failing the flow)."""

    def __init__(self, uri: str, fetched: Fetched, strategy: str) -> None:
        self.uri, self.fetched, self.strategy, self.steps = uri, fetched, strategy, []
        self.logger = get_run_logger()

    def note(self, target: Target, wave: int, action: str, before: str | None, **extra: Any) -> None:
        entry = step(target.text, wave, action, before, self.fetched.sha256, **extra)
        self.steps.append(entry)
        self.logger.info("%s wave %d %s %s", target.text, wave, action, extra.get("verdict", extra.get("status", "")))
        self.save(entry, "in progress")

    def save(self, entry: dict[str, Any] | None, status: str) -> None:
        summary = {"rollout.strategy": self.strategy, "rollout.status": status}
        try:
            record_step(self.uri, self.fetched.name, self.fetched.version, entry, summary)
        except Exception as exc:  # the servers are the truth; a registry that is down must not hide it
            self.logger.error(
                "could not record rollout step on %s v%s: %s", self.fetched.name, self.fetched.version, exc
            )

    def publish(self, status: str) -> None:
        from prefect.artifacts import create_markdown_artifact

        self.save(None, status)
        f = self.fetched
        try:
            create_markdown_artifact(
                markdown=steps_markdown(f.name, f.version, status, self.steps),
                key=artifact_key("rollout", f.name),
                description=f"{self.strategy} rollout of {f.name} v{f.version}: {status}",
            )
        except Exception as exc:  # a view of the record must never fail the flow that made the record
            self.logger.warning("could not publish the rollout artifact: %s", exc)


def roll_out_waves(
    uri: str, parsed: list[Target], fetched: Fetched, token_env: str, wait_s: float, strategy: str, waves: str,
    rules: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """Candidate, watch, judge, promote, wave by wave; on any failure drop it everywhere and undo this run."""
    checked, groups = check_rollout(parsed, strategy, waves, rules)
    sha, log = fetched.sha256, _Record(uri, fetched, strategy)
    try:  # every target is looked at before any is touched
        seen = {t: look(t) for t in parsed}
    except Exception as exc:
        raise DeployError(
            f"{strategy} rollout of {fetched.name} v{fetched.version} stopped before any change: {exc}"
        ) from None
    for t, s in seen.items():
        if s["candidate"] not in (None, sha):  # an earlier run's candidate of another bundle: not ours to judge
            log.note(t, 0, "dropped-stale", s["bundle_sha256"], status=drop_candidate(t, s["candidate"], token_env))
        elif s["candidate"] == sha:
            log.note(t, 0, "resumed", s["bundle_sha256"], figures=brief(s["figures"]))
        elif s["bundle_sha256"] == sha:
            log.note(t, 0, "already-serving", s["previous"])
    results, promoted = [], []
    for w, indices in enumerate(groups, 1):
        wave = [parsed[i] for i in indices if seen[parsed[i]]["bundle_sha256"] != sha]
        results += [_result(parsed[i], w, "already serving", seen[parsed[i]]) for i in indices if parsed[i] not in wave]
        if not wave:
            continue
        try:
            for t in wave:
                status = put_candidate(t, fetched, token_env, strategy, checked)
                log.note(t, w, "candidate", seen[t]["bundle_sha256"], status=status, mode=strategy)
            figures = watch(wave, sha, checked.window_s, wait_s)
            failing = []
            for t in wave:
                ok, reasons = judge(figures[t.text], checked)
                verdict = "pass" if ok else "fail"
                log.note(t, w, "judged", seen[t]["bundle_sha256"], verdict=verdict, figures=brief(figures[t.text]),
                         reasons=reasons)  # fmt: skip
                failing += [] if ok else [f"{t.text}: {reasons[0]}"]
            if failing:
                raise DeployError("judged bad: " + "; ".join(failing))
            for t in wave:
                status = promote_candidate(t, sha, token_env)
                wait_until_serving(t, sha, wait_s)
                golden = golden_check(t, fetched)
                promoted.append(t)
                log.note(t, w, "promoted", seen[t]["bundle_sha256"], status=status, golden=golden)
                results.append(_result(t, w, status, seen[t], golden, brief(figures[t.text])))
        except Exception as exc:
            undo = _undo(parsed, promoted, seen, fetched, token_env, w, log)
            log.publish("failed")
            reason = str(exc)
            raise DeployError(
                f"{strategy} rollout of {fetched.name} v{fetched.version} stopped in wave {w}: {reason}\n{undo}"
            ) from None
    log.publish("deployed")
    return {"status": "deployed", "strategy": strategy, "results": results, "steps": log.steps}


def _result(
    target: Target, wave: int, status: str, seen: dict[str, Any], golden: Any = None, figures: Any = None
) -> dict[str, Any]:
    before = {"bundle_sha256": seen["bundle_sha256"]}
    return {"target": target.text, "wave": wave, "status": status, "before": before,
            "golden": golden or {"checked": 0}, "figures": figures or {}}  # fmt: skip


def _undo(
    parsed: list[Target], promoted: list[Target], seen: dict[Target, dict[str, Any]], fetched: Fetched,
    token_env: str, wave: int, log: _Record,
) -> str:  # fmt: skip
    """Drop the candidate on every target holding it; put the targets this run promoted back."""
    lines = ["undo:"]
    for t in parsed:
        try:
            if t in promoted:
                status = restore(t, {"bundle_sha256": seen[t]["bundle_sha256"]}, fetched, token_env)
                log.note(t, wave, "rolled-back", fetched.sha256, status=status)
            else:
                status = drop_candidate(t, fetched.sha256, token_env)
                if status == "dropped":
                    log.note(t, wave, "dropped", seen[t]["bundle_sha256"], status=status)
        except Exception as err:  # one target that cannot be undone must not keep the others from it
            status = f"NOT undone: {err}"
        lines.append(f"  {t.text}: {status}")
    return "\n".join(lines)
