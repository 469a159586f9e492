"""Distillation: the student's cut (half the blocks, copied exactly), the KD loss against a hand computation, and
`transflow distill` on a registered tiny BERT: lineage tags, the ship / not-ship verdict with its lines, the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.distill import blocks_of, kd_loss, kept_layers, make_student
from tests.conftest import ROOT

MODEL = "distill-tiny"


def _tiny_bert(tiny_bert_dir: Path) -> torch.nn.Module:
    from models.text import TextAdapter

    return TextAdapter(max_length=16).build(str(tiny_bert_dir), 3)


def _tiny_vit() -> torch.nn.Module:
    from models.backbone import TransferModel
    from models.small_vit import scratch_vit
    from models.vision import ClsPool

    torch.manual_seed(0)
    encoder = scratch_vit("vit-tiny", 14)
    return TransferModel(encoder, ClsPool(), encoder.config.hidden_size, 4)


def test_kept_layers_are_evenly_spaced_and_end_with_the_last() -> None:
    assert kept_layers(6, 3) == [1, 3, 5]
    assert kept_layers(4, 2) == [1, 3]
    assert kept_layers(2, 1) == [1]
    with pytest.raises(ValueError):
        kept_layers(2, 3)


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_student_has_half_the_blocks_copied_exactly_and_the_teacher_head(kind: str, tiny_bert_dir: Path) -> None:
    teacher = _tiny_bert(tiny_bert_dir) if kind == "bert" else _tiny_vit()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    n = len(blocks_of(teacher))
    student, layers = make_student(teacher)
    assert len(blocks_of(student)) == n // 2 == student.encoder.config.num_hidden_layers == len(layers)
    assert layers[-1] == n - 1, "the last block (what the head was trained on) is kept"
    for mine, theirs in zip(blocks_of(student), layers, strict=True):
        got, want = mine.state_dict(), blocks_of(teacher)[theirs].state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert torch.equal(student.head.weight, teacher.head.weight) and torch.equal(student.head.bias, teacher.head.bias)
    emb = "encoder.embeddings"
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items() if k.startswith(emb))
    assert len(blocks_of(teacher)) == n and all(  # the teacher is left as it was
        torch.equal(v, before[k]) for k, v in teacher.state_dict().items()
    )
    assert student.head.weight.data_ptr() != teacher.head.weight.data_ptr(), "a copy, not shared weights"


def test_kd_loss_matches_a_hand_computation_with_kl_div() -> None:
    student = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    teacher = torch.tensor([[1.0, 1.5, -0.5], [-2.0, 0.0, 2.0]])
    labels = torch.tensor([0, 2])
    t, alpha = 3.0, 0.7
    # KL(p_teacher || p_student) per row, averaged over the batch, by the formula sum p_t (log p_t - log p_s)
    p_t = torch.softmax(teacher / t, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / t, -1))).sum(-1).mean()
    assert torch.allclose(kl, F.kl_div(torch.log_softmax(student / t, -1), p_t, reduction="batchmean"))
    want = alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, labels)
    assert torch.allclose(kd_loss(student, teacher, labels, t, alpha), want, atol=1e-6)
    assert torch.allclose(kd_loss(teacher, teacher, labels, t, 1.0), torch.tensor(0.0), atol=1e-6)


# --- `transflow distill` on a registered tiny BERT -------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tweets_repo: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny BERT fine-tuned (probe) on real tweets, registered, exported and promoted to champion."""
    from flows.retrain import retrain

    tmp = tmp_path_factory.mktemp("distill")
    overrides = [
        f"data.path={tweets_repo / 'data'}",
        f"data.dvc_file={tweets_repo / 'data.dvc'}",
        f"output_dir={tmp / 'runs'}",
        f"registry.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"registry.model_name={MODEL}",
        f"backbone.uri={tiny_bert_dir}",
        "stages=[{kind: probe, epochs: 1}]",
        "evaluation.baselines=false",  # a random tiny BERT loses to TF-IDF: the baselines line is tested apart
        "export.report=false",
        "export.ladder=[dynamic]",
        "registry.auto_promote=true",
        # export.distill: the retrain distils its own version after the gate (a too-slow student: the teacher stays)
        "export.distill=true",
        "export.distill_min_speedup=1000",
        "distill.steps=2",
        "distill.eval_rounds=1",
    ]
    summary = retrain(str(ROOT / "configs/smoke-text.yaml"), overrides)
    assert summary["promotion"]["outcome"] == "promoted"
    return {"version": summary["model_version"], "uri": f"sqlite:///{tmp / 'mlflow.db'}", "tmp": tmp,
            "summary": summary}  # fmt: skip


def test_export_distill_runs_the_student_after_the_retrain_and_a_slow_one_leaves_the_teacher(teacher: dict) -> None:
    distilled = teacher["summary"]["distill"]
    assert distilled["teacher_version"] == teacher["version"] and distilled["student_version"] != teacher["version"]
    assert not distilled["ship"] and distilled["alias"] == "distilled" and "required 1000.0×" in distilled["reason"]
    assert distilled["promotion"]["outcome"] == "not judged"
    assert json.loads(json.dumps(teacher["summary"]))["distill"]["layers"] == [1], "the run summary is plain JSON"


def _distill(teacher: dict, out: str, *overrides: str) -> dict:
    from typer.testing import CliRunner

    from flows.cli import app

    sets = [x for o in ("distill.steps=3", "distill.eval_rounds=1", "distill.batch_size=16", *overrides)
            for x in ("--set", o)]  # fmt: skip
    args = ["distill", f"{MODEL}@champion", *sets, "--promote", "--out", str(teacher["tmp"] / out)]
    result = CliRunner().invoke(app, [*args, "--tracking-uri", teacher["uri"]], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return json.loads((teacher["tmp"] / out / "distill-summary.json").read_text()) | {"output": result.output}


def test_a_slow_student_is_registered_with_its_teacher_but_neither_ships_nor_is_promoted(teacher: dict) -> None:
    from tasks.promote import promote_version
    from tasks.tracking import Tracker

    summary = _distill(teacher, "slow", "export.distill_min_speedup=1000", "distill.budget_pt=100",
                       "distill.class_budget_pt=100")  # fmt: skip
    tracker = Tracker(teacher["uri"])
    record = tracker.model_version(MODEL, summary["student_version"])
    assert record.tags["distill.teacher_version"] == teacher["version"] == summary["teacher_version"]
    assert record.tags["distill.teacher"] == f"{MODEL}/{teacher['version']}"
    assert record.tags["backbone"] == f"models:/{MODEL}/{teacher['version']}"
    assert record.tags["distill.ship"] == "false" and not summary["ship"]
    assert summary["reason"].startswith("does not ship: faster:") and "required 1000.0×" in summary["reason"]
    assert {c["name"] for c in summary["checks"]} == {"within_teacher_budget", "beats_baselines", "faster"}
    assert "does not ship" in summary["output"] and "rung dynamic" in summary["output"]
    assert tracker.alias_version(MODEL, "distilled") == summary["student_version"]
    assert tracker.alias_version(MODEL, "challenger") != summary["student_version"]
    assert tracker.alias_version(MODEL, "champion") == teacher["version"]
    assert summary["promotion"]["outcome"] == "not judged"
    # Asked to promote it anyway, the gate refuses it on its distillation line, and the champion stays.
    decision = promote_version(tracker, MODEL, summary["student_version"])
    assert decision.outcome == "refused"
    assert any(c["name"] == "distilled" and not c["ok"] for c in decision.checks)
    assert tracker.alias_version(MODEL, "champion") == teacher["version"]


def test_a_student_within_the_budget_and_fast_enough_ships_and_is_promoted(teacher: dict) -> None:
    from tasks.tracking import Tracker

    summary = _distill(teacher, "fast", "export.distill_min_speedup=0.01", "distill.budget_pt=100",
                       "distill.class_budget_pt=100")  # fmt: skip
    tracker = Tracker(teacher["uri"])
    record = tracker.model_version(MODEL, summary["student_version"])
    assert summary["ship"] and record.tags["distill.ship"] == "true" and summary["reason"].startswith("ships:")
    assert float(record.tags["distill.speedup"]) == summary["speed"]["speedup"] > 0.01
    assert record.tags["exported"] == "true" and record.tags["onnx.parity_passed"] == "true"
    assert summary["layers"] == [1] and summary["teacher_blocks"] == 2
    assert summary["parameters"]["student"] < summary["parameters"]["teacher"]
    checks = {c["name"]: c for c in summary["promotion"]["checks"]}
    assert summary["promotion"]["outcome"] == "promoted", summary["promotion"]["reasons"]
    assert "beats_champion" not in checks and checks["within_teacher_budget"]["ok"] and checks["distilled"]["ok"]
    assert tracker.alias_version(MODEL, "champion") == summary["student_version"]
