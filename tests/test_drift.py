"""Drift the edge can see: the statistics and PSI of `transflow_edge.drift`, the bundle's reference as the exporter
writes it, live counts on real edge servers over loopback (real onnxruntime, MiniLM's tokenizer, real tweets and
digits), hostile references refused at upload, and the `watch-drift` flow against a real Prefect server: seeded
shifted traffic raises exactly one `transflow.drift.detected` per version within the cooldown, unshifted none.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from transflow_edge import drift
from transflow_edge.bundle import MANIFEST, BundleError, pack, verify_bundle, write_manifest
from transflow_edge.model import load_model
from transflow_edge.server import Settings, create_app
from typer.testing import CliRunner

from tasks.drift_reference import reference_values
from tasks.drift_watch import decide, fleet_figures, read_state, write_state
from tests import drift_data
from tests.edge_fixtures import TOKEN, build_text_bundle, running_server
from tests.prefect_server import api_for_this_process, flush_to_server

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {TOKEN}"}
THRESHOLD, MIN_COUNT = 0.25, 200


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drift-bundles")
    return {
        "text": drift_data.text_bundle(root / "text"),
        "image": drift_data.image_bundle(root / "image"),
        "text2.tar.gz": pack(drift_data.text_bundle(root / "text2", version="2", reference_items=200), root / "t2.tgz"),
        "old": build_text_bundle(root / "old", version="0", max_length=64),  # exported before drift tracking
    }


@pytest.fixture(scope="module")
def servers(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A text server and an image server, each with its bundle's reference; admin on."""
    with (
        running_server(create_app(Settings(bundle=bundles["text"], state_dir=tmp_path_factory.mktemp("t"),
                                           token=TOKEN, intra_op_threads=1))) as text,
        running_server(create_app(Settings(bundle=bundles["image"], state_dir=tmp_path_factory.mktemp("i"),
                                           intra_op_threads=1))) as image,
    ):  # fmt: skip
        yield {"text": text, "image": image}


def send(url: str, inputs: list, per_request: int = 50) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(0, len(inputs), per_request):
            response = client.post("/v1/predict", json={"inputs": inputs[i : i + per_request]})
            assert response.status_code == 200, response.text


def drift_of(url: str) -> dict:
    response = httpx.get(f"{url}/v1/drift", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def psi_of(report: dict) -> dict[str, float]:
    return {name: s["psi"] for name, s in report["statistics"].items()}


# ---------------------------------------------------------------- the definition


def test_psi_is_the_textbook_formula_with_a_floor_for_empty_bins() -> None:
    expected = np.array([0.5, 0.3, 0.2, 0.0])
    assert drift.psi(expected, np.array([50, 30, 20, 0])) == pytest.approx(0.0, abs=1e-12)
    a = np.array([0.2, 0.3, 0.4, 0.1])
    e = np.maximum(expected, drift.PSI_FLOOR)
    assert drift.psi(expected, a * 1000) == pytest.approx(float(np.sum((a - e) * np.log(a / e))))
    assert math.isfinite(drift.psi(expected, np.array([0, 0, 0, 7]))), "an empty reference bin stays finite"
    assert math.isnan(drift.psi(expected, np.zeros(4))), "no observations: no score, not zero"


def test_the_server_counts_the_reference_items_into_exactly_the_reference(bundles: dict[str, Path]) -> None:
    """Export and serving share one definition: the test items served again give the reference's proportions."""
    for kind, items in (("text", drift_data.tweets(600, 0)), ("image", drift_data.digits(600, 0))):
        model = load_model(verify_bundle(bundles[kind]))
        assert model.drift is not None
        for i in range(0, len(items), 7):
            model.drift.observe_outputs(model.logits(model.prepare(items[i : i + 7])))
        snapshot = model.drift.snapshot()["statistics"]
        reference = json.loads((bundles[kind] / drift.REFERENCE).read_text())["statistics"]
        for name, figures in snapshot.items():
            got = np.asarray(figures["counts"]) / len(items)
            assert got == pytest.approx(reference[name]["proportions"], abs=1e-6), (kind, name)
            assert figures["psi"] == pytest.approx(0.0, abs=1e-9), (kind, name)
    values = reference_values(bundles["text"], "model.onnx", ["[UNK] a", "🙂 🙂 🙂"])
    assert values["unknown_rate"][1] > 0.5 > values["unknown_rate"][0] > 0, "MiniLM's [UNK] id is counted"


def test_a_score_covers_a_window_of_recent_inputs(bundles: dict[str, Path]) -> None:
    model = load_model(verify_bundle(bundles["text"]))
    tracker = drift.DriftTracker(model.drift.reference, model.preprocessor, window=200)
    tracker.observe({"length_tokens": np.full(300, 1.0)})  # all in the first bin, then pushed out
    tracker.observe({"length_tokens": np.full(200, 1e6)})  # all in the last bin
    figures = tracker.snapshot()["statistics"]["length_tokens"]
    assert (figures["count"], figures["total"], figures["counts"][-1]) == (200, 500, 200)


# ---------------------------------------------------------------- live servers


def test_unshifted_traffic_stays_under_the_threshold_and_shifted_traffic_crosses_it(servers: dict[str, str]) -> None:
    send(servers["text"], drift_data.tweets(300, 1))
    send(servers["image"], drift_data.digits(300, 1))
    text, image = drift_of(servers["text"]), drift_of(servers["image"])
    assert text["available"] and text["version"] == "1"
    assert all(s["count"] == 300 for s in text["statistics"].values()), text["statistics"]
    assert max(psi_of(text).values()) < 0.1 and max(psi_of(image).values()) < 0.1, (psi_of(text), psi_of(image))
    metrics = httpx.get(f"{servers['text']}/metrics").text
    assert 'transflow_edge_drift_psi{statistic="length_tokens"}' in metrics
    assert "transflow_edge_drift_available 1.0" in metrics


def test_a_new_version_starts_from_zero(bundles: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(bundle=bundles["text"], state_dir=tmp_path / "s", token=TOKEN, intra_op_threads=1)
    with running_server(create_app(settings)) as url:
        send(url, drift_data.tweets(50, 7))
        assert drift_of(url)["statistics"]["length_tokens"]["count"] == 50
        upload = httpx.post(f"{url}/v1/admin/bundles", content=bundles["text2.tar.gz"].read_bytes(),
                            headers={**AUTH, "Content-Type": "application/gzip"}, timeout=30)  # fmt: skip
        assert upload.status_code == 200, upload.text
        report = drift_of(url)
        assert report["version"] == "2" and report["reference_count"] == 200
        assert all(s["total"] == 0 and s["psi"] is None for s in report["statistics"].values())


def test_a_bundle_without_reference_loads_and_reports_drift_unavailable(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    settings = Settings(bundle=bundles["old"], state_dir=tmp_path / "s", intra_op_threads=1)
    with running_server(create_app(settings)) as url:
        send(url, ["an old bundle still serves"])
        report = drift_of(url)
        assert report["available"] is False and "reference_stats.json" in report["reason"]
        metrics = httpx.get(f"{url}/metrics").text
        assert "transflow_edge_drift_available 0.0" in metrics and "transflow_edge_drift_psi" not in metrics


def hostile_copy(bundle: Path, out: Path, edit) -> Path:
    shutil.copytree(bundle, out)
    reference = json.loads((out / drift.REFERENCE).read_text())
    text = edit(reference)
    (out / drift.REFERENCE).write_text(text if isinstance(text, str) else json.dumps(text))
    manifest = json.loads((out / MANIFEST).read_text())
    meta = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
    write_manifest(out, meta | {"version": "9"})  # hashes match: only the content is hostile
    return out


def _set(path: str, value: object):
    def edit(ref: dict) -> dict:
        *parents, last = path.split(".")
        node = ref
        for key in parents:
            node = node[key]
        node[last] = value
        return ref

    return edit


HOSTILE = {
    "decreasing edges": (_set("statistics.length_tokens.edges", [9.0, 3.0]), "strictly increasing"),
    "NaN proportion": (lambda r: json.dumps(r).replace('"proportions": [', '"proportions": [NaN, ', 1), "finite"),
    "a million bins": (_set("statistics.confidence.edges", list(range(1_000_000))), "bytes (limit"),
    "unknown statistic": (_set("statistics.shoe_size", {"edges": [1.0], "proportions": [0.5, 0.5]}), "exactly"),
    "image reference in a text bundle": (_set("modality", "image"), "modality"),
    "class count": (_set("statistics.predicted_class.proportions", [0.5, 0.5]), "one per bin"),
    "proportions that do not sum to 1": (_set("statistics.unknown_rate.proportions", [5.0] * 99), "entries"),
    "deep nesting": (lambda r: "[" * 100_000 + "]" * 100_000, "not readable JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_reference_is_refused_with_a_422_and_the_live_model_keeps_serving(
    case: str, servers: dict[str, str], bundles: dict[str, Path], tmp_path: Path
) -> None:
    edit, message = HOSTILE[case]
    archive = pack(hostile_copy(bundles["text"], tmp_path / "bad", edit), tmp_path / "bad.tar.gz")
    response = httpx.post(f"{servers['text']}/v1/admin/bundles", content=archive.read_bytes(),
                          headers={**AUTH, "Content-Type": "application/gzip"}, timeout=30)  # fmt: skip
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "reference_stats.json" in error and message in error, error
    assert drift_of(servers["text"])["version"] == "1"
    with pytest.raises(BundleError, match=r"reference_stats\.json"):
        load_model(verify_bundle(tmp_path / "bad"))


def test_fleet_figures_add_up_the_servers_of_one_bundle() -> None:
    ref = [0.5, 0.5]

    def report(version: str, counts: list[int]) -> dict:
        stats = {"length_tokens": {"counts": counts, "reference": ref, "psi": None}}
        return {"available": True, "name": "m", "version": version, "bundle_sha256": version * 8, "statistics": stats}

    fleet = [{"target": "a", "report": report("1", [150, 0])}, {"target": "b", "report": report("1", [50, 0])},
             {"target": "c", "report": report("2", [100, 0])}, {"target": "d", "error": "down"}]  # fmt: skip
    one, two = fleet_figures(fleet, THRESHOLD, MIN_COUNT)
    assert one["targets"] == ["a", "b"] and one["counts"] == {"length_tokens": 200}
    assert one["drifted"] == ["length_tokens"] and one["psi"]["length_tokens"] > 3
    assert two["drifted"] == [], "100 observations are below min_count: not judged"
    assert decide(None, 100.0, 60) == "emit"
    assert decide({"at": 90.0, "sent": True}, 100.0, 60) == "cooldown"
    assert decide({"at": 90.0, "sent": False}, 100.0, 60) == "resend"
    assert decide({"at": 10.0, "sent": True}, 100.0, 60) == "emit"


# ---------------------------------------------------------------- watch-drift on a real Prefect server


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with api_for_this_process(tmp_path_factory.mktemp("prefect-drift")) as url:
        yield url


def stored_events(want: int, timeout: float = 30) -> list:
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    from tasks.events import DRIFT_DETECTED

    deadline, events = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            events = client.read_events(EventFilter(event=EventNameFilter(name=[DRIFT_DETECTED])), limit=50).events
        if len(events) >= want:
            time.sleep(1)  # and nothing more arrives
            with get_client(sync_client=True) as client:
                page = client.read_events(EventFilter(event=EventNameFilter(name=[DRIFT_DETECTED])), limit=50)
            return page.events
        time.sleep(0.5)
    return events


def test_watch_drift_emits_one_event_per_drifted_version_within_the_cooldown(
    prefect_api: str, servers: dict[str, str]
) -> None:
    from prefect import get_client

    from flows.cli import app
    from flows.watch_drift import watch_drift

    with get_client(sync_client=True) as client:  # a stand-in `retrain` deployment: its runs are counted, not run
        client.create_deployment(flow_id=client.create_flow_from_name("retrain"), name="retrain")
    targets = [servers["text"], servers["image"], "http://127.0.0.1:9"]  # and one that is down
    kwargs = dict(targets=targets, config_path="configs/smoke-text.yaml",
                  overrides=["registry.model_name=tweets-sentiment"], threshold=THRESHOLD, min_count=MIN_COUNT,
                  cooldown_hours=1.0, retrain=True)  # fmt: skip

    send(servers["text"], drift_data.tweets(300, 2))  # unshifted only (with the earlier test's 300, if it ran)
    send(servers["image"], drift_data.digits(300, 3))
    quiet = watch_drift(**kwargs)
    assert [v["action"] for v in quiet["versions"]] == ["stable", "stable"], quiet["versions"]
    assert [e["target"] for e in quiet["unreadable"]] == ["http://127.0.0.1:9"]
    flush_to_server()

    send(servers["text"], drift_data.other_domain_texts(1500, 4))  # other-domain texts: fill the 2,000-input window
    send(servers["image"], drift_data.digits(700, 5, inverted=True))  # inverted images
    loud = watch_drift(**kwargs)
    by_model = {v["model_name"]: v for v in loud["versions"]}
    assert (
        by_model["tweets-sentiment"]["action"] == "emitted"
        and "length_tokens" in by_model["tweets-sentiment"]["drifted"]
    )
    assert by_model["fashion-items"]["action"] == "emitted" and "brightness" in by_model["fashion-items"]["drifted"]
    assert "retrain" in by_model["tweets-sentiment"] and "retrain" not in by_model["fashion-items"]
    flush_to_server()

    again = CliRunner().invoke(app, ["watch-drift", "--json", "-c", "configs/smoke-text.yaml", "--set",
                                     "registry.model_name=tweets-sentiment", "--retrain", "--cooldown-hours", "1",
                                     *(a for t in targets for a in ("--target", t))])  # fmt: skip
    assert again.exit_code == 0, again.output
    flush_to_server()
    actions = [v["action"] for v in json.loads(again.stdout[again.stdout.index("{") :])["versions"]]
    assert actions == ["cooldown", "cooldown"], actions

    # a run that died after emitting but before recording "sent": the next run resends the same event id
    state = read_state("fashion-items")
    state["1"]["sent"] = False
    write_state("fashion-items", state)
    resent = {v["model_name"]: v for v in watch_drift(**kwargs)["versions"]}["fashion-items"]
    assert (resent["action"], resent["event_id"]) == ("resent", state["1"]["event_id"])
    assert read_state("fashion-items")["1"]["sent"] is True
    flush_to_server()

    events = stored_events(want=2)
    assert len(events) == 2, "one event per drifted version: the cooldown held and the resend was stored once"
    assert sorted(e.resource["transflow.model.name"] for e in events) == ["fashion-items", "tweets-sentiment"]
    text_event = next(e for e in events if e.resource["transflow.model.name"] == "tweets-sentiment")
    assert text_event.payload["version"] == "1" and text_event.payload["psi"]["length_tokens"] >= THRESHOLD
    assert text_event.payload["targets"] == [servers["text"]]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    assert len([r for r in runs if r.idempotency_key and "retrain-drift" in r.idempotency_key]) == 1
