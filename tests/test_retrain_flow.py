"""The retraining flow end to end: real MiniLM, real tweets in a real DVC repo, a real Prefect run
(Prefect's local server), a real MLflow sqlite store in a temp dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from runconfig import ConfigError
from tests.conftest import ROOT, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.integration]
LINEAGE = (
    "data_version",
    "git_commit",
    "git_dirty",
    "config_hash",
    "backbone",
    "version.torch",
    "version.transformers",
)


def smoke_overrides(tweets_repo: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"data.path={tweets_repo / 'data'}",
        f"data.dvc_file={tweets_repo / 'data.dvc'}",
        f"output_dir={tmp_path / 'runs'}",
        f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *extra,
    ]


@pytest.fixture(scope="module")
def smoke_run(tweets_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    from flows.retrain import retrain

    tmp = tmp_path_factory.mktemp("smoke")
    summary_path = tmp / "summary.json"
    result = retrain(str(ROOT / "configs/smoke-text.yaml"), smoke_overrides(tweets_repo, tmp), str(summary_path))
    return result, tmp


def test_flow_registers_a_challenger_with_every_lineage_tag(smoke_run: tuple[dict, Path], tweets_repo: Path) -> None:
    summary, tmp = smoke_run
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    version = client.get_model_version_by_alias("smoke-text", "challenger")
    assert str(version.version) == summary["model_version"] and version.run_id == summary["run_id"]
    for key in LINEAGE:
        assert version.tags.get(key), f"lineage tag {key} missing"
    pinned = (tweets_repo / "data.dvc").read_text().split("md5: ")[1].split(".dir")[0]
    assert version.tags["data_version"] == pinned == summary["data_version"]
    assert version.tags["backbone"] == "minilm"
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["stages.0.kind"] == "probe"
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "model")}
    assert {"model/encoder", "model/head.safetensors", "model/tokenizer", "model/transflow.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(summary["run_id"], "plots")} == {
        "plots/validation_curves.png",
        "plots/confusion_matrix.png",
    }


def test_each_stage_has_a_nested_run_with_epoch_metrics(smoke_run: tuple[dict, Path]) -> None:
    summary, tmp = smoke_run
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    children = client.search_runs(
        [client.get_run(summary["run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary['run_id']}'",
    )
    assert sorted(r.data.tags["stage"] for r in children) == ["lora", "partial", "probe"]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_macro_f1")
        stage = next(s for s in summary["stages"] if s["kind"] == child.data.tags["stage"])
        assert len(history) == stage["best_epoch"] or len(history) >= stage["best_epoch"] >= 1
        assert max(m.value for m in history) == pytest.approx(stage["best_val_macro_f1"])
    parent = client.get_run(summary["run_id"]).data.metrics
    for stage in summary["stages"]:
        assert parent[f"{stage['name']}.test_macro_f1"] == pytest.approx(stage["test"]["macro_f1"])
    assert parent["test_macro_f1"] == pytest.approx(summary["test"]["macro_f1"])
    assert {"classical", "frozen_probe"} == set(summary["baselines"])


def test_summary_json_matches_the_registry(smoke_run: tuple[dict, Path]) -> None:
    summary, tmp = smoke_run
    written = json.loads((tmp / "summary.json").read_text())
    assert written["model_version"] == summary["model_version"]
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    version = client.get_model_version("smoke-text", written["model_version"])
    assert version.run_id == written["run_id"]
    assert float(version.tags["test_macro_f1"]) == pytest.approx(written["test"]["macro_f1"], abs=1e-4)
    assert json.loads(version.tags["classes"]) == written["classes"] == ["negative", "neutral", "positive"]
    best = max(reversed(written["stages"]), key=lambda s: s["best_val_macro_f1"])
    assert written["selected_stage"]["name"] == best["name"] and written["selected_stage"]["rule"] == "best"
    assert written["test"]["macro_f1"] == pytest.approx(best["test"]["macro_f1"])  # the chosen stage is the model
    check = written["baseline_check"]
    assert version.tags["baselines.passed"] == str(check["passed"]).lower()
    beaten = all(written["test"]["macro_f1"] >= b["macro_f1"] for b in written["baselines"].values())
    assert check["passed"] is beaten and version.tags["baselines.detail"] == check["detail"]


def test_rerun_resumes_finished_stages_and_registers_once_per_run(
    smoke_run: tuple[dict, Path], tweets_repo: Path
) -> None:
    from flows.retrain import retrain

    first, tmp = smoke_run
    again = retrain(str(ROOT / "configs/smoke-text.yaml"), smoke_overrides(tweets_repo, tmp))
    assert all(s["resumed"] for s in again["stages"])
    assert again["test"]["macro_f1"] == pytest.approx(first["test"]["macro_f1"], abs=1e-6)
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    versions = client.search_model_versions("name='smoke-text'")
    assert sorted(v.run_id for v in versions) == sorted({first["run_id"], again["run_id"]})


def registered_names(tmp: Path) -> list[str]:
    if not (tmp / "mlflow.db").exists():
        return []
    return [m.name for m in MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").search_registered_models()]


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (["backbone.uri=/no/such/backbone"], "does not exist"),
        (["stages=[]"], "at least 1 item"),
        (["stages.0.kind=distill"], "stages.0.kind"),
        (["stages.1.lr=0"], "greater than 0"),
        (["data.labels=[negative]"], "not in data.labels"),
    ],
)
def test_bad_input_fails_before_training_and_registers_nothing(
    tweets_repo: Path, tmp_path: Path, extra: list[str], error: str
) -> None:
    from flows.retrain import retrain

    with pytest.raises((ConfigError, ValueError), match=error):
        retrain(str(ROOT / "configs/smoke-text.yaml"), smoke_overrides(tweets_repo, tmp_path, *extra))
    assert registered_names(tmp_path) == []
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("done.json"))


def test_single_class_and_empty_data_are_clear_errors(tmp_path: Path) -> None:
    from flows.retrain import retrain

    for split in ("train", "validation", "test"):
        write_jsonl(
            tmp_path / "one" / f"{split}.jsonl", [{"text": "only", "label": "x"}, {"text": "one", "label": "x"}]
        )
        write_jsonl(tmp_path / "empty" / f"{split}.jsonl", [])
    for folder, error in (("one", "only one class"), ("empty", "split is empty")):
        extra = [f"data.path={tmp_path / folder}", "data.dvc_file=null", f"output_dir={tmp_path}/runs"]
        with pytest.raises(ValueError, match=error):
            retrain(str(ROOT / "configs/smoke-text.yaml"), [*extra, f"registry.tracking_uri=sqlite:///{tmp_path}/m.db"])
    assert registered_names(tmp_path) == []


def test_probe_only_schedule_exports_with_parity(tiny_bert_dir: Path, tweets_repo: Path, tmp_path: Path) -> None:
    """The probe's test logits come from cached features; they must line up with the ONNX pass."""
    from flows.retrain import retrain

    summary = retrain(
        str(ROOT / "configs/smoke-text.yaml"),
        smoke_overrides(
            tweets_repo,
            tmp_path,
            f"backbone.uri={tiny_bert_dir}",
            "stages=[{kind: probe, epochs: 1}]",
            "evaluation.baselines=false",
        ),
    )
    assert summary["export"]["parity_passed"] and summary["export"]["fp32_max_abs_diff"] <= 1e-4
