"""The light edge inference server: one verified bundle served over HTTP, swapped atomically, no torch.

    POST /v1/predict          {"inputs": [...]} (text, or base64 images; images also as multipart files)
    GET  /v1/model            what is loaded: name, version, lineage, metrics, bundle sha256
    GET  /healthz · /readyz   process alive · a verified model is loaded
    GET  /metrics             Prometheus text: requests, latency, batch sizes, model info
    POST /v1/admin/bundles    upload a bundle .tar.gz (bearer token): verify, golden check, then swap
    POST /v1/admin/rollback   back to the previous bundle (bearer token)

With `watch_dir` (air-gapped sites), the newest `*.tar.gz` dropped into that folder is installed the same way;
`transflow deploy --target dir:///folder` writes archives there atomically, and deleting the newest rolls back.

The pieces, one module each: `settings` (what it can be told), `model` (session, preprocessor, golden check),
`store` (the state directory), `batcher` (micro-batching on a worker thread), `watcher` (the watched folder),
`metrics` (Prometheus), `state` (install, swap, rollback), `parsing` (reading and checking bodies), `app`
(routes, uvicorn). This module is the public entry point: what callers import.
"""

from transflow_edge.app import create_app, serve
from transflow_edge.model import LoadedModel, load_model, open_session, softmax
from transflow_edge.settings import TOKEN_ENV, Settings, load_token

__all__ = [
    "TOKEN_ENV",
    "LoadedModel",
    "Settings",
    "create_app",
    "load_model",
    "load_token",
    "open_session",
    "serve",
    "softmax",
]
