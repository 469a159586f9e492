"""Shared fixtures: real demo data prepared once per session, small user datasets written per test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three demo datasets, built from the offline sources exactly as `transflow data prepare` does."""
    from tasks.datasets import prepare_all

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_all(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_text_data(tmp_path: Path) -> Path:
    """A user's own JSONL dataset: three splits, two classes."""
    words = {"pos": ["great", "lovely", "superb", "fine"], "neg": ["awful", "bad", "poor", "horrid"]}
    for split, n in (("train", 12), ("validation", 6), ("test", 6)):
        rows = [{"text": f"a {words[lab][i % 4]} day {i}", "label": lab} for i in range(n) for lab in words]
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    return tmp_path
