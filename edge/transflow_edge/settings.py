"""What the edge server can be told: limits, batching, the state dir and the admin token."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from transflow_edge.bundle import MAX_BUNDLE_BYTES

log = logging.getLogger("transflow.edge")


TOKEN_ENV = "TRANSFLOW_EDGE_TOKEN"
MIN_TOKEN_CHARS = 16

@dataclass(frozen=True)
class Settings:
    """Everything the server can be told; the CLI fills it from flags and the environment."""

    bundle: Path | None = None  # a bundle dir or .tar.gz to install and serve at start
    state_dir: Path | None = None  # bundles/<sha256>/, current, previous; a temporary one when None
    token: str | None = None  # admin bearer token; None disables the admin endpoints
    max_items: int = 64
    max_text_chars: int = 10_000
    max_body_bytes: int = 16 << 20  # predict requests
    max_upload_bytes: int = 1 << 30  # bundle archives as sent
    max_bundle_bytes: int = MAX_BUNDLE_BYTES  # bundle archives unpacked
    max_batch: int = 32  # items per onnxruntime call; 1 disables micro-batching
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    max_queue: int = 4096  # queued items before predict answers 503
    intra_op_threads: int = 0  # 0: onnxruntime's choice (one per physical core)
    watch_dir: Path | None = None  # serve the newest bundle .tar.gz in this folder (air-gapped sites)
    watch_interval_s: float = 2.0  # how often the folder is looked at

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the admin token must have at least {MIN_TOKEN_CHARS} characters")
        if min(self.max_items, self.max_text_chars, self.max_body_bytes, self.max_batch, self.max_queue) < 1:
            raise ValueError("limits and batch sizes must be positive")
        if self.max_wait_ms < 0 or self.intra_op_threads < 0:
            raise ValueError("max_wait_ms and intra_op_threads must not be negative")
        if self.watch_interval_s <= 0:
            raise ValueError("watch_interval_s must be positive")


def load_token(token_file: Path | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The admin token from --token-file, else from $TRANSFLOW_EDGE_TOKEN; None leaves admin disabled."""
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token:
            raise ValueError(f"{token_file}: empty token file")
        return token
    return (environ if environ is not None else os.environ).get(TOKEN_ENV, "").strip() or None
