"""What MLflow users expect to find on a run and a model version, as plain values (no MLflow import here).

- the standard source tags (`mlflow.source.*`), so the MLflow UI shows where a run came from;
- the DVC data version as the run's dataset input (digest = the md5 in `data.dvc`, source = that file + commit);
- the model version's description: its test metrics next to its run's baselines, and its data version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SOURCE_TYPE = "JOB"  # MLflow's SourceType for a scheduled or CLI-started pipeline run (not a notebook)


def source_tags(lineage: dict[str, str], entry_point: str) -> dict[str, str]:
    """`mlflow.source.name` (the flow file), `.type`, `.git.commit`; MLflow's own keys beside our lineage."""
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": SOURCE_TYPE}
    commit = lineage.get("git_commit", "")
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def dataset_input(dvc_file: Path | None, data_path: Path, data_version: str, git_commit: str) -> dict[str, Any] | None:
    """The run's training data as MLflow records a dataset: None for unversioned data (nothing to point at)."""
    if dvc_file is None or data_version in ("", "unversioned"):
        return None
    return {
        "name": Path(data_path).name or "data",
        "digest": data_version,
        "source": {"dvc_file": str(dvc_file), "path": str(data_path), "git_commit": git_commit},
    }


def version_description(
    summary: dict[str, Any], metric: str, data_version: str, run_tags: dict[str, str] | None = None
) -> str:
    """Markdown for the registry page: test scores, the baselines they were measured against, the data."""
    test = summary.get("test", {})
    lines = [
        f"Fine-tuned by transflow run `{summary.get('run_id', '')}`.",
        "",
        "| | accuracy | macro-F1 |",
        "| --- | --- | --- |",
        f"| **this model** (test) | {_num(test.get('accuracy'))} | {_num(test.get('macro_f1'))} |",
    ]
    for name, scores in (summary.get("baselines") or {}).items():
        lines.append(f"| baseline {name} | {_num(scores.get('accuracy'))} | {_num(scores.get('macro_f1'))} |")
    check = summary.get("baseline_check")
    tags = run_tags or {}
    if check is None and "baselines.passed" in tags:
        check = {"passed": tags["baselines.passed"] == "true", "detail": tags.get("baselines.detail", "")}
    lines.append("")
    if check is None:
        lines.append("No baselines evaluated (evaluation.baselines: false).")
    else:
        verdict = "beats its baselines" if check.get("passed") else "**loses to a baseline**"
        lines.append(f"On {metric}, {verdict}: {check.get('detail', '')}.")
    stage = summary.get("selected_stage")
    if stage:
        lines.append(f"Selected stage: {stage.get('name')} ({stage.get('why')}).")
    lines.append(f"Data: DVC md5 `{data_version}`.")
    return "\n".join(lines)


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"
