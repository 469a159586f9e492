"""The candidate report end to end: two real retrains (tiny random-weight BERT, real tweets in a real DVC repo, a
real MLflow sqlite store), the report each builds after its export, the gate requiring significance and naming
the report line it refuses on, `transflow report` rebuilding it, and the HTML's self-containment."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]
MODEL = "report-tweets"


def overrides(repo: Path, backbone: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        f"data.path={repo / 'data'}",
        f"data.dvc_file={repo / 'data.dvc'}",
        f"backbone.uri={backbone}",
        f"output_dir={tmp / 'runs'}",
        f"registry.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"registry.model_name={MODEL}",
        "registry.auto_promote=true",
        "registry.require_significance=true",
        "training.device=cpu",
        "evaluation.baselines=false",  # a random tiny BERT loses to TF-IDF; baselines are not what is tested here
        "export.int8=false",  # the ladder has its own tests
        "stages=[{kind: probe, epochs: 1, lr: 1.0e-2}]",
        "data.train_limit=64",
        "data.test_limit=120",
        *extra,
    ]


@pytest.fixture(scope="module")
def two_versions(tweets_repo: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """v1: a first champion; v2: the same recipe on another seed, a challenger that cannot be significantly
    better on 120 test examples."""
    from flows.retrain import retrain

    tmp = tmp_path_factory.mktemp("report")
    config = str(ROOT / "configs/smoke-text.yaml")
    first = retrain(config, overrides(tweets_repo, tiny_bert_dir, tmp))
    second = retrain(config, overrides(tweets_repo, tiny_bert_dir, tmp, "training.seed=8"))
    return first, second, tmp


def test_report_is_built_beside_the_bundle_and_logged(two_versions: tuple) -> None:
    first, _, _ = two_versions
    written = first["export"]["report"]
    out = Path(written["dir"])
    assert out.parent == Path(first["export"]["bundle_dir"]).parent, "beside the bundle"
    data = json.loads((out / "report.json").read_text())
    assert data["header"]["champion_version"] is None and data["comparison"]["significant"] is None
    assert data["lineage"]["bundle_sha256"] == first["export"]["bundle_sha256"]
    # the training run's own test predictions, put back in split order, pair with the split's labels
    assert data["comparison"]["challenger"]["macro_f1"] == pytest.approx(first["test"]["macro_f1"], abs=1e-9)
    assert {r["runtime"] for r in data["speed"]["latency"]} >= {"torch eager", "ONNX fp32"}
    assert {r["batch"] for r in data["speed"]["latency"]} == {1, 32}
    assert data["speed"]["cpu"]["isa"], "the instruction set flags are read"
    assert first["promotion"]["outcome"] == "promoted" and first["promotion"]["report"] == written["uri"]
    assert data["header"]["build_seconds"]["total"] < 60


def test_gate_requiring_significance_refuses_and_names_the_report_line(two_versions: tuple) -> None:
    _, second, _ = two_versions
    report = json.loads((Path(second["export"]["report"]["dir"]) / "report.json").read_text())
    assert report["header"]["champion_version"] == "1"
    assert report["comparison"]["significant"] is False
    lines = {v["name"]: v for v in report["verdict"]}
    assert not lines["significant"]["ok"] and "NOT significant" in lines["significant"]["detail"]
    decision = second["promotion"]
    assert decision["outcome"] == "refused"
    cited = [r for r in decision["reasons"] if r.startswith("report line 'significant'")]
    assert cited and "#line-significant" in cited[0] and second["export"]["report"]["uri"] in cited[0]


def test_cli_rebuilds_the_report_against_another_alias(two_versions: tuple, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    _, _, tmp = two_versions
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = ["report", f"{MODEL}@challenger", "--against", "1", "--out", str(tmp_path / "r"), "--tracking-uri", uri]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["header"]["version"] == "2" and data["header"]["champion_version"] == "1"
    bad = CliRunner().invoke(app, ["report", f"{MODEL}@nope", "--tracking-uri", uri])
    assert bad.exit_code != 0 and "no alias 'nope'" in bad.output


def test_html_is_self_contained(two_versions: tuple) -> None:
    html = (Path(two_versions[1]["export"]["report"]["dir"]) / "report.html").read_text()
    for section in ("verdict", "comparison", "baselines", "export", "speed", "lineage", "model-card"):
        assert f'id="{section}"' in html
    assert "<svg" in html and 'id="line-significant"' in html
    # nothing the browser could fetch: no external src/href, no url(), no @import, no script
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#|data:)""", html)
    assert not re.search(r"url\((?!#)", html), "only in-page references (SVG clip paths)"
    assert "@import" not in html and "<script" not in html
