"""Staged rollout (`transflow deploy --strategy shadow|canary --waves 1,rest`) against four real edge servers on
loopback under live traffic, with a real MLflow sqlite registry: a scrambled-labels candidate is dropped after
wave 1 and never reaches the others; a good one reaches all; a flow killed mid-wave leaves every server on a
known version and a rerun completes the wave. Plus the waves and the rules on their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from transflow_edge.bundle import pack
from transflow_edge.server import Settings, create_app
from typer.testing import CliRunner

from flows.deploy import DeployError, DeployInputError, Target, deploy
from flows.deploy_waves import check_rollout
from tasks.rollout import RolloutRules, judge, parse_waves, tag_key
from tasks.tracking import Tracker
from tests.conftest import ROOT
from tests.edge_fixtures import TOKEN, build_text_bundle, running_server
from tests.rollout_fixtures import rebadge, send_traffic
from tests.test_deploy import register, sha_of

NAME = "tweets-sentiment"
SERVERS = 4
RULES = {"window_s": 1.5, "min_samples": 10, "max_p95_ratio": 50.0}  # latency is not what these tests judge


# ---------------------------------------------------------------- the rules, without servers


def test_waves_cover_every_target_in_order() -> None:
    assert parse_waves("1,rest", 5) == [[0], [1, 2, 3, 4]]
    assert parse_waves("1,25%,rest", 8) == [[0], [1, 2], [3, 4, 5, 6, 7]]
    assert parse_waves("1,rest", 1) == [[0]]
    assert parse_waves("2,3", 5) == [[0, 1], [2, 3, 4]]
    for bad in ("", "rest,1", "1,2", "x,rest"):
        with pytest.raises(ValueError):
            parse_waves(bad, 5)


def test_judge_applies_each_rule() -> None:
    rules = RolloutRules(min_samples=10, min_agreement=0.9, max_error_rate=0.05, max_p95_ratio=1.5)
    good = {"compared": 50, "agreement": 0.96, "p95_ratio": 1.1, "candidate": {"error_rate": 0.0}}
    assert judge(good, rules)[0]
    for change, words in [
        ({"compared": 5}, "5 inputs compared"),
        ({"agreement": 0.5}, "agreement 0.500 < 0.9"),
        ({"agreement": None}, "agreement n/a"),
        ({"candidate": {"error_rate": 0.2}}, "error rate 0.200 > 0.05"),
        ({"p95_ratio": 3.0}, "p95 ratio 3.00 > 1.5"),
    ]:
        ok, reasons = judge(good | change, rules)
        assert not ok and reasons[0].startswith(words), reasons
    assert judge(good | {"p95_ratio": None}, rules)[0]  # not measured is said, not failed


def test_bad_rollout_input_is_refused_before_anything_is_fetched() -> None:
    http = [Target.parse("http://127.0.0.1:1"), Target.parse("http://127.0.0.1:2")]
    for targets, strategy, waves, rules, words in [
        (http, "blue-green", "1,rest", None, "expected direct, shadow or canary"),
        ([*http, Target.parse("dir:///tmp/x")], "shadow", "1,rest", None, "not folders"),
        (http, "canary", "1", None, "covers 1 of 2 targets"),
        (http, "canary", "1,rest", {"window": 5}, "window"),
        (http, "canary", "1,rest", {"fraction": 2}, "fraction"),
    ]:
        with pytest.raises(DeployInputError, match=words):
            check_rollout(targets, strategy, waves, rules)
    assert check_rollout(http, "shadow", "1,rest", {"window_s": 5})[1] == [[0], [1]]


# ---------------------------------------------------------------- four servers under traffic


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """v1 live everywhere; v2 the same model rebadged (good); v3 with labels scrambled (bad)."""
    root = tmp_path_factory.mktemp("rollout")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri)
    live = build_text_bundle(root / "v1", version="1")
    dirs = {"1": live, "2": rebadge(live, root / "v2", "2"), "3": rebadge(live, root / "v3", "3", scramble=True)}
    for v, alias in (("1", "champion"), ("2", "challenger"), ("3", "scrambled")):
        (root / f"a{v}").mkdir()  # the run artifact must be bundle/bundle.tar.gz
        assert register(tracker, pack(dirs[v], root / f"a{v}" / "bundle.tar.gz"), sha_of(dirs[v]), alias) == v
    return {"uri": uri, "tracker": tracker, "live": live, "shas": {v: sha_of(d) for v, d in dirs.items()}}


@pytest.fixture
def fleet(registry: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Four servers serving v1 and a steady stream of requests to each, from 4 client threads."""
    monkeypatch.setenv("TRANSFLOW_EDGE_TOKEN", TOKEN)
    settings = [Settings(bundle=registry["live"], state_dir=tmp_path / f"s{i}", token=TOKEN, intra_op_threads=1)
                for i in range(SERVERS)]  # fmt: skip
    contexts = [running_server(create_app(s)) for s in settings]
    urls = [ctx.__enter__() for ctx in contexts]
    stop = threading.Event()

    threads = [threading.Thread(target=send_traffic, args=(urls, stop, k), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    yield urls
    stop.set()
    for t in threads:
        t.join(timeout=30)
    for ctx in reversed(contexts):
        ctx.__exit__(None, None, None)


def info(url: str) -> dict:
    return httpx.get(f"{url}/v1/model", timeout=10).json()


def candidate_calls(url: str) -> float:
    """POSTs a server answered on /v1/admin/candidate, from its /metrics."""
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    ours = [line for line in lines if line.startswith('transflow_edge_requests_total{endpoint="/v1/admin/candidate"')]
    return sum(float(line.split()[-1]) for line in ours)


def test_scrambled_candidate_is_dropped_after_wave_one_and_never_reaches_the_others(fleet, registry) -> None:
    with pytest.raises(DeployError) as failure:
        deploy(f"{NAME}@scrambled", fleet, tracking_uri=registry["uri"], strategy="shadow", rules=RULES)
    message = str(failure.value)
    assert "stopped in wave 1" in message and "judged bad" in message and "agreement 0.000" in message, message
    for url in fleet:
        now = info(url)
        assert now["version"] == "1" and now["candidate"] is None
    assert candidate_calls(fleet[0]) == 1 and all(candidate_calls(u) == 0 for u in fleet[1:])
    tags = registry["tracker"].version_tags(NAME, "3")
    steps = json.loads(tags[tag_key(fleet[0])])
    assert [s["step"] for s in steps] == ["candidate", "judged", "dropped"]
    judged = steps[1]
    assert judged["verdict"] == "fail" and judged["figures"]["agreement"] == 0.0 and judged["who"]
    assert judged["from"] == registry["shas"]["1"] and judged["to"] == registry["shas"]["3"]
    assert not any(tag_key(u) in tags for u in fleet[1:])
    assert tags["rollout.status"] == "failed" and tags["deploy.status"] == "failed"
    first, gone = (datetime.fromisoformat(steps[i]["time"]) for i in (0, -1))
    assert (gone - first).total_seconds() < 20  # the window (1.5 s) plus judging and dropping, on a busy box


def test_good_candidate_reaches_every_server_through_the_cli(fleet, registry) -> None:
    from flows.cli import app

    rules = ["--window-s", "1.5", "--min-samples", "10", "--max-p95-ratio", "50"]
    args = ["deploy", f"{NAME}@challenger", *[a for u in fleet for a in ("--target", u)], "--strategy", "canary",
            "--fraction", "0.5", "--sticky", "X-Client", "--waves", "1,rest", "--json", *rules,
            "--tracking-uri", registry["uri"]]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout[result.stdout.index("{") :])
    assert outcome["status"] == "deployed" and outcome["strategy"] == "canary"
    assert [(r["wave"], r["status"]) for r in outcome["results"]] == [(1, "promoted")] + [(2, "promoted")] * 3
    for url in fleet:
        now = info(url)
        assert now["version"] == "2" and now["candidate"] is None
        assert now["previous_bundle_sha256"] == registry["shas"]["1"]
    tags = registry["tracker"].version_tags(NAME, "2")
    for url in fleet:
        steps = json.loads(tags[tag_key(url)])
        assert [s["step"] for s in steps][-3:] == ["candidate", "judged", "promoted"]
        assert steps[-2]["verdict"] == "pass" and steps[-2]["figures"]["agreement"] == 1.0
    assert tags["rollout.status"] == "deployed" and tags["rollout.strategy"] == "canary"


KILLED_RUN = """
import sys
from flows.deploy import deploy
deploy("{name}@challenger", {targets!r}, tracking_uri={uri!r}, strategy="shadow",
       rules={{"window_s": 600, "min_samples": 10, "max_p95_ratio": 50.0}})
"""


def test_a_flow_killed_mid_wave_leaves_known_versions_and_a_rerun_completes(fleet, registry, tmp_path) -> None:
    code = KILLED_RUN.format(name=NAME, targets=fleet, uri=registry["uri"])
    from prefect.server.api.server import SubprocessASGIServer

    # The killed run reports to this process's temporary Prefect server rather than starting its own (~30 s here).
    (api := SubprocessASGIServer()).start()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api.api_url}
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log, stderr=log,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while (info(fleet[0]).get("candidate") or {}).get("version") != "2":
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never put the candidate on wave 1"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    for url in fleet:  # every server answers with its live version; only wave 1 holds the candidate
        now = info(url)
        assert now["version"] == "1"
        assert httpx.post(f"{url}/v1/predict", json={"inputs": ["still v1?"]}).json()["model"]["version"] == "1"
    assert info(fleet[0])["candidate"]["version"] == "2" and all(info(u)["candidate"] is None for u in fleet[1:])

    outcome = deploy(f"{NAME}@challenger", fleet, tracking_uri=registry["uri"], strategy="shadow", rules=RULES)
    assert outcome["status"] == "deployed"
    assert [s["step"] for s in outcome["steps"] if s["target"] == fleet[0]] == ["resumed", "candidate", "judged",
                                                                                 "promoted"]  # fmt: skip
    assert outcome["steps"][1]["status"] == "unchanged"  # the same candidate kept, with the figures it had
    assert all(info(u)["version"] == "2" and info(u)["candidate"] is None for u in fleet)
