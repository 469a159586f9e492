"""ONNX export, parity check, onnxruntime optimisation and int8 quantisation, and the bundle.

fp32 must match PyTorch (max |Δlogit| ≤ 1e-4, argmax agreement) on the whole test split; int8 ships
as the default model only if its macro-F1 drop stays within the configured budget.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from prefect import task
from transflow_edge.bundle import pack, verify_bundle, write_manifest

from models.backbone import Adapter, OnnxSignature, TransferModel
from models.batching import Batches
from models.trainer import predict, progress, scores
from runconfig import ExportConfig
from tasks.drift_reference import write_reference_stats
from tasks.export_ladder import RUNGS, calibration_slice, feeds_hash, run_ladder
from tasks.prefect_options import LIVE
from tasks.registered_version import BUNDLE_ARTIFACT
from tasks.tracking import Tracker

FP32_ATOL = 1e-4


class ExportError(RuntimeError):
    """The model could not be exported or failed its parity check; nothing is marked exported."""


@dataclass
class ExportReport:
    bundle_dir: str
    bundle_tar: str
    bundle_sha256: str
    default_model: str
    fp32_max_abs_diff: float
    fp32_argmax_agreement: float
    parity_passed: bool
    int8_shipped: bool
    int8_reason: str
    fp32: dict[str, float]
    int8: dict[str, float]
    int8_delta_pt: float
    seconds: float
    ladder: dict[str, Any] | None = None  # every int8 rung tried (tasks.export_ladder), as in the manifest


def export_onnx(
    model: TransferModel, adapter: Adapter, sample: dict[str, torch.Tensor], path: Path, opset: int
) -> Path:
    """torch.onnx (dynamo) export with dynamic batch (and sequence) axes, then the onnx checker."""
    model = model.cpu().eval()
    names = list(adapter.input_names)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                OnnxSignature(model, names),
                tuple(sample[n] for n in names),
                str(path),
                input_names=names,
                output_names=["logits"],
                dynamic_shapes=dynamic_shapes(adapter),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # the exporter's own message is what the user needs
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    return path


def dynamic_shapes(adapter: Adapter) -> tuple[tuple[dict[int, Any], ...]]:
    """torch.export dims from the adapter's named axes; one Dim per name, shared across inputs."""
    dims: dict[str, Any] = {}
    axes = adapter.dynamic_axes()
    per_input = tuple(
        {axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in axes[n].items()}
        for n in adapter.input_names
    )
    return (per_input,)  # OnnxSignature.forward(*tensors): all inputs form one varargs argument


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(sess: ort.InferenceSession, batches: Batches, title: str) -> np.ndarray:
    out = []
    for inputs, _ in progress(batches, title):
        out.append(sess.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0])
    return np.concatenate(out)


def optimise(src: Path, dst: Path, model: TransferModel) -> Path:
    """onnxruntime's transformer fusions (LayerNorm, GELU, …) where it recognises the encoder; else ORT's
    generic offline graph optimisation."""
    config = getattr(model.encoder, "config", None)
    try:
        from onnxruntime.transformers import optimizer

        heads, hidden = config.num_attention_heads, config.hidden_size
        optimizer.optimize_model(
            str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1
        ).save_model_to_file(str(dst))
    except Exception:  # not a BERT-like graph: plain ORT optimisation
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return dst


def calibration_feeds(adapter: Adapter, items: list[Any], size: int, seed: int = 0, batch: int = 16) -> dict[str, Any]:
    """A seeded slice of the validation split, encoded as the model's inputs in small batches; its sha256 (over
    the tensors) goes into the bundle's lineage so a static int8 model can be traced to the data it saw."""
    if not items:
        return {"feeds": [], "size": 0, "seed": seed, "sha256": None}
    picked = calibration_slice(len(items), size, seed)
    batches = Batches(adapter.encode([items[i] for i in picked]), [0] * len(picked), batch,
                      lambda rows: adapter.collate(rows, False))  # fmt: skip
    feeds = [{k: v.numpy() for k, v in inputs.items()} for inputs, _ in batches]
    return {"feeds": feeds, "size": len(picked), "seed": seed, "sha256": feeds_hash(feeds)}


def quantise_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation of weights (per channel), activations quantised at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    return dst


@task(**LIVE)
def build_bundle(
    model: TransferModel,
    adapter: Adapter,
    test_batches: Batches,
    raw_test_items: list[Any],
    classes: list[str],
    meta: dict[str, Any],
    out_dir: Path,
    opset: int = 18,
    int8: bool = True,
    int8_budget_pt: float = 0.5,
    torch_logits: np.ndarray | None = None,
    int8_class_budget_pt: float | None = None,
    ladder: Sequence[str] = RUNGS,
    calibration_items: list[Any] | None = None,
    calibration_size: int = 128,
    pick: str = "fastest",
) -> ExportReport:
    """Export, check parity on `test_batches`, optimise, walk the int8 ladder (`tasks.export_ladder`; static rungs
    calibrate on a seeded slice of `calibration_items`, the validation split), and write + verify the bundle."""
    started = time.perf_counter()
    shutil.rmtree(out_dir, ignore_errors=True)
    bundle, work = out_dir / "bundle", out_dir / "work"
    bundle.mkdir(parents=True)
    work.mkdir()
    sample = test_batches[0][0]
    raw = export_onnx(model, adapter, sample, work / "raw.onnx", opset)
    if torch_logits is None:
        torch_logits, labels, _ = predict(model, test_batches, "cpu", title="torch test logits")
    else:
        labels = np.concatenate([y.numpy() for _, y in test_batches])
    fp32_path = optimise(raw, bundle / "model.onnx", model)
    fp32_logits = onnx_logits(session(fp32_path), test_batches, "onnx fp32 parity")
    diff = float(np.abs(fp32_logits - torch_logits).max())
    agreement = float((fp32_logits.argmax(-1) == torch_logits.argmax(-1)).mean())
    parity = diff <= FP32_ATOL and agreement == 1.0
    if not parity:
        raise ExportError(
            f"fp32 parity failed: max |Δlogit| {diff:.2e} (≤ {FP32_ATOL}), argmax agreement {agreement:.4f}"
        )
    fp32_scores = scores(labels, fp32_logits)
    int8_scores, delta, shipped, reason, walked = {}, 0.0, False, "int8 disabled in config", None
    if int8:
        calibration = calibration_feeds(adapter, calibration_items or [], calibration_size)
        walked = run_ladder(
            fp32_path, raw, work, [{k: v.numpy() for k, v in x.items()} for x, _ in test_batches], labels,
            fp32_logits.argmax(-1), classes, calibration["feeds"], int8_budget_pt, int8_class_budget_pt, ladder,
            pick=pick,
        )  # fmt: skip
        walked["calibration"] = {k: v for k, v in calibration.items() if k != "feeds"}
        tried = [r for r in walked["rungs"] if r["rung"] != "fp32" and r["macro_f1"] is not None]
        chosen = next((r for r in tried if r["shipped"]), tried[0] if tried else None)
        if chosen:
            int8_scores = {"accuracy": chosen["accuracy"], "macro_f1": chosen["macro_f1"]}
            delta = chosen["macro_drop_pt"]
        shipped, reason = walked["file"] is not None, walked["reason"]
        if shipped:
            shutil.copy2(walked["file"], bundle / "model.int8.onnx")
        for r in walked["rungs"]:
            r.pop("file", None)  # work paths: gone with the work dir
        walked.pop("file")
    default = "model.int8.onnx" if shipped else "model.onnx"
    preprocessing = adapter.export_preprocessing(bundle)
    (bundle / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2) + "\n")
    (bundle / "labels.json").write_text(json.dumps(classes) + "\n")
    write_golden(bundle, adapter, default, raw_test_items)
    drift_reference = write_reference_stats(bundle, default, raw_test_items, len(classes), adapter.golden_input)
    metrics = {"fp32": fp32_scores, "int8": int8_scores, "int8_delta_pt": round(delta, 3), "fp32_max_abs_diff": diff}
    write_model_card(bundle / "README.md", meta, classes, metrics, reason)
    manifest_meta = {
        **meta,
        "modality": adapter.modality,
        "default_model": default,
        "metrics": metrics,
        "inputs": [
            {"name": n, "dtype": adapter.input_dtype, "axes": adapter.dynamic_axes()[n]} for n in adapter.input_names
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", len(classes)]}],
        "parity": {"fp32_max_abs_diff": diff, "argmax_agreement": agreement, "atol": FP32_ATOL, "passed": parity},
        "int8": {"shipped": shipped, "reason": reason, "rung": walked["shipped"] if walked else "fp32"},
        "ladder": walked,  # every rung tried, the calibration slice's hash: intrinsic to this bundle
        "drift_reference": drift_reference,  # the test split's statistics for the edge's drift scores
    }
    write_manifest(bundle, manifest_meta)
    verified = verify_bundle(bundle)
    tar = pack(bundle, out_dir / "bundle.tar.gz")
    shutil.rmtree(work)
    return ExportReport(
        str(bundle),
        str(tar),
        verified.sha256,
        default,
        diff,
        agreement,
        parity,
        shipped,
        reason,
        fp32_scores,
        int8_scores,
        round(delta, 3),
        round(time.perf_counter() - started, 1),
        walked,
    )


def export_and_log(
    tracker: Tracker,
    run_id: str,
    meta: dict[str, Any],
    model: TransferModel,
    adapter: Adapter,
    test_batches: Batches,
    raw_test_items: list[Any],
    classes: list[str],
    export: ExportConfig,
    out_dir: Path,
    torch_logits: np.ndarray | None = None,
    calibration_items: list[Any] | None = None,
) -> dict[str, Any]:
    """The one export step of a registered version (`meta`: name, version, lineage): build and verify the bundle,
    log it where promotion and deploy look for it (`BUNDLE_ARTIFACT`) beside the ONNX flavour, tag the version."""
    report = build_bundle(
        model, adapter, test_batches, raw_test_items, classes, meta, out_dir,
        export.opset, export.int8, export.int8_budget_pt, torch_logits, export.int8_class_budget_pt, export.ladder,
        calibration_items, export.calibration_size, export.pick,
    )  # fmt: skip
    folder, name = BUNDLE_ARTIFACT.rsplit("/", 1)
    assert Path(report.bundle_tar).name == name, "pack() names the archive as the registry expects"
    tracker.log_artifacts(run_id, Path(report.bundle_tar), folder)
    tracker.log_onnx(run_id, Path(report.bundle_dir) / "model.onnx", out_dir)
    tracker.tag_version(str(meta["name"]), str(meta["version"]), version_tags(report))
    # The registered MLflow model: a pyfunc over this bundle, with the shipped model's test scores linked to it.
    shipped = report.int8 if report.int8_shipped else report.fp32
    linked = {f"test_{k}": v for k, v in shipped.items()} | {"onnx_fp32_max_abs_diff": report.fp32_max_abs_diff}
    tracker.log_pyfunc(str(meta["name"]), str(meta["version"]), Path(report.bundle_dir), out_dir, linked)
    return report_dict(report)


def write_golden(bundle: Path, adapter: Adapter, default: str, items: list[Any], n: int = 8) -> None:
    """A few real test inputs with the default model's own outputs: the edge's smoke test after a swap.

    The tolerance covers how far the model's own batching moves its outputs: dynamic int8 scales activations
    per call, so an input's logits depend on what it is batched (and padded) with, and the edge batches by length.
    Measured here as each input alone vs all together; twice that, never below the runtime's own noise."""
    picked = list(range(min(n, len(items))))
    sess = session(bundle / default)

    def logits_of(chosen: list[int]) -> np.ndarray:
        batch = adapter.collate(adapter.encode([items[i] for i in chosen]))
        return sess.run(["logits"], {k: v.numpy() for k, v in batch.items()})[0]

    logits = logits_of(picked)
    alone = np.concatenate([logits_of([i]) for i in picked]) if picked else logits
    spread = float(np.abs(logits - alone).max()) if picked else 0.0
    golden = {
        "inputs": [adapter.golden_input(items[i]) for i in picked],
        "labels": [int(i) for i in logits.argmax(-1)],
        "logits": logits.round(6).tolist(),
        "atol": max(1e-3 if "int8" in default else 1e-4, round(2 * spread, 4)),
        "batching_spread": round(spread, 6),
    }
    (bundle / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")


def write_model_card(
    path: Path, meta: dict[str, Any], classes: list[str], metrics: dict[str, Any], int8_reason: str
) -> None:
    from huggingface_hub import ModelCard

    lineage = meta.get("lineage", {})
    q_acc, q_f1 = (f"{metrics['int8'][k]:.4f}" if metrics["int8"] else "n/a" for k in ("accuracy", "macro_f1"))
    content = f"""---
library_name: onnxruntime
tags: [transflow, onnx, {meta.get("modality", "")}]
---
# {meta.get("name")} v{meta.get("version")}

Classifies into: {", ".join(classes)}.

## Intended use
Edge inference with the transflow edge server (`transflow edge serve --bundle …`) or any onnxruntime
client that applies `preprocessing.json`. Trained for the label set above only; inputs unlike the
training data (other languages, domains or image kinds) are out of scope.

## Training data and lineage
- data version (DVC md5): `{lineage.get("data_version")}`
- git commit: `{lineage.get("git_commit")}` (dirty: {lineage.get("git_dirty")})
- config hash: `{lineage.get("config_hash")}` · backbone: `{lineage.get("backbone")}`

## Test metrics
| model | accuracy | macro-F1 |
| --- | --- | --- |
| fp32 ONNX | {metrics["fp32"]["accuracy"]:.4f} | {metrics["fp32"]["macro_f1"]:.4f} |
| int8 ONNX | {q_acc} | {q_f1} |

{int8_reason}. fp32 parity with PyTorch: max |Δlogit| {metrics["fp32_max_abs_diff"]:.2e}.

## Baselines (same run, same test split)
{_baseline_line(lineage)}

## Limitations
Scores are softmax outputs, not calibrated probabilities. Accuracy is measured on one held-out split of
the data version above; expect lower accuracy on data that drifts from it.
"""
    ModelCard(content).save(str(path))


def _baseline_line(lineage: dict[str, Any]) -> str:
    passed, detail = lineage.get("baselines.passed"), lineage.get("baselines.detail", "")
    if passed is None:
        return "No baselines were evaluated in this model's run (evaluation.baselines: false)."
    if passed == "true":
        return f"Beats every baseline of its run: {detail}."
    return f"**WARNING: this model loses to a baseline of its own run**: {detail}. Do not ship it without a reason."


def report_dict(report: ExportReport) -> dict[str, Any]:
    return asdict(report)


def version_tags(report: ExportReport) -> dict[str, str]:
    """What the registry records of an export: parity, int8 decision, the bundle's identity."""
    return {
        "exported": "true",
        "onnx.parity_passed": str(report.parity_passed).lower(),
        "onnx.fp32_max_abs_diff": f"{report.fp32_max_abs_diff:.3e}",
        "onnx.argmax_agreement": f"{report.fp32_argmax_agreement:.4f}",
        "onnx.int8_shipped": str(report.int8_shipped).lower(),
        "onnx.int8_delta_pt": f"{report.int8_delta_pt:.3f}",
        "onnx.default_model": report.default_model,
        "onnx.int8_rung": (report.ladder or {}).get("shipped", "fp32"),
        "onnx.calibration_sha256": str(((report.ladder or {}).get("calibration") or {}).get("sha256")),
        "bundle_sha256": report.bundle_sha256,
    }
