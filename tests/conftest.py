"""Shared fixtures: real demo data prepared once per session, small user datasets written per test."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DVC = str(ROOT / ".venv" / "bin" / "dvc") if (ROOT / ".venv" / "bin" / "dvc").exists() else "dvc"
# Prefect state of the tests lives in a throwaway home, never in ~/.prefect; no telemetry.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="transflow-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLflow 3 servers start ~8 job-runner processes (GenAI judges) by default: the tests use none, and on 2 cores
# each server's start costs seconds of CPU. DVC's analytics daemon likewise.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Flush and stop the temporary Prefect server that in-process flow runs started, while pytest's streams are
    still open: Prefect's own exit hook would do it later, logging into closed streams (a screenful of 'Logging
    error' tracebacks at the end of every run), and would wait without bound for events queued for it."""
    import sys

    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)
    for server in list(server_module.SubprocessASGIServer._instances.values()):
        server.stop()


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three demo datasets, built from the offline sources exactly as `transflow data prepare` does."""
    from tasks.demo_datasets import prepare_all

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


def dvc_repo_with(src: Path, repo: Path) -> Path:
    """A real git + DVC repo whose `data/` is a copy of `src`, pinned by `dvc add`."""
    shutil.copytree(src, repo / "data")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=repo, check=True)
    subprocess.run([DVC, "add", "-q", "data"], cwd=repo, check=True)
    return repo


@pytest.fixture(scope="session")
def tweets_repo(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real deduplicated tweets in a DVC repo: `<repo>/data/{train,validation,test}.jsonl`."""
    return dvc_repo_with(prepared_data / "tweets", tmp_path_factory.mktemp("tweets") / "repo")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 2-block BERT with MiniLM's real tokenizer, saved as a Hugging Face checkpoint dir."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from models.text import resolve_text_source

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_source("minilm"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
