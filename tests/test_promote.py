"""The registry lifecycle against a real `mlflow server` on loopback (started by mlflow/start-server.sh): the
promotion gate on two really trained versions (the retraining flow on real tweets in a real DVC repo, a tiny
random-weight BERT), rollback, the promotion log, lineage, idempotent registration, a race, bad input, and
the server dying midway.

Two versions are trained once per module (one barely trained, one trained properly). Most tests then work on
their own registered model whose versions are byte copies of those two runs (model dir, config.json, bundle),
so each test starts from a known registry state without training again.
"""

from __future__ import annotations

import itertools
import json
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.mlflow_server import MlflowServer, running_server

SMOKE = str(ROOT / "configs" / "smoke-text.yaml")
MODEL = "tiny-tweets"
# One epoch at a vanishing lr (the random head stays), fp32 only; versus a probe then full fine-tuning, with int8.
BAD = ("stages=[{kind: full, epochs: 1, lr: 1.0e-7}]", "export.int8=false")
GOOD = ("stages=[{kind: probe, epochs: 2, lr: 1.0e-2}, {kind: full, epochs: 3, lr: 3.0e-3}]",)
_names = itertools.count()


def integration(test: Callable) -> Callable:
    """Starts a real mlflow server and trains two tiny models (once per module)."""
    return pytest.mark.slow(pytest.mark.integration(test))


@pytest.fixture(scope="module", autouse=True)
def http_env() -> Iterator[None]:
    """Few, short client retries: a dead server must fail a call in seconds, not minutes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        mp.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with running_server(tmp_path_factory.mktemp("mlflow-server"), workers=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def tracker(server: MlflowServer) -> Any:
    from tasks.tracking import Tracker

    return Tracker(server.url)


def retrain_overrides(repo: Path, backbone: Path, out: Path, uri: str, extra: tuple[str, ...]) -> list[str]:
    return [
        f"data.path={repo / 'data'}",
        f"data.dvc_file={repo / 'data.dvc'}",
        f"backbone.uri={backbone}",
        f"output_dir={out}",
        f"registry.tracking_uri={uri}",
        f"registry.model_name={MODEL}",
        "evaluation.baselines=false",
        "training.device=cpu",
        "data.train_limit=400",
        "data.validation_limit=80",
        "data.test_limit=150",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(
    server: MlflowServer, tweets_repo: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """`tiny-tweets` v1 (barely trained) and v2 (trained), each with its exported, verified bundle."""
    from flows.retrain import retrain

    out = tmp_path_factory.mktemp("promote-runs")
    return {
        name: retrain(SMOKE, retrain_overrides(tweets_repo, tiny_bert_dir, out, server.url, extra))
        for name, extra in (("bad", BAD), ("good", GOOD))
    }


@dataclass
class Source:
    """A trained run's artifacts and registered tags, ready to be registered again under another model."""

    dir: Path
    tags: dict[str, str]


@pytest.fixture(scope="module")
def sources(tracker: Any, trained: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = {}
    for name, summary in trained.items():
        root = tmp_path_factory.mktemp(f"source-{name}")
        run = summary["run_id"]
        tracker.download(f"runs:/{run}/model", root)
        tracker.download(f"runs:/{run}/config.json", root)
        tracker.download(f"runs:/{run}/bundle/bundle.tar.gz", root / "bundle")
        tags = tracker.version_tags(MODEL, summary["model_version"])
        out[name] = Source(root, {k: v for k, v in tags.items() if not k.startswith("promotion.")})
    out["tampered"] = tampered_bundle(out["good"].dir / "bundle" / "bundle.tar.gz", tmp_path_factory.mktemp("bad"))
    return out


def tampered_bundle(archive: Path, work: Path) -> Path:
    """The good bundle with one label renamed after its manifest was written: a hash mismatch."""
    from transflow_edge.bundle import pack

    with tarfile.open(archive) as tar:
        tar.extractall(work / "unpacked", filter="data")
    labels = work / "unpacked" / "labels.json"
    labels.write_text(labels.read_text().replace("neutral", "meh"))
    return pack(work / "unpacked", work / "out" / "bundle.tar.gz")


def fresh_name() -> str:
    return f"gate-{next(_names)}"


def add_version(
    tracker: Any, sources: dict, model: str, which: str, tags: dict[str, str] | None = None, bundle: str = "own"
) -> str:
    """Register a copy of a trained run as a new version of `model` (a new run: registration is keyed by run)."""
    src: Source = sources[which]
    run = tracker.start_run("promote-tests", f"copy of {which}", {})
    tracker.log_artifacts(run, src.dir / "model", "model")
    tracker.log_artifacts(run, src.dir / "config.json")
    if bundle == "own":
        tracker.log_artifacts(run, src.dir / "bundle" / "bundle.tar.gz", "bundle")
    elif bundle == "tampered":
        tracker.log_artifacts(run, sources["tampered"], "bundle")
    tracker.end_run(run)
    return tracker.register(run, model, "model", src.tags | (tags or {}))


def promote(tracker: Any, model: str, version: str | None = None, **kwargs: Any) -> Any:
    from tasks.promote import promote_version

    return promote_version(tracker, model, version, **kwargs)


def snapshot(tracker: Any, model: str) -> dict[str, Any]:
    """Everything a promotion may change: aliases, version tags, the decision log, the lock."""
    from tasks.promote import LOG_SUFFIX
    from tasks.registered_version import CHAMPION
    from tasks.registry_lock import LOCK_SUFFIX

    if not tracker.model_exists(model):
        return {"exists": False, "log": [r.run_id for r in tracker.runs(model + LOG_SUFFIX)]}
    versions = tracker.version_numbers(model)
    return {
        "champion": tracker.alias_version(model, CHAMPION),
        "challenger": tracker.alias_version(model, "challenger"),
        "tags": {v: tracker.version_tags(model, v) for v in versions},
        "log": [r.run_id for r in tracker.runs(model + LOG_SUFFIX)],
        "lock": tracker.model_tags(model + LOCK_SUFFIX),
    }


# --- the gate's pure logic (no server) ----------------------------------------------------------------------


def test_compare_needs_a_strict_win_of_at_least_the_margin() -> None:
    from tasks.registry_gate import compare

    assert compare("macro_f1", 0.5, None, 0.0).ok  # no champion yet
    assert not compare("macro_f1", 0.5, 0.5, 0.0).ok  # a tie never moves the champion
    assert not compare("macro_f1", 0.55, 0.5, 0.1).ok and "margin 0.1" in compare("macro_f1", 0.55, 0.5, 0.1).detail
    assert compare("macro_f1", 0.61, 0.5, 0.1).ok
    assert not compare("accuracy", 0.4, 0.5, 0.0).ok


@pytest.mark.parametrize(
    ("tags", "ok", "detail"),
    [
        ({"onnx.parity_passed": "true", "onnx.int8_shipped": "false"}, True, "fp32 ships"),
        ({"onnx.parity_passed": "true", "onnx.int8_shipped": "true", "onnx.int8_delta_pt": "0.2"}, True, "within"),
        ({"onnx.parity_passed": "true", "onnx.int8_shipped": "true", "onnx.int8_delta_pt": "3.5"}, False, "exceeds"),
        ({"onnx.parity_passed": "true", "onnx.int8_shipped": "true"}, False, "not recorded"),
        ({"onnx.parity_passed": "false", "onnx.int8_shipped": "false"}, False, "parity not passed"),
        ({}, False, "parity not passed"),
    ],
)
def test_export_conditions_from_tags(tags: dict[str, str], ok: bool, detail: str) -> None:
    from tasks.registry_gate import decide, tag_checks

    promote_it, reasons = decide(tag_checks(tags, int8_budget_pt=0.5))
    assert promote_it is ok and any(detail in r for r in reasons)


def test_decision_tags_record_previous_champion_and_both_sides() -> None:
    from tasks.promote import promotion_tags
    from tasks.registry_gate import Decision

    base = {"model": "m", "action": "promote", "user": "u", "time": "t", "metric": "macro_f1"}
    first = Decision(**base, outcome="promoted", challenger="1", champion_before=None, champion_after="1")
    assert promotion_tags(first)["1"]["promotion.previous_champion"] == "none"
    won = Decision(**base, outcome="promoted", challenger="3", champion_before="2", champion_after="3")
    assert promotion_tags(won)["3"]["promotion.previous_champion"] == "2"
    assert promotion_tags(won)["2"]["promotion.replaced_by"] == "3"
    lost = Decision(**base, outcome="refused", challenger="4", champion_before="3", champion_after="3")
    assert promotion_tags(lost)["3"] == {
        "promotion.time": "t",
        "promotion.user": "u",
        "promotion.defended_against": "4",
    }
    raced = Decision(**base, outcome="refused", challenger="3", champion_before="3", champion_after="3")
    assert promotion_tags(raced) == {}  # made champion by a concurrent promotion: its tags are left alone


def test_targets_and_event_uris() -> None:
    from flows.promote import _without_credentials
    from tasks.lineage import parse_target
    from tasks.registered_version import RegistryError

    assert parse_target("m@champion") == ("m", "champion", None)
    assert parse_target("models:/m/3") == ("m", None, "3")
    with pytest.raises(RegistryError, match="NAME@ALIAS"):
        parse_target("just-a-name")
    assert _without_credentials("https://alice:secret@mlflow.example.com/x") == "https://mlflow.example.com/x"


# --- the gate on the two trained versions ------------------------------------------------------------------


def cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})  # no wrapping inside ids and hashes


@integration
def test_lifecycle_first_champion_better_challenger_then_rollback(tracker: Any, trained: dict, server: Any) -> None:
    """On the versions the retraining flow registered: v1 becomes champion, v2 beats it, rollback restores v1."""
    bad, good = trained["bad"], trained["good"]
    v1, v2 = bad["model_version"], good["model_version"]
    first = promote(tracker, MODEL, v1)
    assert first.promoted and first.champion_before is None and first.champion_after == v1
    assert {c["name"]: c["detail"] for c in first.checks}["int8"] == "fp32 ships as the default model"
    second = promote(tracker, MODEL)  # the default: alias `challenger`, the last registered version
    assert second.promoted, second.reasons
    assert (second.challenger, second.champion_before, tracker.alias_version(MODEL, "champion")) == (v2, v1, v2)
    # re-evaluated on the same test split the flow tested on: the same numbers, not read from tags
    assert second.challenger_metrics["macro_f1"] == pytest.approx(good["test"]["macro_f1"], abs=1e-4)
    assert second.champion_metrics["macro_f1"] == pytest.approx(bad["test"]["macro_f1"], abs=1e-4)
    assert second.data_version == good["data_version"] and second.test_size == good["sizes"]["test"]
    assert {c["name"] for c in second.checks} == {
        "bundle",
        "same_data",
        "same_labels",
        "onnx_parity",
        "int8",
        "beats_baselines",
        "beats_champion",
        "significant",  # the candidate report's verdict (not required by default)
    }
    baseline = {c["name"]: c for c in second.checks}["beats_baselines"]  # its run evaluated no baselines
    assert baseline["ok"] and "no baselines were evaluated" in baseline["detail"]
    tags = tracker.version_tags(MODEL, v2)
    assert tags["promotion.outcome"] == "promoted" and tags["promotion.previous_champion"] == v1
    assert tags["promotion.user"] == second.user and tags["promotion.log_run_id"] == second.log_run_id
    assert tracker.version_tags(MODEL, v1)["promotion.replaced_by"] == v2

    dry = cli("rollback", MODEL, "--dry-run", "--tracking-uri", server.url)
    assert dry.exit_code == 0 and tracker.alias_version(MODEL, "champion") == v2
    done = cli("rollback", MODEL, "--reason", "latency regression", "--tracking-uri", server.url)
    assert done.exit_code == 0, done.output
    assert f"rolled back from v{v2} to v{v1}" in done.stdout and tracker.alias_version(MODEL, "champion") == v1
    assert tracker.version_tags(MODEL, v2)["promotion.outcome"] == "rolled_back"
    again = cli("rollback", MODEL, "--tracking-uri", server.url)
    assert again.exit_code == 2 and "first champion" in again.stderr  # one `error:` line (flows/cli_errors.py)
    assert tracker.alias_version(MODEL, "champion") == v1

    shown = cli("promote", "--history", MODEL, "--tracking-uri", server.url)
    assert shown.exit_code == 0, shown.output
    log = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [(e["action"], e["outcome"], e["champion_before"], e["champion_after"]) for e in log] == [
        ("promote", "promoted", None, v1),
        ("promote", "promoted", v1, v2),
        ("rollback", "rolled_back", v2, v1),
    ]
    assert log[1]["champion_metrics"] == second.champion_metrics and log[1]["log_run_id"] == second.log_run_id
    assert log[2]["reasons"] == [f"rolled back from v{v2} to v{v1}: latency regression"]
    assert all(e["user"] and e["time"] and e["run_status"] == "FINISHED" for e in log)


@integration
def test_gate_refuses_a_worse_challenger_and_a_tie(
    tracker: Any, sources: dict, server: Any, tweets_repo: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    from flows.promote import auto_promote
    from runconfig import load_config
    from tasks.promote import history

    model = fresh_name()
    champion = add_version(tracker, sources, model, "good")
    assert promote(tracker, model).promoted
    worse = add_version(tracker, sources, model, "bad")
    settings = [
        *retrain_overrides(tweets_repo, tiny_bert_dir, tmp_path, server.url, BAD),
        f"registry.model_name={model}",
    ]
    cfg = load_config(SMOKE, settings)
    outcome = auto_promote(tracker, cfg.registry.model_name, worse, cfg.training.device, tmp_path)  # what retrain runs
    decision = SimpleNamespace(**outcome, promoted=outcome["outcome"] == "promoted")
    assert not decision.promoted and decision.challenger == worse
    assert decision.champion_after == champion == tracker.alias_version(model, "champion")
    assert decision.challenger_metrics["macro_f1"] < decision.champion_metrics["macro_f1"]
    assert len(decision.reasons) == 1 and "does not win" in decision.reasons[0]
    assert tracker.version_tags(model, worse)["promotion.outcome"] == "refused"
    assert tracker.version_tags(model, champion)["promotion.defended_against"] == worse
    twin = add_version(tracker, sources, model, "good")
    tie = promote(tracker, model, twin)  # the very same weights: equal scores
    assert not tie.promoted and tie.challenger_metrics == tie.champion_metrics
    assert [e["outcome"] for e in history(tracker, model)] == ["promoted", "refused", "refused"]


@integration
def test_failed_export_conditions_refuse_even_a_first_version(tracker: Any, sources: dict) -> None:
    model = fresh_name()
    for tags, reason in (
        ({"onnx.parity_passed": "false"}, "ONNX parity not passed"),
        ({"onnx.int8_shipped": "true", "onnx.int8_delta_pt": "3.5"}, "exceeds budget"),
    ):
        add_version(tracker, sources, model, "good", tags)
        decision = promote(tracker, model)
        assert not decision.promoted and any(reason in r for r in decision.reasons), decision.reasons
        assert tracker.alias_version(model, "champion") is None


@integration
def test_cli_dry_run_changes_nothing_and_exit_codes(tracker: Any, sources: dict, server: Any) -> None:
    model = fresh_name()
    add_version(tracker, sources, model, "good")
    before = snapshot(tracker, model)
    dry = cli("promote", model, "--dry-run", "--json", "--tracking-uri", server.url)
    assert dry.exit_code == 0, dry.output
    decided = json.loads(dry.stdout[dry.stdout.index("{") :])
    assert decided["outcome"] == "promoted" and decided["dry_run"] and decided["log_run_id"] is None
    assert snapshot(tracker, model) == before
    done = cli("promote", model, "--tracking-uri", server.url)
    assert done.exit_code == 0 and "PROMOTED" in done.stdout
    add_version(tracker, sources, model, "bad")
    refused = cli("promote", model, "--tracking-uri", server.url)
    assert refused.exit_code == 1 and "REFUSED" in refused.stdout
    unknown = cli("promote", "no-such-model", "--tracking-uri", server.url)
    assert unknown.exit_code == 2 and "error: no registered model named 'no-such-model'" in unknown.stderr


@integration
def test_lineage_from_alias_and_from_bundle(
    tracker: Any, trained: dict, sources: dict, server: Any, tweets_repo: Path, tiny_bert_dir: Path
) -> None:
    good = trained["good"]
    shown = cli("lineage", f"{MODEL}/{good['model_version']}", "--json", "--tracking-uri", server.url)
    assert shown.exit_code == 0, shown.output
    chain = json.loads(shown.stdout)
    pinned = (tweets_repo / "data.dvc").read_text().split("md5: ")[1].split(".dir")[0]
    assert chain["bundle_sha256"] == good["export"]["bundle_sha256"]
    assert (chain["run_id"], chain["data_version"], chain["backbone"]) == (good["run_id"], pinned, str(tiny_bert_dir))
    assert len(chain["git_commit"]) == 40 or chain["git_commit"] == "unknown"
    for bundle in (good["export"]["bundle_dir"], good["export"]["bundle_tar"]):
        from_bundle = cli("lineage", "--bundle", bundle, "--json", "--tracking-uri", server.url)
        assert from_bundle.exit_code == 0, from_bundle.output
        assert json.loads(from_bundle.stdout) | {"bundle": None} == {
            **{k: chain[k] for k in ("bundle_sha256", "model", "version", "run_id", "aliases", "data_version")},
            **{k: chain[k] for k in ("git_commit", "git_dirty", "config_hash", "backbone")},
            "bundle": None,
            "bundle_verified": True,
            "registry": {"agrees": True},
        }
    tree = cli("lineage", f"{MODEL}/{good['model_version']}", "--tracking-uri", server.url)
    assert tree.exit_code == 0 and good["run_id"] in tree.stdout and pinned in tree.stdout
    # a backbone from the registry: its own lineage follows
    model = fresh_name()
    add_version(tracker, sources, model, "good", {"backbone": f"models:/{MODEL}/{good['model_version']}"})
    nested = version_chain(tracker, f"{model}@challenger")
    assert nested["backbone_lineage"]["run_id"] == good["run_id"] and not nested["backbone_lineage"]["resolved_now"]


def version_chain(tracker: Any, target: str) -> dict[str, Any]:
    from tasks.lineage import version_lineage

    return version_lineage(tracker, target)


# --- reliability --------------------------------------------------------------------------------------------


@integration
def test_registration_is_idempotent_under_retry(tracker: Any, sources: dict) -> None:
    from prefect import flow, task

    model, src = fresh_name(), sources["good"]
    run = tracker.start_run("promote-tests", "registered twice", {})
    tracker.log_artifacts(run, src.dir / "model", "model")
    attempts: list[str] = []

    @task(retries=2, retry_delay_seconds=0)
    def register_then_lose_the_answer() -> str:
        attempts.append(tracker.register(run, model, "model", src.tags))
        if len(attempts) == 1:  # the server registered, but the client never heard back
            raise ConnectionError("connection reset after create_model_version")
        return attempts[-1]

    @flow
    def registration() -> str:
        return register_then_lose_the_answer()

    version = registration()
    assert attempts == [version, version]
    assert tracker.register(run, model, "model", src.tags) == version  # the whole flow re-run after a crash
    assert tracker.version_numbers(model) == [version] == [tracker.alias_version(model, "challenger")]


@integration
def test_two_racing_promotions_leave_one_champion_and_both_decisions(tracker: Any, sources: dict) -> None:
    from tasks.promote import history
    from tasks.registry_lock import LOCK_SUFFIX

    model = fresh_name()
    add_version(tracker, sources, model, "bad")
    assert promote(tracker, model).promoted
    racers = [add_version(tracker, sources, model, "good") for _ in range(2)]
    results: dict[str, Any] = {}
    start = threading.Barrier(2)

    def race(version: str) -> None:
        start.wait()
        try:
            results[version] = promote(tracker, model, version)
        except Exception as exc:  # surfaced by the assertion below
            results[version] = exc

    threads = [threading.Thread(target=race, args=(v,)) for v in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    decisions = [results[v] for v in racers]
    assert all(not isinstance(d, Exception) for d in decisions), decisions
    assert sorted(d.outcome for d in decisions) == ["promoted", "refused"]  # identical models: the second ties
    winner = next(d for d in decisions if d.promoted)
    loser = next(d for d in decisions if not d.promoted)
    assert tracker.alias_version(model, "champion") == winner.challenger
    assert loser.champion_before == winner.challenger  # judged against the new champion, not the stale one
    log = history(tracker, model)
    assert sorted(e["log_run_id"] for e in log[1:]) == sorted(d.log_run_id for d in decisions)
    assert tracker.tickets(model + LOCK_SUFFIX) == []  # both released the lock


# --- bad input: a clear error, and nothing changed -----------------------------------------------------------

BAD_INPUTS: list[tuple[str, Callable[[Any, dict, str], str | None], str]] = [
    ("unknown model", lambda t, s, m: None, "no registered model named"),
    ("unknown version", lambda t, s, m: "99", "has no version 99"),
    ("version not a number", lambda t, s, m: "latest", "must be a number"),
    ("bundle missing", lambda t, s, m: add_version(t, s, m, "good", bundle="none"), "has no bundle/bundle.tar.gz"),
    ("bundle tampered", lambda t, s, m: add_version(t, s, m, "good", bundle="tampered"), "fails verification"),
    (
        "bundle not the registered one",
        lambda t, s, m: add_version(t, s, m, "good", {"bundle_sha256": "0" * 64}),
        "is not the registered one",
    ),
    (
        "other label set",
        lambda t, s, m: add_version(t, s, m, "good", {"classes": '["negative", "positive"]'}),
        "different label set",
    ),
    (
        "other data version",
        lambda t, s, m: add_version(t, s, m, "good", {"data_version": "0" * 32}),
        "check out the matching data",
    ),
]


@pytest.fixture(scope="module")
def guarded_model(tracker: Any, sources: dict) -> str:
    model = fresh_name()
    add_version(tracker, sources, model, "bad")
    assert promote(tracker, model).promoted
    return model


@integration
@pytest.mark.parametrize(("case", "make", "error"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_error_and_changes_nothing(
    tracker: Any, sources: dict, guarded_model: str, case: str, make: Callable, error: str
) -> None:
    from tasks.registered_version import RegistryError

    model = "no-such-model" if case == "unknown model" else guarded_model
    version = make(tracker, sources, model)
    before = snapshot(tracker, model)
    with pytest.raises(RegistryError, match=error):
        promote(tracker, model, version)
    assert snapshot(tracker, model) == before


# --- the server dies midway (last: it restarts the module's server) --------------------------------------------


@integration
def test_server_down_midway_leaves_the_previous_champion(
    tracker: Any, sources: dict, server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.registry_lock
    from tasks.promote import history
    from tasks.tracking import Tracker

    model = fresh_name()
    champion = add_version(tracker, sources, model, "bad")
    assert promote(tracker, model).promoted
    challenger = add_version(tracker, sources, model, "good")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tasks.registry_lock, "LEASE_S", 2.0)  # the dead holder's lease runs out quickly
    move = Tracker.set_alias

    def server_dies_first(self: Any, name: str, alias: str, version: str) -> None:
        server.stop()
        move(self, name, alias, version)

    monkeypatch.setattr(Tracker, "set_alias", server_dies_first)
    with pytest.raises(Exception, match=r"(?i)connect|refused|max retries"):
        promote(tracker, model)
    monkeypatch.setattr(Tracker, "set_alias", move)
    server.start()
    assert tracker.alias_version(model, "champion") == champion
    log = history(tracker, model)  # the decision was recorded as intent before the server went: not yet applied
    assert [(e["outcome"], e["run_status"]) for e in log] == [("promoted", "FINISHED"), ("promoted", "RUNNING")]
    recovered = cli("promote", model, "--recover", "--tracking-uri", server.url)  # after the dead lease ran out
    assert recovered.exit_code == 0 and "completed promote" in recovered.stdout, recovered.output
    assert tracker.alias_version(model, "champion") == challenger
    assert tracker.version_tags(model, challenger)["promotion.previous_champion"] == champion
    assert [e["run_status"] for e in history(tracker, model)] == ["FINISHED", "FINISHED"]
    again = cli("promote", model, "--recover", "--tracking-uri", server.url)
    assert again.exit_code == 0 and "nothing half-done" in again.stdout


def test_start_server_script_refuses_unknown_options() -> None:
    import subprocess

    proc = subprocess.run(
        ["bash", str(ROOT / "mlflow" / "start-server.sh"), "--no-such-option"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown option --no-such-option" in proc.stderr


@integration
def test_basic_auth_server_requires_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`start-server.sh --basic-auth` writes its auth config and CSRF key (private), rejects anonymous calls, and
    the promotion lock works for a user who passes credentials the documented way."""
    import httpx

    from tasks.tracking import Tracker

    config = tmp_path / "auth" / "basic_auth.ini"
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-Passw0rd!"}
    with running_server(tmp_path / "server", extra_env=env, script_args=("--basic-auth",)) as srv:
        endpoint = f"{srv.url}/api/2.0/mlflow/experiments/search"
        assert httpx.post(endpoint, json={"max_results": 1}).status_code == 401
        ok = httpx.post(endpoint, json={"max_results": 1}, auth=("admin", env["MLFLOW_AUTH_ADMIN_PASSWORD"]))
        assert ok.status_code == 200
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", env["MLFLOW_AUTH_ADMIN_PASSWORD"])
        tracker = Tracker(srv.url)
        assert tracker.create_unique("m.promotion-lock", {"token": "t"})
        assert not tracker.create_unique("m.promotion-lock", {"token": "u"})
        tracker.delete_model("m.promotion-lock")
        assert tracker.model_tags("m.promotion-lock") is None
    assert "NO_PERMISSIONS" in config.read_text()
    for private in (config, config.parent / "flask_secret_key"):
        assert private.stat().st_mode & 0o077 == 0


USER_PROMOTES = """
import sys
from tasks.promote import promote_version
from tasks.tracking import Tracker
print("DECISION " + promote_version(Tracker(sys.argv[1]), sys.argv[2], sys.argv[3]).to_json(), flush=True)
"""


@integration
def test_two_users_of_a_basic_auth_server_promote_concurrently(
    sources: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice and bob, each with only the grants mlflow/README.md lists, promote at the same moment (two
    processes): exactly one champion move, both decisions logged under their names, neither sees a 403."""
    import os
    import subprocess
    import sys

    from mlflow.server import get_app_client

    from tasks.promote import history
    from tasks.registry_lock import LOCK_SUFFIX, LOG_SUFFIX, prepare
    from tasks.tracking import Tracker

    secret = "s3cret-Passw0rd!"
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth" / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": secret}
    with running_server(tmp_path / "server", extra_env=env, script_args=("--basic-auth",)) as srv:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
        admin, model = Tracker(srv.url), fresh_name()
        first = add_version(admin, sources, model, "bad")
        assert promote(admin, model).promoted and admin.alias_version(model, "champion") == first
        racers = [add_version(admin, sources, model, "good") for _ in range(2)]
        prepare(admin, model)  # `transflow promote MODEL --prepare`: the lock model and the log experiment
        auth, client = get_app_client("basic-auth", tracking_uri=srv.url), admin.client
        experiments = {n: client.get_experiment_by_name(n).experiment_id for n in ("promote-tests", model + LOG_SUFFIX)}
        for user in ("alice", "bob"):
            auth.create_user(user, f"{user}-long-Passw0rd!")
            auth.grant_user_permission(user, "registered_model", model, "MANAGE")
            auth.grant_user_permission(user, "registered_model", model + LOCK_SUFFIX, "MANAGE")
            auth.grant_user_permission(user, "experiment", experiments[model + LOG_SUFFIX], "EDIT")
            auth.grant_user_permission(user, "experiment", experiments["promote-tests"], "READ")  # the versions' runs
        procs = []
        for user, version in zip(("alice", "bob"), racers, strict=True):
            user_env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_USERNAME": user,
                        "MLFLOW_TRACKING_PASSWORD": f"{user}-long-Passw0rd!"}  # fmt: skip
            cmd = [sys.executable, "-c", USER_PROMOTES, srv.url, model, version]
            procs.append(subprocess.Popen(cmd, env=user_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outputs = [p.communicate(timeout=900)[0].decode() for p in procs]  # auth hashes a password per request
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
        decisions = [json.loads(o.split("DECISION ", 1)[1].splitlines()[0]) for o in outputs]
        assert sorted(d["outcome"] for d in decisions) == ["promoted", "refused"]  # the same weights: a tie
        winner = next(d for d in decisions if d["outcome"] == "promoted")
        assert admin.alias_version(model, "champion") == winner["challenger"]
        log = history(admin, model)
        assert [(e["user"], e["outcome"]) for e in log[1:]] == [
            (d["user"], d["outcome"]) for d in sorted(decisions, key=lambda d: d["time"])
        ]
        assert {e["user"] for e in log[1:]} == {"alice", "bob"} and all(e["run_status"] == "FINISHED" for e in log)
        assert sum(e["champion_before"] != e["champion_after"] for e in log) == 2  # first champion + one move
