"""Crash and resume: complete checkpoints, a half-written one never picked, and a run killed with SIGKILL
mid-stage that, re-run, skips finished stages and reaches the same metrics as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.checkpoint import COMPLETE, complete_checkpoints, latest_checkpoint
from models.stages import StageSpec, train_stage
from models.text import TextAdapter
from models.trainer import FitPlan, seed_everything
from tasks.finetune import Encoded
from tests.conftest import ROOT


class Crash(RuntimeError):
    pass


class CrashingBatches:
    """The batches of one epoch, raising at batch `at`: a crash in the middle of training."""

    def __init__(self, batches, at: int | None):
        self.batches, self.at = batches, at

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        if self.at is not None and i == self.at:
            raise Crash(f"killed at batch {i}")
        return self.batches[i]


def train(tiny_bert_dir: Path, data: Encoded, workdir: Path, crash: tuple[int, int] | None) -> tuple:
    seed_everything(3)
    adapter = TextAdapter(max_length=16)
    adapter.build(str(tiny_bert_dir), 2)
    torch.manual_seed(0)
    model = adapter.build(str(tiny_bert_dir), 2)
    seed_everything(3)

    def batches(epoch: int) -> CrashingBatches:
        at = crash[1] if crash and crash[0] == epoch else None
        return CrashingBatches(data.batches(adapter, "train", 4, seed=epoch), at)

    spec = StageSpec(kind="full", epochs=3, lr=2e-3)
    plan = FitPlan(epochs=3, checkpoint_every=2)
    result = train_stage(
        model,
        spec,
        batches,
        data.batches(adapter, "validation", 8),
        plan,
        workdir / "best.safetensors",
        [],
        resume_dir=workdir / "checkpoints",
    )
    return model, result


def test_crash_mid_epoch_then_resume_matches_an_uninterrupted_run(
    tiny_bert_dir: Path, tiny_text_data: Path, tmp_path: Path
) -> None:
    from runconfig import DataConfig
    from tasks.data import load_dataset

    adapter = TextAdapter(max_length=16)
    adapter.build(str(tiny_bert_dir), 2)
    ds = load_dataset(DataConfig(modality="text", path=tiny_text_data, dvc_file=None))
    data = Encoded(*((adapter.encode(ds.split(s).items), ds.split(s).labels) for s in ("train", "validation", "test")))

    reference, ref_result = train(tiny_bert_dir, data, tmp_path / "clean", None)
    with pytest.raises(Crash):
        train(tiny_bert_dir, data, tmp_path / "crashed", crash=(1, 3))
    saved = latest_checkpoint(tmp_path / "crashed" / "checkpoints")
    assert saved is not None and "epoch-0001-batch-000002" in saved.name, saved
    resumed, res_result = train(tiny_bert_dir, data, tmp_path / "crashed", None)
    assert [r["train_loss"] for r in res_result.history] == pytest.approx(
        [r["train_loss"] for r in ref_result.history], abs=1e-6
    )
    assert res_result.best_metric == pytest.approx(ref_result.best_metric)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-6, rtol=1e-5)


def test_half_written_checkpoints_are_never_picked(tmp_path: Path) -> None:
    from models.checkpoint import write_checkpoint

    root = tmp_path / "checkpoints"
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
    good = write_checkpoint(root, model, optimizer, scheduler, {"step": 4, "epoch": 0, "batch": 4})
    (root / "step-000000006-epoch-0000-batch-000006.tmp").mkdir()  # killed while writing
    (root / "step-000000008-epoch-0001-batch-000000").mkdir()  # renamed but no marker: never happens, still refused
    (root / "step-000000009-epoch-0001-batch-000001").mkdir()
    (root / "step-000000009-epoch-0001-batch-000001" / COMPLETE).write_text("ok")  # a marker over nothing: damaged
    assert complete_checkpoints(root)[0] == good
    assert latest_checkpoint(root) == good  # the damaged one after it is reported and passed over


WORKER = """
import sys
from flows.retrain import retrain
retrain(sys.argv[1], sys.argv[2:])
"""


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_mid_stage_then_rerun_skips_finished_stages_and_matches(
    tiny_bert_dir: Path, tweets_repo: Path, tmp_path: Path
) -> None:
    def overrides(out: Path) -> list[str]:
        return [
            f"backbone.uri={tiny_bert_dir}",
            f"data.path={tweets_repo / 'data'}",
            f"data.dvc_file={tweets_repo / 'data.dvc'}",
            f"output_dir={out}",
            f"registry.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            "training.checkpoint_every_steps=2",
            "data.train_limit=160",
            "stages.1.epochs=3",
            "export.enabled=false",
            "evaluation.baselines=false",
        ]

    config = str(ROOT / "configs/smoke-text.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    clean = subprocess.run(
        [sys.executable, "-c", WORKER, config, *overrides(tmp_path / "clean")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert clean.returncode == 0, clean.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, config, *overrides(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("*/stages/partial/checkpoints/step-*-epoch-0001-*")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (next(out.glob("*/stages/probe")) / "done.json").is_file(), "probe finished before the kill"
    assert not list(out.glob("*/stages/partial/done.json")), "killed mid-stage"

    rerun = subprocess.run(
        [sys.executable, "-c", WORKER, config, *overrides(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    first = json.loads(next((tmp_path / "clean").glob("*/run-summary.json")).read_text())
    second = json.loads(next(out.glob("*/run-summary.json")).read_text())
    assert [s["resumed"] for s in second["stages"]] == [True, False, False]
    # the rerun says what it took over: on the console, in the summary and as tags of its run
    c = second["stages"][1]["resumed_from"]  # the newest complete checkpoint at the kill (its writing may be cut)
    assert c is not None and c["step"] > 0 and second["stages"][2]["resumed_from"] is None
    said = rerun.stdout + rerun.stderr
    assert "stage probe: finished by an earlier run" in said
    assert f"continuing from checkpoint epoch {c['epoch']}, batch {c['batch']}, step {c['step']}" in said
    assert second["resume"] == {
        "resume.skipped": "probe",
        "resume.continued": f"partial@epoch={c['epoch']},batch={c['batch']},step={c['step']}",
    }
    from tasks.tracking import Tracker

    tracker = Tracker(f"sqlite:///{out / 'mlflow.db'}")
    runs = {r.run_id: r for r in tracker.runs("transflow") if "mlflow.parentRunId" not in r.tags}
    killed = next(r for r in runs.values() if r.run_id != second["run_id"])
    assert killed.status == "KILLED" and killed.tags["transflow.superseded_by"] == second["run_id"]
    new = runs[second["run_id"]]
    assert new.status == "FINISHED" and new.tags["transflow.resumes_run"] == killed.run_id
    assert {k: new.tags[k] for k in ("resume.skipped", "resume.continued")} == second["resume"]
    for a, b in zip(first["stages"], second["stages"], strict=True):
        assert b["test"]["macro_f1"] == pytest.approx(a["test"]["macro_f1"], abs=1e-6), a["name"]
    assert second["test"]["loss"] == pytest.approx(first["test"]["loss"], abs=1e-5)


HOLDS_A_RUN = """
import sys, time
from pathlib import Path
from tasks.run_state import owned_run
from tasks.tracking import Tracker
with owned_run(Tracker(sys.argv[1]), "runs", "a flow", {}, Path(sys.argv[2])) as run_id:
    print("RUN", run_id, flush=True)
    time.sleep(300)
"""


@pytest.mark.slow
def test_sigterm_ends_a_run_killed_and_a_sigkilled_ones_run_is_closed_by_the_next(tmp_path: Path) -> None:
    from tasks.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ids = []
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDS_A_RUN, uri, str(tmp_path / "work")], env=env, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        said = [proc.stdout.readline() for _ in range(len(ids) + 1)]  # the second also reports the stale run
        ids.append(said[-1].removeprefix("RUN ").strip())
        assert len(ids) == 1 or "marked KILLED" in said[0]
        proc.send_signal(sig)
        proc.wait(60)
    tracker = Tracker(uri)
    killed, terminated = ids
    assert tracker.run_status(killed) == "KILLED"  # closed by the next run, not left RUNNING forever
    assert tracker.run_tags(killed)["transflow.superseded_by"] == terminated
    assert tracker.run_tags(terminated)["transflow.resumes_run"] == killed
    assert tracker.run_status(terminated) == "KILLED"  # ended by its own SIGTERM handler
    assert not (tmp_path / "work" / "active-run.json").exists()


DISK_FULL = """
import resource, signal, sys
from pathlib import Path
import torch
from models.checkpoint import write_checkpoint
from transflow_edge.bundle import pack
root = Path(sys.argv[1])
model = torch.nn.Linear(512, 512)
opt = torch.optim.AdamW(model.parameters())
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
model(torch.randn(2, 512)).sum().backward(); opt.step()
write_checkpoint(root / "ckpt", model, opt, sched, {"step": 1, "epoch": 0, "batch": 1})
(root / "bundle").mkdir(); (root / "bundle" / "model.onnx").write_bytes(__import__("os").urandom(3_000_000))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
failures = []
try:
    write_checkpoint(root / "ckpt", model, opt, sched, {"step": 2, "epoch": 0, "batch": 2})
except OSError as exc:
    failures.append(f"checkpoint: {exc}")
try:
    pack(root / "bundle", root / "bundle.tar.gz")
except OSError as exc:
    failures.append(f"bundle: {exc}")
print("|".join(failures))
"""


def test_disk_full_while_writing_keeps_the_previous_checkpoint_and_no_partial_bundle(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    checkpoint_error, bundle_error = proc.stdout.strip().split("|")
    assert "could not write checkpoint step-000000002" in checkpoint_error and "File too large" in checkpoint_error
    assert "previous checkpoint is intact" in checkpoint_error
    assert "could not write bundle archive bundle.tar.gz" in bundle_error and "File too large" in bundle_error
    assert not list((tmp_path / "ckpt").glob("*.tmp")), "no half-written checkpoint left behind"
    latest = latest_checkpoint(tmp_path / "ckpt")
    assert latest is not None and latest.name.startswith("step-000000001-"), "the previous checkpoint stays the latest"
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    from models.checkpoint import load_checkpoint

    assert load_checkpoint(latest, model, opt, sched)["step"] == 1
    assert not (tmp_path / "bundle.tar.gz").exists(), "a failed pack leaves no archive under the final name"
