"""The deploy flow against real edge servers on loopback and a real MLflow sqlite registry in a temp dir.

Versions are registered the way the retraining flow does it (bundle archive as run artifact `bundle/bundle.tar.gz`,
`bundle_sha256` tag), with tiny real bundles from tests/edge_fixtures.py instead of trained models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from transflow_edge.bundle import pack
from transflow_edge.server import Settings, create_app
from typer.testing import CliRunner

from flows.deploy import DeployError, Fetched, Target, deploy, restore
from tasks.tracking import Tracker
from tests.edge_fixtures import TOKEN, build_text_bundle, free_port, running_server

pytestmark = pytest.mark.integration

NAME = "tweets-sentiment"
OTHER_TOKEN = "another-token-0123456789abcdef"


def sha_of(bundle_dir: Path) -> str:
    return hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()


def register(tracker: Tracker, archive: Path | None, sha: str, alias: str) -> str:
    """A registered version whose run holds `archive` as `bundle/bundle.tar.gz` (no artifact when None)."""
    run_id = tracker.start_run("deploy-tests", alias, {})
    if archive is not None:
        tracker.log_artifacts(run_id, archive, "bundle")
    version = tracker.register(run_id, NAME, "bundle", {}, alias=alias)
    tracker.tag_version(NAME, version, {"bundle_sha256": sha, "exported": "true"})
    tracker.end_run(run_id)
    return version


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """v1 (`champion`) and v2 (`challenger`) with real bundles; v3 without a bundle; v4 tagged with another sha."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri)
    bundles, shas = {}, {}
    for v, seed in (("1", 0), ("2", 1)):
        bundles[v] = build_text_bundle(root / f"v{v}" / "bundle", version=v, seed=seed)
        shas[v] = sha_of(bundles[v])
        archive = pack(bundles[v], root / f"v{v}" / "bundle.tar.gz")
        assert register(tracker, archive, shas[v], "champion" if v == "1" else "challenger") == v
    assert register(tracker, None, shas["2"], "unexported") == "3"
    assert register(tracker, root / "v1" / "bundle.tar.gz", shas["2"], "mislabelled") == "4"
    return {"uri": uri, "tracker": tracker, "bundles": bundles, "shas": shas}


@pytest.fixture
def edge(tmp_path: Path, registry: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Start edge servers serving v1; all stopped at the end of the test."""
    monkeypatch.setenv("TRANSFLOW_EDGE_TOKEN", TOKEN)
    stack: list = []

    def start(**kwargs: object) -> str:
        kwargs.setdefault("bundle", registry["bundles"]["1"])
        kwargs.setdefault("state_dir", tmp_path / f"state{len(stack)}")
        kwargs.setdefault("token", TOKEN)
        ctx = running_server(create_app(Settings(intra_op_threads=1, **kwargs)))  # type: ignore[arg-type]
        url = ctx.__enter__()
        stack.append(ctx)
        return url

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


def serving(url: str) -> dict:
    return httpx.get(f"{url}/v1/model", timeout=10).json()


def wait_for(url: str, sha: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/v1/model", timeout=10)
        if response.status_code == 200 and response.json()["bundle_sha256"] == sha:
            return
        time.sleep(0.1)
    pytest.fail(f"{url} never served {sha[:12]}: {response.text}")


def test_deploys_to_two_servers_records_tags_and_is_idempotent(edge, registry: dict) -> None:
    a, b = edge(), edge()
    sha1, sha2 = registry["shas"]["1"], registry["shas"]["2"]
    outcome = deploy(f"{NAME}@challenger", [a, b], tracking_uri=registry["uri"])
    assert outcome["status"] == "deployed" and outcome["version"] == "2" and outcome["bundle_sha256"] == sha2
    assert [r["status"] for r in outcome["results"]] == ["loaded", "loaded"]
    assert all(r["before"] == {"bundle_sha256": sha1} and r["golden"]["checked"] == 4 for r in outcome["results"])
    for url in (a, b):
        info = serving(url)
        assert info["version"] == "2" and info["bundle_sha256"] == sha2 and info["previous_bundle_sha256"] == sha1
    tags = registry["tracker"].version_tags(NAME, "2")
    assert tags["deploy.status"] == "deployed" and tags["deploy.bundle_sha256"] == sha2
    assert json.loads(tags["deploy.targets"]) == [a, b] and tags["deploy.error"] == "" and tags["deploy.time"]

    again = deploy(f"{NAME}/2", [a, b], tracking_uri=registry["uri"])  # a retried or repeated deploy changes nothing
    assert [r["status"] for r in again["results"]] == ["unchanged", "unchanged"]
    assert serving(a)["previous_bundle_sha256"] == sha1  # not overwritten by a second push of the same bundle
    history = json.loads(registry["tracker"].version_tags(NAME, "2")["deploy.history"])
    assert [h["status"] for h in history[:2]] == ["deployed", "deployed"]


def test_a_refusing_target_rolls_back_every_updated_one(edge, registry: dict, tmp_path: Path) -> None:
    """The second server has another token: the first goes back to v1, the dropped archive is removed."""
    a, b = edge(), edge(token=OTHER_TOKEN)
    drop = tmp_path / "drop"
    drop.mkdir()
    sha1 = registry["shas"]["1"]
    with pytest.raises(DeployError) as failure:
        deploy(f"{NAME}@challenger", [f"dir://{drop}", a, b], tracking_uri=registry["uri"])
    message = str(failure.value)
    assert f"failed on {b}" in message and "POST /v1/admin/bundles answered 401" in message, message
    assert f"{a}: rolled_back" in message and f"dir://{drop}: removed" in message, message
    assert serving(a)["bundle_sha256"] == sha1 and serving(a)["version"] == "1"
    assert serving(b)["bundle_sha256"] == sha1
    assert list(drop.iterdir()) == []
    tags = registry["tracker"].version_tags(NAME, "2")
    assert tags["deploy.status"] == "failed" and b in tags["deploy.error"]
    assert httpx.post(f"{a}/v1/predict", json={"inputs": ["still v1?"]}).json()["model"]["version"] == "1"
    # A retried rollback looks before it acts: the server's rollback toggles, a second one would roll forward.
    fetched = Fetched(NAME, "2", "unused", registry["shas"]["2"], NAME, "2", {})
    assert restore.fn(Target.parse(a), {"bundle_sha256": sha1}, fetched, "TRANSFLOW_EDGE_TOKEN") == "unchanged"
    assert serving(a)["bundle_sha256"] == sha1


def test_a_dir_rollback_is_verified_by_what_the_watching_site_serves(edge, registry: dict, tmp_path: Path) -> None:
    """The folder held no earlier archive: deleting this deploy's one must still put the site back on v1."""
    drop = tmp_path / "drop"
    drop.mkdir()
    site = edge(token=None, watch_dir=drop, watch_interval_s=0.05)  # serves v1 from --bundle, folder empty
    a, b = edge(), edge(token=OTHER_TOKEN)  # a takes the bundle (time for the site to load it), b refuses
    sha1, sha2 = registry["shas"]["1"], registry["shas"]["2"]
    with pytest.raises(DeployError) as failure:
        deploy(f"{NAME}@challenger", [f"dir://{drop}", a, b], tracking_uri=registry["uri"])
    assert f"dir://{drop}: removed" in str(failure.value)
    wait_for(site, sha1)
    loads = [line for line in httpx.get(f"{site}/metrics").text.splitlines() if "bundle_loads_total{" in line]
    watched = [float(line.split()[-1]) for line in loads if 'result="loaded",source="watch"' in line]
    assert watched == [2.0], loads  # took v2 from the folder, then rolled back to v1 when it was deleted
    assert serving(site)["previous_bundle_sha256"] == sha2
    assert httpx.post(f"{site}/v1/predict", json={"inputs": ["back?"]}).json()["model"]["version"] == "1"


class DiesOnUpload(BaseHTTPRequestHandler):
    """Looks like an edge server serving some bundle, then drops the connection when the bundle arrives."""

    def do_GET(self) -> None:
        body = json.dumps({"bundle_sha256": "0" * 64, "version": "0"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.close_connection = True  # no answer: the process died mid-upload

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def dying_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), DiesOnUpload)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_dying_mid_upload_rolls_back_the_others(edge, registry: dict) -> None:
    a = edge()
    with dying_server() as dying, pytest.raises(DeployError) as failure:
        deploy(f"{NAME}@challenger", [a, dying], tracking_uri=registry["uri"])
    message = str(failure.value)
    assert f"failed on {dying}: POST /v1/admin/bundles failed (RemoteProtocolError" in message, message
    assert f"{a}: rolled_back" in message and f"{dying}: unchanged" in message, message
    assert serving(a)["bundle_sha256"] == registry["shas"]["1"]


def test_a_target_that_is_down_stops_the_deploy_before_any_change(edge, registry: dict) -> None:
    a, down = edge(), f"http://127.0.0.1:{free_port()}"
    loaded_at = serving(a)["loaded_at"]
    with pytest.raises(DeployError, match=rf"stopped before any change: {down}: GET /v1/model failed \(Connect"):
        deploy(f"{NAME}@challenger", [a, down], tracking_uri=registry["uri"])
    info = serving(a)
    assert info["version"] == "1" and info["loaded_at"] == loaded_at and info["previous_bundle_sha256"] is None


def test_directory_target_feeds_a_watching_server(edge, registry: dict, tmp_path: Path) -> None:
    """`transflow deploy --config` with a dir:// target; `--watch-dir` server follows, and back on deletion."""
    drop = tmp_path / "drop"
    drop.mkdir()
    watcher = edge(token=None, watch_dir=drop, watch_interval_s=0.1)
    sha1, sha2 = registry["shas"]["1"], registry["shas"]["2"]
    config = tmp_path / "run.yaml"
    config.write_text(
        "stages: [{kind: probe}]\n"
        f"registry: {{tracking_uri: '{registry['uri']}'}}\n"
        f"deploy: {{targets: ['dir://{drop}']}}\n"
    )
    from flows.cli import app

    result = CliRunner().invoke(app, ["deploy", f"{NAME}@challenger", "--config", str(config)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "written" in result.output and f"serving bundle {sha2[:12]}" in result.output
    archive = drop / f"{NAME}-v2-{sha2[:12]}.tar.gz"
    assert sorted(p.name for p in drop.iterdir()) == [archive.name]  # no temp file left behind
    wait_for(watcher, sha2)

    again = deploy(f"{NAME}@challenger", [f"dir://{drop}"], tracking_uri=registry["uri"])
    assert again["results"][0]["status"] == "unchanged"
    assert deploy(f"{NAME}@champion", [f"dir://{drop}"], tracking_uri=registry["uri"])["results"][0]["status"] == (
        "written"
    )
    wait_for(watcher, sha1)
    (drop / f"{NAME}-v1-{sha1[:12]}.tar.gz").unlink()  # deleting the newest archive rolls the site back
    wait_for(watcher, sha2)

    (drop / ".half-copied.tar.gz").write_bytes(b"\x1f\x8b")  # temp names are not looked at
    (drop / "broken.tar.gz").write_bytes(b"not a bundle")  # the newest, but refused: v2 keeps serving
    rejected = 'transflow_edge_bundle_loads_total{result="rejected",source="watch"} 1.0'
    deadline = time.monotonic() + 20
    while rejected not in httpx.get(f"{watcher}/metrics").text and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rejected in httpx.get(f"{watcher}/metrics").text
    assert serving(watcher)["bundle_sha256"] == sha2


@pytest.mark.parametrize(
    ("model", "targets", "env", "error"),
    [
        (f"{NAME}@unexported", ["dir://DROP"], {}, rf"{NAME} v3 has no bundle artifact.*transflow export {NAME}/3"),
        (f"{NAME}@mislabelled", ["dir://DROP"], {}, "does not match the version's bundle_sha256 tag"),
        (f"{NAME}@nosuchalias", ["dir://DROP"], {}, "not found in the registry"),
        (f"{NAME}@challenger", [], {}, "no targets"),
        (f"{NAME}@challenger", ["ftp://edge"], {}, "expected http"),
        (f"{NAME}@challenger", ["http://127.0.0.1:9"], {"TRANSFLOW_EDGE_TOKEN": ""}, "TRANSFLOW_EDGE_TOKEN is not set"),
    ],
)
def test_unusable_requests_fail_clearly_before_any_change(
    registry: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    targets: list[str],
    env: dict,
    error: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DeployError, match=error):
        deploy(model, [t.replace("DROP", str(tmp_path)) for t in targets], tracking_uri=registry["uri"])
    assert list(tmp_path.iterdir()) == []
