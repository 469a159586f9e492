"""`training.system_metrics`: MLflow's own monitor samples CPU, memory, disk and network into the run while the
stages train, and nothing when it is off (the default)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from runconfig import load_config
from tasks.tracking import Tracker


def system_keys(tracker: Tracker, run_id: str) -> set[str]:
    return {k for k in tracker.client.get_run(run_id).data.metrics if k.startswith("system/")}


def test_samples_land_in_the_run_only_when_enabled(tmp_path: Path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    on = tracker.start_run("system-metrics", "on", {})
    with tracker.system_metrics(on, enabled=True, interval_s=0.2):
        time.sleep(1.5)
    off = tracker.start_run("system-metrics", "off", {})
    with tracker.system_metrics(off, enabled=False, interval_s=0.2):
        time.sleep(0.5)
    sampled = system_keys(tracker, on)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= sampled, sampled
    assert system_keys(tracker, off) == set()
    steps = tracker.client.get_metric_history(on, "system/cpu_utilization_percentage")
    assert len(steps) >= 2, "sampled repeatedly, not once"


def test_the_switch_is_a_validated_config_key() -> None:
    sampled = ["training.system_metrics=true", "training.system_metrics_interval_s=5"]
    cfg = load_config("configs/smoke-text.yaml", sampled)
    assert cfg.training.system_metrics and cfg.training.system_metrics_interval_s == 5
    assert not load_config("configs/smoke-text.yaml", []).training.system_metrics
    with pytest.raises(Exception, match="system_metrics_interval_s"):
        load_config("configs/smoke-text.yaml", ["training.system_metrics_interval_s=0"])
