"""The candidate report's HTML opened by a real headless Chromium: no network request but the page itself, every
key section laid out, and a full-page screenshot whose section regions hold what they should (text, the verdict
banner's colour, the plots' colours). Chromium comes from Debian's packages via `make setup`: this test does not
skip when it is missing, it fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.registry_gate import Check
from tasks.report import assemble, write_report
from tasks.report_stats import compare_predictions
from tests.browser import open_page

SECTIONS = ("verdict", "comparison", "baselines", "export", "speed", "lineage", "model-card")


def synthetic_report(out: Path) -> Path:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    mine = np.where(rng.random(300) < 0.85, y, rng.integers(0, 3, 300))
    theirs = np.where(rng.random(300) < 0.80, y, rng.integers(0, 3, 300))
    comparison = compare_predictions(y, mine, theirs, ["negative", "neutral", "positive"])
    rung = {"rung": "dynamic", "macro_f1": 0.8, "macro_drop_pt": 0.3, "worst_class": "neutral",
            "worst_class_drop_pt": 1.1, "latency_b1_ms": 2.5, "shipped": True, "verdict": "within"}  # fmt: skip
    report = assemble(
        header={"model": "demo", "version": "2", "against": "champion", "champion_version": "1", "metric": "macro_f1",
                "test_size": 300, "data_version": "abc", "built": "2026-01-01T00:00:00+00:00", "run_id": "r"},
        comparison=comparison,
        lines=[Check("onnx_parity", True, "fp32 ONNX parity passed"),
               Check("significant", False, "NOT significant at level 0.05")],
        training={"baselines": {"classical": {"accuracy": 0.6, "macro_f1": 0.55}}},
        tags={"baselines.passed": "true", "baselines.detail": "beats tf-idf"},
        manifest={"default_model": "model.int8.onnx", "parity": {"passed": True}, "int8": {"reason": "dynamic ships"},
                  "ladder": {"rungs": [rung]}},
        bundle_sha256="f" * 64,
        latency=[{"runtime": r, "batch": b, "p50_ms": 1.0 + b, "p95_ms": 2.0 + b}
                 for r in ("torch eager", "ONNX fp32", "ONNX int8") for b in (1, 32)],
        sizes=[{"file": "model.onnx", "bytes": 90_000_000}],
        lineage={"data_version": "abc", "git_commit": "123", "libraries": {"torch": "2"}},
        model_card="# demo v2\nClassifies tweets.",
    )  # fmt: skip
    return Path(write_report(report, out)["html"])


def ink(region: Image.Image) -> float:
    """Share of pixels that are not near-white: text, tables and plots."""
    grey = np.asarray(region.convert("L"))
    return float((grey < 200).mean()) if grey.size else 0.0


def has_colour(region: Image.Image, rgb: tuple[int, int, int], tolerance: int = 12) -> bool:
    pixels = np.asarray(region.convert("RGB")).reshape(-1, 3).astype(int)
    return bool((np.abs(pixels - np.array(rgb)).max(axis=1) <= tolerance).any())


@pytest.mark.integration
def test_report_in_a_real_browser_is_offline_complete_and_drawn(tmp_path: Path) -> None:
    html = synthetic_report(tmp_path / "report")
    url = html.resolve().as_uri()
    with open_page(url) as page:
        boxes = page.evaluate(
            "Object.fromEntries(" + repr(list(SECTIONS)) + ".map(id => { const e = document.getElementById(id);"
            " if (!e) return [id, null]; const r = e.getBoundingClientRect();"
            " return [id, {x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,"
            " title: e.querySelector('h2').textContent}]; }))"
        )
        svgs = page.evaluate("[...document.querySelectorAll('svg')].map(s => s.getBoundingClientRect().height)")
        shot = page.screenshot(tmp_path / "report.png")
        requests = page.requests()
    fetched = [u for u in requests if not u.startswith("data:")]  # data: URIs are inline bytes, not requests
    assert fetched == [url], f"the page fetched something besides itself: {fetched}"
    assert all(boxes[s] and boxes[s]["h"] > 20 for s in SECTIONS), boxes
    assert len(svgs) >= 3 and all(h > 100 for h in svgs), "confusion matrices, per-class bars, latency drawn"
    image = Image.open(shot)
    assert image.height >= max(b["y"] + b["h"] for b in boxes.values()) - 2
    for section in SECTIONS:
        b = boxes[section]
        crop = image.crop((int(b["x"]), int(b["y"]), int(b["x"] + b["w"]), int(b["y"] + b["h"])))
        assert ink(crop) > 0.005, f"section {section} is blank in the screenshot"
    verdict = boxes["verdict"]
    banner = image.crop((int(verdict["x"]), int(verdict["y"]), int(verdict["x"] + verdict["w"]),
                         int(verdict["y"] + verdict["h"])))  # fmt: skip
    assert has_colour(banner, (0xFD, 0xE8, 0xEA)), "a failing gate line turns the verdict banner red"
    comparison = boxes["comparison"]
    plots = image.crop((int(comparison["x"]), int(comparison["y"]), int(comparison["x"] + comparison["w"]),
                        int(comparison["y"] + comparison["h"])))  # fmt: skip
    assert has_colour(plots, (0x1F, 0x77, 0xB4), tolerance=20), "the per-class F1 bars (matplotlib's C0) are drawn"
    assert has_colour(plots, (0x08, 0x30, 0x6B), tolerance=40), "the confusion matrices' dark blue diagonal is drawn"
