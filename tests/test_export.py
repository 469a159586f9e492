"""ONNX export: parity with PyTorch, the int8 budget rule, bundle round trip and tamper checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transflow_edge.bundle import BundleError, pack, safe_extract, verify_bundle
from transflow_edge.model import load_model

from models.text import TextAdapter
from runconfig import DataConfig
from tasks.data import load_dataset
from tasks.export import ExportError, build_bundle, calibration_feeds, session
from tasks.finetune import Encoded


@pytest.fixture(scope="module")
def tiny_setup(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from tests.conftest import write_jsonl

    data = tmp_path_factory.mktemp("texts")
    words = ["great", "awful", "fine", "bad", "superb", "poor", "lovely", "horrid"]
    for split, n in (("train", 16), ("validation", 8), ("test", 40)):
        rows = [{"text": f"a {words[i % 8]} day number {i} " + "x " * (i % 7), "label": "pn"[i % 2]} for i in range(n)]
        write_jsonl(data / f"{split}.jsonl", rows)
    ds = load_dataset(DataConfig(modality="text", path=data, dvc_file=None))
    torch.manual_seed(0)
    adapter = TextAdapter(max_length=24)
    model = adapter.build(str(tiny_bert_dir), 2).eval()
    encoded = Encoded(([], []), ([], []), (adapter.encode(ds.test.items), ds.test.labels))
    return adapter, model, ds, encoded


def export(tiny_setup: tuple, out: Path, **kw: object) -> object:
    adapter, model, ds, encoded = tiny_setup
    meta = {"name": "tiny", "version": "1", "lineage": {"data_version": "abc", "git_commit": "def"}}
    return build_bundle.fn(
        model, adapter, encoded.batches(adapter, "test", 16, sort=True), ds.test.items, ds.classes, meta, out, **kw
    )


@pytest.fixture(scope="module")
def exported(tiny_setup: tuple, tmp_path_factory: pytest.TempPathFactory) -> object:
    return export(tiny_setup, tmp_path_factory.mktemp("export"))


def test_fp32_parity_and_int8_agreement_on_the_whole_test_split(tiny_setup: tuple, exported: object) -> None:
    adapter, model, ds, _ = tiny_setup
    assert exported.parity_passed and exported.fp32_max_abs_diff <= 1e-4
    assert exported.fp32_argmax_agreement == 1.0
    bundle = Path(exported.bundle_dir)
    batch = adapter.collate(adapter.encode(ds.test.items))
    with torch.no_grad():
        reference = model(**batch).numpy()
    feeds = {k: v.numpy() for k, v in batch.items()}
    fp32 = session(bundle / "model.onnx").run(["logits"], feeds)[0]
    np.testing.assert_allclose(fp32, reference, atol=1e-4)
    if (bundle / "model.int8.onnx").exists():
        int8 = session(bundle / "model.int8.onnx").run(["logits"], feeds)[0]
        assert np.abs(int8 - reference).max() < 0.25 * np.abs(reference).max() + 0.05
    assert exported.default_model == ("model.int8.onnx" if exported.int8_shipped else "model.onnx")


def test_dynamic_axes_accept_other_batch_and_sequence_sizes(tiny_setup: tuple, exported: object) -> None:
    adapter, model, _, _ = tiny_setup
    sess = session(Path(exported.bundle_dir) / "model.onnx")
    for texts in (["one"], ["a b c d e f g h i j k l m n o p q r s t u v w x y z"] * 5):
        batch = adapter.collate(adapter.encode(texts))
        out = sess.run(["logits"], {k: v.numpy() for k, v in batch.items()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(out, model(**batch).numpy(), atol=1e-4)


def test_int8_over_budget_ships_fp32_and_says_why(tiny_setup: tuple, tmp_path: Path) -> None:
    report = export(tiny_setup, tmp_path, int8_budget_pt=-1000.0)
    assert not report.int8_shipped and report.default_model == "model.onnx"
    assert "exceeds budget" in report.int8_reason
    manifest = json.loads((Path(report.bundle_dir) / "manifest.json").read_text())
    assert manifest["default_model"] == "model.onnx" and "model.int8.onnx" not in manifest["files"]
    assert manifest["int8"]["reason"] == report.int8_reason


def test_bundle_is_complete_self_describing_and_round_trips(exported: object, tmp_path: Path) -> None:
    bundle = verify_bundle(Path(exported.bundle_dir))
    assert bundle.sha256 == exported.bundle_sha256
    files = set(bundle.manifest["files"])
    assert {"model.onnx", "preprocessing.json", "tokenizer.json", "labels.json", "golden.json", "README.md"} <= files
    assert bundle.manifest["lineage"]["data_version"] == "abc"
    assert [i["name"] for i in bundle.manifest["inputs"]] == ["input_ids", "attention_mask"]
    golden = bundle.json("golden.json")
    assert len(golden["inputs"]) == len(golden["logits"]) == len(golden["labels"]) == 8
    assert "data version" in bundle.path("README.md").read_text()
    reference = bundle.manifest["drift_reference"]  # the test split's drift statistics, checked by the edge's loader
    assert reference["file"] == "reference_stats.json" in files and reference["model"] == exported.default_model
    assert load_model(bundle).drift.reference.count == reference["items"] > 0
    extracted = verify_bundle(safe_extract(Path(exported.bundle_tar), tmp_path / "x"))
    assert extracted.sha256 == bundle.sha256
    again = pack(Path(exported.bundle_dir), tmp_path / "again.tar.gz")
    assert again.read_bytes() == Path(exported.bundle_tar).read_bytes(), "packing is reproducible"


@pytest.fixture
def bundle_copy(exported: object, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(exported.bundle_dir, dst)
    return dst


def test_missing_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "labels.json").unlink()
    with pytest.raises(BundleError, match=r"labels.json: missing"):
        verify_bundle(bundle_copy)


def test_extra_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "notes.txt").write_text("hi")
    with pytest.raises(BundleError, match=r"notes.txt: extra file"):
        verify_bundle(bundle_copy)


def test_changed_byte_is_named(bundle_copy: Path) -> None:
    model = bundle_copy / "model.onnx"
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    model.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"model.onnx: sha256 does not match"):
        verify_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "sub/../../x"])
def test_manifest_path_escaping_the_bundle_is_refused(bundle_copy: Path, name: str) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "size": 1}
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="escapes the bundle"):
        verify_bundle(bundle_copy)


def test_symlink_in_bundle_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "labels.json").unlink()
    (bundle_copy / "labels.json").symlink_to("/etc/hostname")
    with pytest.raises(BundleError, match=r"labels\.json: not a regular file"):
        verify_bundle(bundle_copy)


class DataDependentPool(torch.nn.Module):
    """Control flow on tensor values: torch.export cannot trace it, so export must fail clearly."""

    def forward(self, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        if hidden.sum().item() > 0:
            return hidden[:, 0]
        return hidden.mean(1)


def test_unexportable_model_fails_with_the_exporters_message(tiny_setup: tuple, tmp_path: Path) -> None:
    adapter, model, ds, encoded = tiny_setup
    broken = adapter.build(str(Path(model.encoder.name_or_path)), 2)
    broken.pool = DataDependentPool()
    with pytest.raises(ExportError, match="ONNX export failed"):
        build_bundle.fn(
            broken,
            adapter,
            encoded.batches(adapter, "test", 16),
            ds.test.items,
            ds.classes,
            {"name": "x", "version": "1", "lineage": {}},
            tmp_path,
        )
    assert not (tmp_path / "bundle.tar.gz").exists()


def test_ladder_climbs_on_a_real_encoder_and_the_manifest_records_every_rung(tiny_setup: tuple, tmp_path: Path) -> None:
    """Budgets no rung can keep (a random model may even gain from int8): every int8 rung is tried on the real
    BERT graph (static QDQ calibrated on a seeded slice of the validation split), fp32 ships, the manifest says so."""
    adapter, _, ds, _ = tiny_setup
    budgets = {"int8_class_budget_pt": -1e3, "int8_budget_pt": -1e3}
    report = export(tiny_setup, tmp_path, **budgets, calibration_items=ds.validation.items, calibration_size=8)
    manifest = json.loads((Path(report.bundle_dir) / "manifest.json").read_text())
    ladder = manifest["ladder"]
    names = [r["rung"] for r in ladder["rungs"]]
    assert names[:2] == ["dynamic", "static"] and names[-1] == "fp32"
    assert any(n.startswith("static_mixed") for n in names)
    assert all(r["macro_f1"] is not None and r["latency_b1_ms"] > 0 for r in ladder["rungs"])
    assert ladder["shipped"] == "fp32" and report.default_model == "model.onnx" and not report.int8_shipped
    assert "no int8 rung kept the budgets" in report.int8_reason and manifest["int8"]["rung"] == "fp32"
    assert ladder["calibration"]["size"] == 8 and len(ladder["calibration"]["sha256"]) == 64
    again = calibration_feeds(adapter, ds.validation.items, 8)
    assert again["sha256"] == ladder["calibration"]["sha256"], "the same seeded slice, the same hash"


def test_the_golden_tolerance_covers_the_models_own_batching(tiny_setup: tuple, exported: object) -> None:
    """Dynamic int8 scales activations per call, so an input's logits depend on what it is batched and padded
    with; the edge batches by length. The golden file's atol is twice the spread measured at export (each input
    alone vs all together), so every golden input, sent alone as the deploy flow's check may be served, passes."""
    adapter, _, ds, _ = tiny_setup
    bundle = Path(exported.bundle_dir)
    golden = json.loads((bundle / "golden.json").read_text())
    expected = np.asarray(golden["logits"])
    sess = session(bundle / exported.default_model)
    alone = np.concatenate(
        [
            sess.run(["logits"], {k: v.numpy() for k, v in adapter.collate(adapter.encode([item])).items()})[0]
            for item in ds.test.items[: len(expected)]
        ]
    )
    spread = float(np.abs(alone - expected).max())
    assert golden["batching_spread"] == pytest.approx(spread, abs=1e-5)
    assert golden["atol"] >= 2 * spread - 1e-4 and golden["atol"] >= 1e-4
    assert np.abs(alone - expected).max() <= golden["atol"]
    assert load_model(verify_bundle(bundle)).golden["checked"] == len(expected), "the edge's own check passes"
