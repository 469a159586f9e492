"""Every rung of the int8 export ladder for a registered version, tried to the end (the export itself stops at the
first rung that keeps the budgets): accuracy, macro-F1, worst class drop and batch-1 latency per rung, as JSON.

    .venv/bin/python scripts/ladder_rungs.py tweets-sentiment@champion [--tracking-uri URI] [--out rungs.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from models.adapters import load_model_dir
from models.trainer import predict
from tasks.data import load_dataset
from tasks.export import calibration_feeds, export_onnx, optimise
from tasks.export_ladder import run_ladder
from tasks.finetune import encode_splits
from tasks.lineage import parse_target
from tasks.registered_version import require_version, run_config
from tasks.report_speed import cpu_info, isa_label
from tasks.tracking import Tracker, resolve_tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tracker = Tracker(resolve_tracking_uri(args.tracking_uri))
    name, alias, version = parse_target(args.target)
    version = version or tracker.alias_version(name, alias or "champion")
    record = require_version(tracker, name, str(version))
    with tempfile.TemporaryDirectory(prefix="ladder-") as tmp:
        work = Path(tmp)
        cfg = run_config(tracker, record, work)
        adapter, model, meta = load_model_dir(tracker.download(f"runs:/{record.run_id}/model", work / "model"))
        dataset = load_dataset(cfg.data, seed=cfg.training.seed)
        batches = encode_splits(adapter, dataset, ("test",)).batches(adapter, "test", cfg.training.eval_batch_size,
                                                                     sort=True)  # fmt: skip
        torch_logits, labels, _ = predict(model, batches, "cpu", title="torch test logits")
        raw = export_onnx(model, adapter, batches[0][0], work / "raw.onnx", cfg.export.opset)
        fp32 = optimise(raw, work / "model.onnx", model)
        calibration = calibration_feeds(adapter, dataset.validation.items, cfg.export.calibration_size)
        started = time.perf_counter()
        ladder = run_ladder(
            fp32, raw, work, [{k: v.numpy() for k, v in x.items()} for x, _ in batches], labels,
            torch_logits.argmax(-1), meta["classes"], calibration["feeds"], cfg.export.int8_budget_pt,
            cfg.export.int8_class_budget_pt, cfg.export.ladder, try_all=True,
        )  # fmt: skip
    result = {"model": name, "version": record.version, "cpu": isa_label(cpu_info()), "test_size": len(labels),
              "seconds": round(time.perf_counter() - started, 1), "calibration_sha256": calibration["sha256"],
              **{k: v for k, v in ladder.items() if k != "file"}}  # fmt: skip
    for r in result["rungs"]:
        r.pop("file", None)
        worst = f"{r['worst_class']} {r['worst_class_drop_pt'] or 0:+.2f} pt"
        print(f"{r['rung']:<18} acc {r['accuracy'] or 0:.4f} macro-F1 {r['macro_f1'] or 0:.4f} "
              f"macro Δ {r['macro_drop_pt'] or 0:+.2f} pt worst class {worst}  b1 {r['latency_b1_ms']} ms  "
              f"{'PASS' if r['passed'] else 'fail'}")  # fmt: skip
    print(f"ships: {result['shipped']} ({result['reason']}); {result['cpu']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
