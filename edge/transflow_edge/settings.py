"""What the edge server can be told: limits, batching, the state dir and the admin token.

Limits against hostile clients, and where each is enforced:
- body size (`max_body_bytes`, `max_upload_bytes`): while the body streams in, before any parsing;
- multipart parts (`max_items`): counted by their delimiters while the body streams in;
- items, text length: while the JSON is parsed (streaming, on a worker thread), first offender refused;
- image formats (`image_formats`) and decoded pixels (`max_image_pixels`, derived from the model's input size
  unless given): read from the image header, before decoding;
- parsing and decoding run on at most `parse_workers` threads, never on the event loop;
- request head time (`head_timeout_s`: the connection is closed) and body read time (`body_timeout_s`: 408);
- connections (`max_connections`: uvicorn's limit_concurrency, 503 above it), idle keep-alive
  (`keep_alive_s`), request-head size (`max_header_bytes`: h11's incomplete-event limit).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from transflow_edge.bundle import MAX_BUNDLE_BYTES
from transflow_edge.preprocess import IMAGE_FORMATS

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
    max_image_pixels: int = 0  # decoded pixels per image; 0: derived from the model's input size
    image_formats: tuple[str, ...] = IMAGE_FORMATS
    parse_workers: int = 4  # threads that parse bodies and decode inputs (bounds their CPU and memory)
    body_timeout_s: float = 30.0  # a request body must arrive within this time
    head_timeout_s: float = 10.0  # a request line + headers must arrive within this time
    max_connections: int = 256  # open connections + running requests; above it new requests get 503
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this time
    max_header_bytes: int = 16 << 10  # request line + headers
    tls_certfile: Path | None = None  # with tls_keyfile: serve HTTPS (the admin token travels over it)
    tls_keyfile: Path | None = None

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the admin token must have at least {MIN_TOKEN_CHARS} characters")
        positive = (self.max_items, self.max_text_chars, self.max_body_bytes, self.max_batch, self.max_queue)
        if min(*positive, self.parse_workers, self.max_connections, self.max_header_bytes) < 1:
            raise ValueError("limits and batch sizes must be positive")
        if self.max_wait_ms < 0 or self.intra_op_threads < 0:
            raise ValueError("max_wait_ms and intra_op_threads must not be negative")
        timeouts = (self.watch_interval_s, self.body_timeout_s, self.head_timeout_s, self.keep_alive_s)
        if min(timeouts) <= 0 or self.max_image_pixels < 0:
            raise ValueError("intervals and timeouts must be positive, max_image_pixels not negative")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("give both tls_certfile and tls_keyfile, or neither")


def load_token(token_file: Path | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The admin token from --token-file, else from $TRANSFLOW_EDGE_TOKEN; None leaves admin disabled."""
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token:
            raise ValueError(f"{token_file}: empty token file")
        return token
    return (environ if environ is not None else os.environ).get(TOKEN_ENV, "").strip() or None
