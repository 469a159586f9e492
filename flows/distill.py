"""`transflow distill MODEL@ALIAS`: a shallower student of a registered version, through the same export ladder.

teacher (registered version) → its logits over the training split (cached) → student (half the blocks, from the
teacher's) trained on them → test split + the teacher run's baselines → registered as a new version of the same
model (alias `distilled`, tags `distill.*` naming the teacher) → exported through the int8 ladder → both shipped ONNX
files timed side by side → `challenger` only if it ships; `--promote` then runs the usual gate on it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.promote import auto_promote
from models.distill import blocks_of
from tasks.distill import DISTILLED, decide_student, load_teacher, student_tags, teacher_baselines, teacher_logits
from tasks.distill import train_student as distil_student
from tasks.evaluate import baseline_verdict, evaluate_model
from tasks.export import export_and_log
from tasks.finetune import apply_threads, resolve_device
from tasks.lineage import collect_lineage, resolve_target
from tasks.model_dir import write_model_dir
from tasks.run_conventions import source_tags
from tasks.run_state import owned_run
from tasks.tracking import CHALLENGER, Tracker, resolve_tracking_uri

ENTRY_POINT = "flows/distill.py"


@flow(name="distill", log_prints=True, flow_run_name="distill/{target}")
def distill_flow(
    target: str,
    overrides: list[str] | None = None,
    out: str | None = None,
    promote: bool = False,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Distil `target` (NAME@ALIAS or NAME/VERSION); returns the summary (also written as distill-summary.json)."""
    started = time.perf_counter()
    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    name, version = resolve_target(tracker, target)
    workdir = Path(out or f"runs/distill-{name}-v{version}")
    teacher = load_teacher(tracker, name, version, list(overrides or []), workdir)
    cfg = teacher.cfg
    apply_threads(cfg.training)
    device = resolve_device(cfg.training.device)
    lineage = collect_lineage(cfg.data.dvc_file, cfg.config_hash()) | {
        "backbone": f"models:/{name}/{version}",  # `transflow lineage` follows it to the teacher's own lineage
        "backbone_version": f"{name}/{version}",
    }
    with owned_run(tracker, cfg.registry.experiment, f"{cfg.name}-distill", lineage | source_tags(lineage, ENTRY_POINT),
                   workdir) as run_id:  # fmt: skip
        tracker.log_params(run_id, cfg.resolved())
        (workdir / "config.json").write_text(json.dumps(cfg.resolved(), indent=2) + "\n")
        tracker.log_artifacts(run_id, workdir / "config.json")  # what the gate reads the test split from
        logits = teacher_logits(teacher, workdir / "cache", device)

        def log(row: dict[str, float]) -> None:
            tracker.log_metrics(run_id, [(f"distill.{k}", v, int(row["step"])) for k, v in row.items() if k != "step"])
            print(f"distill step {int(row['step'])}/{cfg.distill.steps}: KD loss {row['train_kd_loss']:.4f}, "
                  f"validation accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f}")  # fmt: skip

        student, layers, fitted = distil_student(teacher, logits, device, log)
        test_batches = teacher.encoded.batches(teacher.adapter, "test", cfg.training.eval_batch_size, sort=True)
        test = evaluate_model(student, test_batches, teacher.classes, device, workdir / "plots")
        metric = cfg.evaluation.metric
        baseline = baseline_verdict(test, teacher_baselines(tracker, teacher.record.run_id or ""), metric)
        run_tags = {"baselines.passed": str(baseline["passed"]).lower(), "baselines.detail": baseline["detail"]} if (
            baseline
        ) else {}  # fmt: skip
        if run_tags:
            tracker.set_tags(run_id, run_tags)
        tracker.log_metrics(run_id, [(f"test_{k}", test[k], 0) for k in ("accuracy", "macro_f1", "loss")])
        model_dir = write_model_dir(student, teacher.adapter, teacher.classes, lineage["backbone"],
                                    teacher.dataset.test.items[:2], workdir / "model")  # fmt: skip
        tracker.log_artifacts(run_id, model_dir, "model")
        tags = (
            lineage
            | run_tags
            | {
                f"test_{metric}": f"{test[metric]:.4f}",
                "classes": json.dumps(teacher.classes),
                "distill.teacher": f"{name}/{version}",
                "distill.teacher_version": version,
            }
        )
        student_version = tracker.register(run_id, name, "model", tags, DISTILLED, tracker.create_logged_model(run_id))
        exported = export_and_log(
            tracker, run_id, {"name": name, "version": student_version, "lineage": tags}, student, teacher.adapter,
            test_batches, teacher.dataset.test.items, teacher.classes, cfg.export, workdir / "export",
            test["logits"], calibration_items=teacher.dataset.validation.items,
        )  # fmt: skip
        decided = decide_student(
            tracker, teacher, Path(exported["bundle_dir"]) / exported["default_model"], baseline, workdir / "compare"
        )
        tracker.tag_version(name, student_version, student_tags(teacher, layers, decided, decided["budget_pt"]))
        tracker.describe_version(name, student_version, f"Distilled from v{version} (blocks {layers}): "
                                 f"{decided['reason']}")  # fmt: skip
        if decided["ship"]:
            tracker.set_alias(name, CHALLENGER, student_version)
        summary = {
            "model_name": name,
            "teacher_version": version,
            "student_version": student_version,
            "alias": CHALLENGER if decided["ship"] else DISTILLED,
            "run_id": run_id,
            "layers": layers,
            "teacher_blocks": len(blocks_of(teacher.model)),
            "parameters": {"teacher": _count(teacher.model), "student": _count(student)},
            "distill": {"steps": cfg.distill.steps, "best_step": fitted.best_step, "seconds": fitted.seconds},
            "history": fitted.history,
            "test": {k: test[k] for k in ("accuracy", "macro_f1", "loss")},
            "baseline_check": baseline,
            "export": exported,
            "ship": decided["ship"],
            "reason": decided["reason"],
            "checks": decided["checks"],
            "speed": decided["speed"],
            "vs_teacher": decided["rung"],
            "tracking_uri": tracker.uri,
        }
        summary["promotion"] = (
            auto_promote(tracker, name, student_version, cfg.training.device, workdir) if promote and decided["ship"]
            else {"outcome": "not judged", "reasons": ["not asked (--promote)" if not promote else decided["reason"]]}
        )  # fmt: skip
        summary["seconds"] = round(time.perf_counter() - started, 1)
        path = workdir / "distill-summary.json"
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        tracker.log_artifacts(run_id, path)
    print(f"{name} v{student_version} (student of v{version}, blocks {layers}): {decided['reason']}")
    return summary


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
