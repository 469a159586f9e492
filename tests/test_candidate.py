"""A candidate beside the live model on real edge servers over loopback (uvicorn, onnxruntime): shadow leaves
the live answers as they were, canary answers a (sticky) share, promote / drop, restarts, refusals, /metrics."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from transflow_edge import candidate as candidate_module
from transflow_edge.bundle import pack
from transflow_edge.client import EdgeClient, EdgeError
from transflow_edge.server import Settings, create_app

from tests.edge_fixtures import TOKEN, build_text_bundle, running_server
from tests.rollout_fixtures import rebadge, texts

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("candidates")
    live = build_text_bundle(root / "v1", version="1")
    return {
        "live": live,
        "good": pack(rebadge(live, root / "v2", "2"), root / "v2.tar.gz"),
        "bad": pack(rebadge(live, root / "v3", "3", scramble=True), root / "v3.tar.gz"),
        "other": pack(build_text_bundle(root / "v4", version="4", seed=1), root / "v4.tar.gz"),
    }


def server(bundles: dict[str, Path], state_dir: Path, **kwargs: object) -> running_server:  # type: ignore[valid-type]
    kwargs.setdefault("bundle", bundles["live"])
    return running_server(create_app(Settings(state_dir=state_dir, token=TOKEN, intra_op_threads=1, **kwargs)))


def settle(client: EdgeClient, expected: int, timeout: float = 20) -> dict:
    """The candidate figures once the worker has looked at `expected` copies (compared or dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        figures = client.candidate()["figures"]
        if figures["candidate"]["requests"] + figures["dropped"] >= expected or time.monotonic() > deadline:
            return figures
        time.sleep(0.05)


def answers(url: str, bodies: list[list[str]]) -> list[bytes]:
    """The live answers as bytes, in request order, less the one field that differs run to run (the measured
    latency); 8 clients at a time (a loopback round trip costs ~45 ms here whatever the server does)."""
    with httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=8)) as http:

        def one(body: list[str]) -> bytes:
            answer = http.post("/v1/predict", json={"inputs": body}).json()
            answer.pop("latency_ms")
            return json.dumps(answer, sort_keys=True).encode()

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, bodies))


def test_shadow_leaves_1000_live_answers_byte_identical_and_scores_the_candidate(bundles, tmp_path: Path) -> None:
    bodies = texts(1000)
    with server(bundles, tmp_path / "s") as url, EdgeClient(url, token=TOKEN) as client:
        before = answers(url, bodies)
        installed = client.upload_candidate(bundles["bad"], "shadow")
        assert installed["status"] == "installed" and installed["candidate"]["version"] == "3"
        during = answers(url, bodies)
        figures = settle(client, len(bodies))
        info = client.model()
    assert during == before  # byte for byte: the live model answered every request, unchanged
    assert info["version"] == "1" and info["candidate"]["mode"] == "shadow"
    assert figures["candidate"]["requests"] + figures["dropped"] == len(bodies)
    assert figures["compared"] > 0 and figures["agreement"] == 0.0  # labels rotated: never the same class name
    assert figures["live"]["requests"] == len(bodies) and figures["candidate"]["errors"] == 0
    assert figures["p95_ratio"] is not None and figures["candidate"]["p95_ms"] > 0


def test_good_candidate_agrees_and_a_full_queue_drops_without_touching_live(bundles, tmp_path, monkeypatch) -> None:
    with server(bundles, tmp_path / "s") as url, EdgeClient(url, token=TOKEN) as client:
        client.upload_candidate(bundles["good"], "shadow")
        for body in texts(40):
            client.predict(body)
        assert settle(client, 40)["agreement"] == 1.0
        monkeypatch.setattr(candidate_module, "SHADOW_MAX_ITEMS", 0)  # nothing fits: every copy dropped, counted
        dropped_before = client.candidate()["figures"]["dropped"]
        for body in texts(20, seed=1):
            assert client.predict(body)["model"]["version"] == "1"
        figures = client.candidate()["figures"]
        metrics = httpx.get(f"{url}/metrics").text
    assert figures["dropped"] - dropped_before == 20
    assert 'transflow_edge_candidate_agreement_ratio{version="2"} 1.0' in metrics
    assert 'transflow_edge_version_requests_total{role="live",version="1"} 60.0' in metrics
    assert 'transflow_edge_candidate_dropped_total{version="2"} 20.0' in metrics


def test_canary_answers_its_share_sticky_on_a_header(bundles, tmp_path: Path) -> None:
    with server(bundles, tmp_path / "s") as url, EdgeClient(url, token=TOKEN) as client:
        client.upload_candidate(bundles["other"], "canary", fraction=0.5, sticky="X-Client")
        with httpx.Client(base_url=url, timeout=30) as http:

            def version(key: str | None) -> str:
                headers = {"X-Client": key} if key else {}
                return http.post("/v1/predict", json={"inputs": ["hi"]}, headers=headers).json()["model"]["version"]

            by_key = {k: {version(k) for _ in range(2)} for k in (f"client-{i}" for i in range(30))}
            unkeyed = [version(None) for _ in range(60)]
        figures = settle(client, 0)
        client.upload_candidate(bundles["other"], "canary", fraction=1.0)  # new options: all to the candidate
        all_in = {client.predict(["hi"])["model"]["version"] for _ in range(10)}
    assert all(len(v) == 1 for v in by_key.values())  # one client key, one version, every time
    share = sum(v == {"4"} for v in by_key.values()) / len(by_key)
    assert 0.2 < share < 0.8 and 12 < unkeyed.count("4") < 48
    assert figures["candidate"]["requests"] > 0 and figures["live"]["requests"] > 0
    assert all_in == {"4"}


def test_promote_drop_and_restarts_keep_the_candidate(bundles, tmp_path: Path) -> None:
    state = tmp_path / "s"
    with server(bundles, state) as url, EdgeClient(url, token=TOKEN) as client:
        live_sha = client.serving()
        cand_sha = client.upload_candidate(bundles["good"], "canary", fraction=0.25)["candidate"]["bundle_sha256"]
        assert client.upload_candidate(bundles["good"], "canary", fraction=0.25)["status"] == "unchanged"
    assert json.loads((state / "state.json").read_text())["candidate"]["sha256"] == cand_sha
    with server(bundles, state, bundle=None) as url, EdgeClient(url, token=TOKEN) as client:
        held = client.candidate()
        assert held["bundle_sha256"] == cand_sha and held["mode"] == "canary" and held["fraction"] == 0.25
        promoted = client.promote_candidate()
        assert promoted["bundle_sha256"] == cand_sha and promoted["previous_bundle_sha256"] == live_sha
        assert client.serving() == cand_sha and client.candidate() is None
        loads = httpx.get(f"{url}/metrics").text
        assert 'transflow_edge_bundle_loads_total{result="loaded",source="candidate"} 1.0' in loads
        assert not [ln for ln in loads.splitlines() if ln.startswith("transflow_edge_version_")]  # series gone
        with pytest.raises(EdgeError) as no_candidate:
            client.drop_candidate()
        assert no_candidate.value.status == 409
    with server(bundles, state, bundle=None) as url, EdgeClient(url, token=TOKEN) as client:
        assert client.serving() == cand_sha and client.candidate() is None
        assert client.rollback()["bundle_sha256"] == live_sha  # the old current is the previous, as after an upload
        client.upload_candidate(bundles["bad"], "shadow")
        bad_sha = client.candidate()["bundle_sha256"]
        assert (state / "bundles" / bad_sha).is_dir()
        assert client.drop_candidate()["status"] == "dropped"
        assert client.candidate() is None and not (state / "bundles" / bad_sha).exists()
        assert client.serving() == live_sha
    assert "candidate" not in json.loads((state / "state.json").read_text())


def test_candidate_calls_are_guarded_like_uploads(bundles, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.tar.gz"
    good = tmp_path / "good"
    rebadge(bundles["live"], good, "9")
    (good / "labels.json").write_text('["a", "b", "c"]\n')  # changed after the manifest was written
    pack(good, tampered)
    with server(bundles, tmp_path / "s") as url:
        live = EdgeClient(url, token=TOKEN).serving()
        cases = [
            (EdgeClient(url, token="wrong-token-0123456789"), {"archive": bundles["good"]}, 401),
            (EdgeClient(url, token=TOKEN), {"archive": bundles["good"], "mode": "mirror"}, 422),
            (EdgeClient(url, token=TOKEN), {"archive": bundles["good"], "mode": "canary", "fraction": 1.5}, 422),
            (EdgeClient(url, token=TOKEN), {"archive": bundles["good"], "sticky": "X Bad"}, 422),
            (EdgeClient(url, token=TOKEN), {"archive": tampered}, 422),
        ]
        for client, kwargs, status in cases:
            with pytest.raises(EdgeError) as refused:
                client.upload_candidate(**kwargs)
            assert refused.value.status == status, kwargs
        client = EdgeClient(url, token=TOKEN)
        live_archive = pack(bundles["live"], tmp_path / "live.tar.gz")
        with pytest.raises(EdgeError) as same:
            client.upload_candidate(live_archive)
        assert same.value.status == 409
        assert client.serving() == live and client.candidate() is None
        assert httpx.post(f"{url}/v1/admin/candidate/promote").status_code == 401
        assert httpx.post(f"{url}/v1/admin/candidate/keep", headers=client._admin()).status_code == 404
