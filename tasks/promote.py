"""The registry lifecycle: the champion/challenger gate, rollback, the promotion log and lineage.

The gate re-evaluates the challenger and the current champion on the same test split of the same data
version (checked on disk), and moves `champion` only if every condition holds. The decision itself is
pure (`tag_checks`, `compare`, `decide`); the effects below go through `Tracker`, the one MLflow caller.

Concurrency and crashes: a decision is applied inside a short critical section held by a registry lock
(an atomic create-if-absent of a lock model on the tracking server). Inside it the champion is re-read, the
decision is logged as its own MLflow run in `<model>-promotions`, and the alias move is the single commit
point. Two racing promotions therefore serialise (the second is judged against the first one's result), and
a failure before the alias move leaves the previous champion in place. Bad input (unknown model or version,
missing or tampered bundle, other labels, other data) raises `PromotionError` before anything is written.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from transflow_edge.bundle import BundleError, read_bundle, safe_extract, verify_bundle

from tasks.tracking import CHALLENGER, Tracker, VersionRecord

CHAMPION = "champion"
LOG_SUFFIX = "-promotions"
LOCK_SUFFIX = ".promotion-lock"
DECISION_TAG = "promotion.decision"
PREVIOUS_TAG = "promotion.previous_champion"
BUNDLE_ARTIFACT = "bundle/bundle.tar.gz"
# The critical section is a handful of REST calls, but MLflow's client retries a struggling server with backoff
# for minutes: a lock older than this lost its holder (crash, server restart) and may be broken.
LOCK_TTL_S = 300.0
LOCK_WAIT_S = 420.0
MAX_ROUNDS = 3  # re-evaluate at most this often when another promotion moves the champion meanwhile
LINEAGE_DEPTH = 5


class PromotionError(ValueError):
    """Input the gate cannot judge (unknown model or version, bad bundle, other labels or data): nothing changed."""


class RegistryBusy(PromotionError):
    """Another promotion or rollback of the same model held the lock for longer than we were willing to wait."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    """One promotion or rollback: what was compared, what was decided and why, by whom, when."""

    model: str
    action: str  # promote | rollback
    outcome: str  # promoted | refused | rolled_back
    challenger: str | None
    champion_before: str | None
    champion_after: str | None
    user: str
    time: str
    metric: str | None = None
    margin: float | None = None
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    data_version: str | None = None
    test_size: int | None = None
    host: str = field(default_factory=socket.gethostname)
    dry_run: bool = False
    log_run_id: str | None = None

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


# --- the gate: pure ------------------------------------------------------------------------------------------


def tag_checks(tags: Mapping[str, str], int8_budget_pt: float) -> list[Check]:
    """The export conditions recorded on the version: fp32 ONNX parity, and int8 within budget or fp32 shipped."""
    parity = tags.get("onnx.parity_passed")
    ok = parity == "true"
    detail = "fp32 ONNX parity passed" if ok else f"ONNX parity not passed (onnx.parity_passed={parity!r})"
    return [Check("onnx_parity", ok, detail), int8_check(tags, int8_budget_pt)]


def int8_check(tags: Mapping[str, str], budget_pt: float) -> Check:
    shipped = tags.get("onnx.int8_shipped")
    if shipped == "false":
        return Check("int8", True, "fp32 ships as the default model")
    if shipped != "true":
        return Check("int8", False, f"no int8 decision recorded (onnx.int8_shipped={shipped!r})")
    try:
        delta = float(tags["onnx.int8_delta_pt"])
    except (KeyError, ValueError):
        return Check("int8", False, "int8 ships but its accuracy drop (onnx.int8_delta_pt) is not recorded")
    ok = delta <= budget_pt
    return Check("int8", ok, f"int8 macro-F1 drop {delta:.2f} pt {'within' if ok else 'exceeds'} budget {budget_pt} pt")


def compare(metric: str, challenger: float, champion: float | None, margin: float) -> Check:
    """Wins when strictly better and by at least `margin`: a tie never moves the champion."""
    if champion is None:
        return Check("beats_champion", True, f"no champion yet: first champion ({metric} {challenger:.4f})")
    delta = challenger - champion
    ok = delta > 0 and delta >= margin
    verdict = "wins" if ok else f"does not win (needs > 0 and ≥ margin {margin})"
    return Check("beats_champion", ok, f"{metric} {challenger:.4f} vs champion {champion:.4f}: {delta:+.4f}, {verdict}")


def decide(checks: list[Check]) -> tuple[bool, list[str]]:
    """Promote iff every check holds; the reasons are the failures, or every check when it passes."""
    failed = [c.detail for c in checks if not c.ok]
    return not failed, failed or [c.detail for c in checks]


# --- inputs: bad ones raise PromotionError before anything is written --------------------------------------


def require_model(tracker: Tracker, model: str) -> None:
    if not tracker.model_exists(model):
        raise PromotionError(f"no registered model named {model!r} in the registry")


def require_version(tracker: Tracker, model: str, version: str) -> VersionRecord:
    if not str(version).isdigit():
        raise PromotionError(f"{model}: version must be a number, got {version!r}")
    record = tracker.model_version(model, str(version))
    if record is None:
        known = ", ".join(tracker.version_numbers(model)) or "none"
        raise PromotionError(f"{model} has no version {version} (versions: {known})")
    if not record.run_id:
        raise PromotionError(f"{model} v{version} was not registered from a run: the gate needs the run's artifacts")
    return record


def resolve_challenger(tracker: Tracker, model: str, version: str | None) -> VersionRecord:
    require_model(tracker, model)
    if version is None:
        version = tracker.alias_version(model, CHALLENGER)
        if version is None:
            raise PromotionError(f"{model} has no '{CHALLENGER}' alias: name the version with --version")
    return require_version(tracker, model, str(version))


def label_set(record: VersionRecord) -> list[str]:
    try:
        classes = json.loads(record.tags["classes"])
    except (KeyError, json.JSONDecodeError):
        raise PromotionError(f"{record.name} v{record.version} has no valid 'classes' tag (a JSON list)") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise PromotionError(f"{record.name} v{record.version}: 'classes' tag is not a JSON list of names")
    return classes


def same_labels(challenger: VersionRecord, champion: VersionRecord) -> Check:
    mine, theirs = label_set(challenger), label_set(champion)
    if set(mine) != set(theirs):
        raise PromotionError(
            f"{challenger.name} v{challenger.version} was trained on labels {mine} but champion "
            f"v{champion.version} on {theirs}: a different label set cannot replace the champion"
        )
    return Check("same_labels", True, f"same label set as champion v{champion.version}: {sorted(mine)}")


def verify_version_bundle(tracker: Tracker, record: VersionRecord, work: Path) -> Check:
    """The run's bundle.tar.gz extracts safely, verifies, is the one the registry recorded, and has our labels."""
    where = f"{record.name} v{record.version}"
    tar = tracker.run_artifact(record.run_id or "", BUNDLE_ARTIFACT, work / f"bundle-v{record.version}.download")
    if tar is None:
        raise PromotionError(f"{where}: run {record.run_id} has no {BUNDLE_ARTIFACT}: export the version first")
    dest = Path(tempfile.mkdtemp(prefix=f"bundle-v{record.version}-", dir=work)) / "bundle"
    try:
        bundle = verify_bundle(safe_extract(tar, dest))
    except BundleError as exc:
        raise PromotionError(f"{where}: bundle fails verification: {exc}") from None
    expected = record.tags.get("bundle_sha256")
    if bundle.sha256 != expected:
        raise PromotionError(f"{where}: bundle sha256 {bundle.sha256} is not the registered one ({expected})")
    if sorted(bundle.json("labels.json")) != sorted(label_set(record)):
        raise PromotionError(f"{where}: bundle labels {bundle.json('labels.json')} differ from the version's")
    if record.tags.get("onnx.default_model", bundle.manifest["default_model"]) != bundle.manifest["default_model"]:
        raise PromotionError(f"{where}: bundle default model differs from the registry's onnx.default_model tag")
    return Check("bundle", True, f"bundle {bundle.sha256[:12]} verified, sha256 matches the registry")


def run_config(tracker: Tracker, record: VersionRecord, work: Path) -> Any:
    """The challenger run's resolved RunConfig: its data settings define the test split."""
    from pydantic import ValidationError

    from flows.config import RunConfig

    path = tracker.run_artifact(record.run_id or "", "config.json", work / f"config-v{record.version}")
    if path is None:
        raise PromotionError(f"{record.name} v{record.version}: run {record.run_id} has no config.json")
    try:
        return RunConfig.model_validate(json.loads(path.read_text()))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise PromotionError(f"{record.name} v{record.version}: config.json is not a valid run config: {exc}") from None


def verify_same_data(data_cfg: Any, record: VersionRecord) -> Check:
    """The data on disk must be, byte for byte, the version the challenger was trained and tested on."""
    from tasks.data import DataError, verify_data

    pinned, dvc_file = record.tags.get("data_version"), data_cfg.dvc_file
    if dvc_file is None or not pinned or pinned == "unversioned":
        raise PromotionError(
            f"{record.name} v{record.version} was trained on unversioned data: the gate cannot prove that both "
            "models are compared on the same test split"
        )
    try:
        report = verify_data(Path(dvc_file))
    except DataError as exc:
        raise PromotionError(f"cannot verify the data of {record.name} v{record.version}: {exc}") from None
    if report.version != pinned:
        raise PromotionError(
            f"{record.name} v{record.version} was trained on data {pinned} but {dvc_file} pins {report.version}: "
            "check out the matching data (git checkout + dvc checkout) to compare on the same test split"
        )
    if not report.ok:
        raise PromotionError(f"data on disk does not match {dvc_file}: " + "; ".join(report.problems[:5]))
    return Check("same_data", True, f"test split of data version {pinned} verified on disk")


# --- evaluation ------------------------------------------------------------------------------------------------


@dataclass
class TestSplit:
    """The challenger's test split, shared by both evaluations."""

    items: list[Any]
    labels: list[int]
    classes: list[str]
    batch_size: int
    device: str


def load_test_split(cfg: Any, device: str) -> TestSplit:
    from tasks.data import DataError, load_dataset

    try:
        dataset = load_dataset(cfg.data, seed=cfg.training.seed)
    except (DataError, ValueError) as exc:
        raise PromotionError(f"cannot load the challenger's test split: {exc}") from None
    test = dataset.test
    return TestSplit(test.items, test.labels, dataset.classes, cfg.training.eval_batch_size, device)


def evaluate_version(tracker: Tracker, record: VersionRecord, split: TestSplit, work: Path) -> dict[str, float]:
    model_dir = tracker.download(f"models:/{record.name}/{record.version}", work / f"model-v{record.version}")
    return evaluate_model_dir(model_dir, split)


def evaluate_model_dir(model_dir: Path, split: TestSplit) -> dict[str, float]:
    """Accuracy, macro-F1 and loss of a saved model on the split, its logits reordered to the split's classes.

    No progress bar: the gate runs inside other flows and in parallel threads (one Rich live display each)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from models.adapters import load_model_dir
    from models.trainer import scores
    from tasks.finetune import Encoded

    adapter, model, meta = load_model_dir(model_dir)
    if sorted(meta["classes"]) != sorted(split.classes):
        raise PromotionError(f"{model_dir}: model classes {meta['classes']} differ from the data's {split.classes}")
    order = torch.as_tensor([meta["classes"].index(c) for c in split.classes])
    encoded = Encoded(([], []), ([], []), (adapter.encode(split.items), split.labels))
    model.to(split.device).eval()
    logits, labels = [], []
    with torch.inference_mode():
        for inputs, y in encoded.batches(adapter, "test", split.batch_size, sort=True):
            out = model(**{k: v.to(split.device) for k, v in inputs.items()}).float().cpu()
            logits.append(out[:, order])
            labels.append(y)
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    loss = F.cross_entropy(all_logits, all_labels).item()
    return {k: round(v, 6) for k, v in scores(all_labels.numpy(), np.asarray(all_logits)).items()} | {
        "loss": round(loss, 6)
    }


# --- the registry lock -------------------------------------------------------------------------------------


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


# --- effects: the decision log and the alias move ----------------------------------------------------------


def current_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def record_decision(
    tracker: Tracker, decision: Decision, version_tags: dict[str, dict[str, str]], move_to: str | None
) -> Decision:
    """Log the decision as its own run (intent), move the alias (the commit point), tag the versions, finish.

    A failure before the alias move changes no champion; the log run is then left FAILED (or RUNNING when the
    server is gone), which `history` reports as incomplete."""
    payload = decision.to_json()
    summary = {
        "promotion.action": decision.action,
        "promotion.outcome": decision.outcome,
        "promotion.challenger": decision.challenger or "",
        "promotion.champion_before": decision.champion_before or "",
        "promotion.champion_after": decision.champion_after or "",
        "promotion.user": decision.user,
    }
    if len(payload) <= 7900:  # MLflow's tag limit is 8000; the artifact always has the whole record
        summary[DECISION_TAG] = payload
    run_id = tracker.start_run(decision.model + LOG_SUFFIX, f"{decision.action} {decision.model}", summary)
    try:
        tracker.log_text(run_id, payload + "\n", "decision.jsonl")
        if move_to:
            tracker.set_alias(decision.model, CHAMPION, move_to)
        for version, tags in version_tags.items():
            tracker.tag_version(decision.model, version, tags | {"promotion.log_run_id": run_id})
        tracker.end_run(run_id)
    except BaseException:
        with contextlib.suppress(Exception):
            tracker.end_run(run_id, "FAILED")
        raise
    return replace(decision, log_run_id=run_id)


def promotion_tags(d: Decision) -> dict[str, dict[str, str]]:
    """What each involved version records of the decision (the log run has the whole record)."""
    if d.champion_before is not None and d.champion_before == d.challenger:
        return {}  # a concurrent promotion already made it champion: its tags stay, the log records this attempt
    stamp = {"promotion.time": d.time, "promotion.user": d.user}
    mine = {
        **stamp,
        "promotion.outcome": d.outcome,
        "promotion.metric": d.metric or "",
        "promotion.score": f"{d.challenger_metrics.get(d.metric or '', float('nan')):.4f}",
        "promotion.against": d.champion_before or "none",
        "promotion.reasons": json.dumps(d.reasons)[:4000],
    }
    tags = {d.challenger or "": mine}
    if d.promoted:
        mine[PREVIOUS_TAG] = d.champion_before or "none"
        if d.champion_before:
            tags[d.champion_before] = {**stamp, "promotion.replaced_by": d.challenger or ""}
    elif d.champion_before:
        tags[d.champion_before] = {**stamp, "promotion.defended_against": d.challenger or ""}
    return tags


# --- promote ---------------------------------------------------------------------------------------------------


@dataclass
class GateInputs:
    """Everything about the challenger the gate needs, gathered and verified once."""

    challenger: VersionRecord
    checks: list[Check]
    split: TestSplit
    data_version: str
    metric: str
    margin: float
    int8_budget_pt: float
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


def promote_version(
    tracker: Tracker,
    model_name: str,
    version: str | None = None,
    metric: str | None = None,
    margin: float | None = None,
    int8_budget_pt: float | None = None,
    *,
    dry_run: bool = False,
    device: str = "cpu",
    workdir: Path | None = None,
    user: str | None = None,
) -> Decision:
    """The gate: judge `version` (default: alias `challenger`) against the champion and apply the decision.

    `metric`, `margin` and `int8_budget_pt` default to the challenger run's config (evaluation.metric,
    registry.margin, export.int8_budget_pt). The retraining flow calls this for `registry.auto_promote`.
    Raises PromotionError (nothing changed) on bad input; returns the decision, promoted or refused."""
    user = user or current_user()
    challenger = resolve_challenger(tracker, model_name, version)
    with _workdir(workdir) as work:
        champion = _champion(tracker, challenger)
        gate = gather(tracker, challenger, work, device, metric, margin, int8_budget_pt)
        gate.scores[challenger.version] = evaluate_version(tracker, challenger, gate.split, work)
        for _ in range(MAX_ROUNDS):
            if champion is not None and champion.version not in gate.scores:
                gate.scores[champion.version] = evaluate_version(tracker, champion, gate.split, work)
            decision = judge(gate, champion, user, dry_run)
            if dry_run:
                return decision
            with registry_lock(tracker, model_name):
                if tracker.alias_version(model_name, CHAMPION) == (champion.version if champion else None):
                    decision = replace(decision, time=now())
                    return record_decision(tracker, decision, promotion_tags(decision), _move(decision))
            champion = _champion(tracker, challenger, allow_self=True)  # a concurrent promotion moved it: re-judge
    raise RegistryBusy(f"{model_name}: the champion moved {MAX_ROUNDS} times while this promotion ran; try again")


def _champion(tracker: Tracker, challenger: VersionRecord, allow_self: bool = False) -> VersionRecord | None:
    """The current champion (labels checked). Being the champion already is bad input, unless a concurrent
    promotion made it so while we evaluated: that is judged (refused) and logged like any decision."""
    version = tracker.alias_version(challenger.name, CHAMPION)
    if version is None:
        return None
    if version == challenger.version:
        if not allow_self:
            raise PromotionError(f"{challenger.name} v{version} is already the champion")
        return challenger
    champion = require_version(tracker, challenger.name, version)
    same_labels(challenger, champion)
    return champion


def gather(
    tracker: Tracker,
    challenger: VersionRecord,
    work: Path,
    device: str,
    metric: str | None,
    margin: float | None,
    int8_budget_pt: float | None,
) -> GateInputs:
    """Verify the challenger's bundle and data, load its test split, and settle the gate's settings."""
    label_set(challenger)
    bundle = verify_version_bundle(tracker, challenger, work)
    cfg = run_config(tracker, challenger, work)
    data = verify_same_data(cfg.data, challenger)
    metric = metric or cfg.evaluation.metric
    if metric not in ("macro_f1", "accuracy"):
        raise PromotionError(f"unknown metric {metric!r}: expected macro_f1 or accuracy")
    from tasks.finetune import resolve_device

    return GateInputs(
        challenger,
        [bundle, data],
        load_test_split(cfg, resolve_device(device)),
        challenger.tags["data_version"],
        metric,
        cfg.registry.margin if margin is None else margin,
        cfg.export.int8_budget_pt if int8_budget_pt is None else int8_budget_pt,
    )


def judge(gate: GateInputs, champion: VersionRecord | None, user: str, dry_run: bool) -> Decision:
    mine = gate.scores[gate.challenger.version]
    theirs = gate.scores[champion.version] if champion else None
    checks = [*gate.checks]
    if champion and champion.version == gate.challenger.version:
        checks.append(Check("not_champion", False, f"v{champion.version} became the champion meanwhile"))
    elif champion:
        checks.append(same_labels(gate.challenger, champion))
    checks += tag_checks(gate.challenger.tags, gate.int8_budget_pt)
    checks.append(compare(gate.metric, mine[gate.metric], theirs[gate.metric] if theirs else None, gate.margin))
    promote, reasons = decide(checks)
    before = champion.version if champion else None
    return Decision(
        model=gate.challenger.name,
        action="promote",
        outcome="promoted" if promote else "refused",
        challenger=gate.challenger.version,
        champion_before=before,
        champion_after=gate.challenger.version if promote else before,
        user=user,
        time=now(),
        metric=gate.metric,
        margin=gate.margin,
        challenger_metrics=mine,
        champion_metrics=theirs,
        checks=[asdict(c) for c in checks],
        reasons=reasons,
        data_version=gate.data_version,
        test_size=len(gate.split.labels),
        dry_run=dry_run,
    )


def _move(decision: Decision) -> str | None:
    return decision.challenger if decision.promoted else None


@contextlib.contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="transflow-promote-") as tmp:
        yield Path(tmp)


# --- rollback and history ------------------------------------------------------------------------------------


def rollback(
    tracker: Tracker, model_name: str, reason: str = "", *, dry_run: bool = False, user: str | None = None
) -> Decision:
    """Move `champion` back to the version it replaced (recorded on it at promotion), logged like a promotion."""
    require_model(tracker, model_name)
    with contextlib.nullcontext() if dry_run else registry_lock(tracker, model_name):
        current = tracker.alias_version(model_name, CHAMPION)
        if current is None:
            raise PromotionError(f"{model_name} has no champion to roll back")
        previous = require_version(tracker, model_name, current).tags.get(PREVIOUS_TAG, "none")
        if previous == "none":
            raise PromotionError(f"{model_name} v{current} was the first champion: there is no previous one")
        require_version(tracker, model_name, previous)
        note = f"rolled back from v{current} to v{previous}" + (f": {reason}" if reason else "")
        decision = Decision(
            model=model_name,
            action="rollback",
            outcome="rolled_back",
            challenger=None,
            champion_before=current,
            champion_after=previous,
            user=user or current_user(),
            time=now(),
            reasons=[note],
            dry_run=dry_run,
        )
        if dry_run:
            return decision
        stamp = {"promotion.time": decision.time, "promotion.user": decision.user}
        tags = {
            current: {**stamp, "promotion.outcome": "rolled_back", "promotion.rolled_back_to": previous},
            previous: {**stamp, "promotion.restored_from": current},
        }
        return record_decision(tracker, decision, tags, previous)


def history(tracker: Tracker, model_name: str) -> list[dict[str, Any]]:
    """Every decision on the model, oldest first: the decision record plus its log run id and status
    (FINISHED = applied; FAILED or RUNNING = the process or the server failed midway)."""
    runs = tracker.runs(model_name + LOG_SUFFIX)
    if not runs and not tracker.model_exists(model_name):
        raise PromotionError(f"no registered model named {model_name!r} and no promotion log for it")
    out = []
    with tempfile.TemporaryDirectory(prefix="transflow-history-") as tmp:
        for run in runs:
            raw = run.tags.get(DECISION_TAG)
            if raw is None:
                path = tracker.run_artifact(run.run_id, "decision.jsonl", Path(tmp) / run.run_id)
                raw = path.read_text() if path else "{}"
            out.append(json.loads(raw) | {"log_run_id": run.run_id, "run_status": run.status})
    return out


# --- lineage ---------------------------------------------------------------------------------------------------


def parse_target(target: str) -> tuple[str, str | None, str | None]:
    """`NAME@ALIAS`, `NAME/VERSION` or `models:/…` → (name, alias, version)."""
    ref = target.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    name, _, version = ref.rpartition("/")
    if name and version.isdigit():
        return name, None, version
    raise PromotionError(f"{target!r}: expected NAME@ALIAS or NAME/VERSION (e.g. tweets-sentiment@champion)")


def version_lineage(tracker: Tracker, target: str, depth: int = 0) -> dict[str, Any]:
    """bundle sha256 → model version → run → data version → git commit → backbone (→ the backbone's own)."""
    name, alias, version = parse_target(target)
    require_model(tracker, name)
    if alias:
        version = tracker.alias_version(name, alias)
        if version is None:
            raise PromotionError(f"{name} has no alias {alias!r}")
    record = require_version(tracker, name, str(version))
    tags = record.tags
    out: dict[str, Any] = {
        "bundle_sha256": tags.get("bundle_sha256"),
        "model": name,
        "version": record.version,
        "aliases": sorted(record.aliases),
        "run_id": record.run_id,
        "data_version": tags.get("data_version"),
        "git_commit": tags.get("git_commit"),
        "git_dirty": tags.get("git_dirty"),
        "config_hash": tags.get("config_hash"),
        "backbone": tags.get("backbone"),
    }
    backbone = tags.get("backbone") or ""
    if backbone.startswith("models:/") and depth < LINEAGE_DEPTH:
        try:
            parent = version_lineage(tracker, backbone, depth + 1)
            parent["resolved_now"] = "@" in backbone  # an alias names today's version, not the one trained on
            out["backbone_lineage"] = parent
        except PromotionError as exc:
            out["backbone_lineage"] = {"error": str(exc)}
    return out


def bundle_lineage(bundle: Path, tracker: Tracker | None) -> dict[str, Any]:
    """Verify a bundle (dir or .tar.gz), read its manifest's lineage, and cross-check it with the registry."""
    with tempfile.TemporaryDirectory(prefix="transflow-lineage-") as tmp:
        try:
            verified = read_bundle(bundle, Path(tmp) / "bundle")
        except BundleError as exc:
            raise PromotionError(f"{bundle}: bundle fails verification: {exc}") from None
    manifest = verified.manifest
    lineage = manifest.get("lineage") or {}
    out: dict[str, Any] = {
        "bundle": str(bundle),
        "bundle_sha256": verified.sha256,
        "bundle_verified": True,
        "model": manifest.get("name"),
        "version": str(manifest.get("version")),
        **{k: lineage.get(k) for k in ("data_version", "git_commit", "git_dirty", "config_hash", "backbone")},
    }
    if tracker is None or not out["model"]:
        return out
    try:
        registry = version_lineage(tracker, f"{out['model']}/{out['version']}")
    except Exception as exc:  # lineage from the manifest alone is still an answer
        return out | {"registry": {"error": f"{type(exc).__name__}: {exc}"}}
    agrees = registry["bundle_sha256"] == verified.sha256
    out |= {"run_id": registry["run_id"], "aliases": registry["aliases"], "registry": {"agrees": agrees}}
    if not agrees:
        out["registry"]["registered_bundle_sha256"] = registry["bundle_sha256"]
    if "backbone_lineage" in registry:
        out["backbone_lineage"] = registry["backbone_lineage"]
    return out
