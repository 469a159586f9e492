"""Durable local state: every marker the resume logic trusts survives a crash at any step of its writing, and a
damaged one is reported and the work redone, never a crash. Crashes are injected at each file-system call
(write, fsync, rename) of a marker, of a checkpoint and of a stage's completion."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models import checkpoint as ckpt
from models import durable
from models.durable import read_json, write_atomic, write_json


class Killed(BaseException):
    """The process dies here: nothing after this call happens (a BaseException, like SystemExit)."""


class Crasher:
    """Counts the file-system calls that make a file durable and 'kills' the process at call number `at`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int | None) -> None:
        self.at, self.count = at, 0
        for owner, attr in [(os, "fsync"), (os, "replace"), (Path, "rename"), (Path, "write_text")]:
            monkeypatch.setattr(owner, attr, self.wrap(getattr(owner, attr)))
        monkeypatch.setattr(durable.tempfile, "mkstemp", self.wrap(durable.tempfile.mkstemp))

    def wrap(self, real):
        def call(*args, **kwargs):
            self.count += 1
            if self.at is not None and self.count == self.at:
                raise Killed(f"killed at file-system call {self.count}")
            return real(*args, **kwargs)

        return call


def test_atomic_write_leaves_the_old_or_the_new_file_at_every_crash_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "done.json"
    write_json(target, {"v": "old"})
    with monkeypatch.context() as mp:
        total = Crasher(mp, None)
        write_json(target, {"v": "new"})
    points = total.count
    assert points >= 4  # mkstemp, fsync of the file, rename, fsync of the directory
    for at in range(1, points + 1):
        write_json(target, {"v": "old"})
        with monkeypatch.context() as mp:
            Crasher(mp, at)
            with pytest.raises(Killed):
                write_json(target, {"v": "new" * 1000})
        assert json.loads(target.read_text())["v"] in ("old", "new" * 1000), at
        assert [p.name for p in tmp_path.iterdir()] == ["done.json"], "no temp file left behind"


def test_a_damaged_json_marker_is_reported_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = write_atomic(tmp_path / "done.json", '{"name": "full", "best_ep')  # cut short
    with caplog.at_level(logging.WARNING, logger="transflow.durable"):
        assert read_json(marker, "stage marker") is None
    assert "stage marker" in caplog.text and "damaged" in caplog.text
    assert read_json(tmp_path / "absent.json") is None


def tiny_training() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.5, total_iters=10)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def position(step: int) -> dict[str, int]:
    return {"epoch": step // 10, "batch": step % 10, "step": step}


def test_checkpoint_killed_at_every_step_resumes_from_a_whole_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, scheduler = tiny_training()
    root = tmp_path / "checkpoints"
    ckpt.write_checkpoint(root, model, optimizer, scheduler, position(3))
    with monkeypatch.context() as mp:
        total = Crasher(mp, None)
        ckpt.write_checkpoint(root, model, optimizer, scheduler, position(4))
    points = total.count
    assert points >= 8  # the files' fsyncs, the marker's write/fsync/rename, the directory's rename and fsync
    for at in range(1, points + 1):
        shutil.rmtree(root)  # back to one checkpoint, at step 3
        ckpt.write_checkpoint(root, model, optimizer, scheduler, position(3))
        with monkeypatch.context() as mp:
            Crasher(mp, at)
            with pytest.raises((Killed, OSError)):  # OSError: write_checkpoint reports a failed write as such
                ckpt.write_checkpoint(root, model, optimizer, scheduler, position(4))
        found = ckpt.latest_checkpoint(root)
        assert found is not None and found.name.startswith(("step-000000003", "step-000000004")), at
        fresh, opt, sched = tiny_training()
        assert ckpt.load_checkpoint(found, fresh, opt, sched)["step"] in (3, 4)


def test_a_damaged_checkpoint_is_reported_and_the_one_before_it_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, optimizer, scheduler = tiny_training()
    root = tmp_path / "checkpoints"
    ckpt.write_checkpoint(root, model, optimizer, scheduler, position(3))
    newest = ckpt.write_checkpoint(root, model, optimizer, scheduler, position(4))
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])  # a disk error or a copy cut short, after the marker
    with caplog.at_level(logging.WARNING, logger="transflow.checkpoint"):
        found = ckpt.latest_checkpoint(root)
    assert found is not None and "000000003" in found.name and "is damaged" in caplog.text
    (found / "state.json").write_text("{")
    assert ckpt.latest_checkpoint(root) is None  # nothing readable: the stage starts over, no crash


def test_stage_completion_killed_at_every_step_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The end of a stage: final weights (fsynced), done.json (atomic), checkpoints removed. A kill at any step
    leaves a stage that either counts as finished (whole marker and weights) or resumes from its checkpoint."""
    from dataclasses import asdict

    from runconfig import StageConfig
    from tasks.finetune import StageOutcome, finished, resume_point, stage_dir

    stage = StageConfig(kind="full", epochs=2, lr=1e-3)
    model, optimizer, scheduler = tiny_training()
    outcome = StageOutcome(stage.label, "full", 2, 0.5, 1.0, 10.0, [{"epoch": 1.0}], [(1, 0.7)])

    def complete(out: Path) -> None:  # what run_stage does once training is over
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "final.safetensors"))
        durable.fsync_file(out / "final.safetensors")
        write_json(out / "done.json", asdict(outcome))
        shutil.rmtree(out / "checkpoints")

    def fresh_stage(workdir: Path) -> Path:
        out = stage_dir(workdir, stage)
        ckpt.write_checkpoint(out / "checkpoints", model, optimizer, scheduler, position(12))
        return out

    counted = fresh_stage(tmp_path / "count")
    with monkeypatch.context() as mp:
        total = Crasher(mp, None)
        complete(counted)
    for at in range(1, total.count + 1):
        workdir = tmp_path / f"at-{at}"
        out = fresh_stage(workdir)
        with monkeypatch.context() as mp:
            Crasher(mp, at)
            with pytest.raises(Killed):
                complete(out)
        done = finished(workdir, stage)
        assert done is not None or resume_point(workdir, stage) == {"epoch": 1, "batch": 2, "step": 12}, at
        assert done is None or (done.resumed and done.best_metric == 0.5)
    damaged = tmp_path / "damaged"
    out = fresh_stage(damaged)
    complete(out)
    (out / "done.json").write_text('{"name": "full", "kind"')
    assert finished(damaged, stage) is None and "training it again" in capsys.readouterr().out


def test_resume_report_names_skipped_and_continued_stages() -> None:
    from flows.train import resume_report

    stages = [
        {"name": "probe", "resumed": True, "resumed_from": None},
        {"name": "full", "resumed": False, "resumed_from": {"epoch": 1, "batch": 3, "step": 14}},
    ]
    assert resume_report(stages) == {"resume.skipped": "probe", "resume.continued": "full@epoch=1,batch=3,step=14"}
    assert resume_report([{"name": "full", "resumed": False, "resumed_from": None}]) == {}
