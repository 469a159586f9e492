"""`transflow-edge serve …`: the edge server's own console script (argparse: the edge install has no typer).

The full install's `transflow edge serve …` forwards its arguments here, so the options are defined once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from transflow_edge.bundle import MAX_BUNDLE_BYTES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transflow-edge", description="The light edge inference server for ONNX bundles (no torch)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a bundle over HTTP",
        description="Serve a bundle over HTTP: /v1/predict, /v1/model, /healthz, /readyz, /metrics and the admin "
        "endpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = serve.add_argument
    add("--bundle", type=Path, help="bundle directory or .tar.gz to install and serve")
    add("--state-dir", type=Path, help="keeps bundles/<sha256>/ and the serving state across restarts")
    add("--host", default="127.0.0.1", help="interface to listen on")
    add("--port", type=int, default=8080, help="TCP port")
    add("--token-file", type=Path, help="admin bearer token file (else $TRANSFLOW_EDGE_TOKEN; neither: admin off)")
    add("--max-batch", type=int, default=32, help="most items per onnxruntime call; 1 turns micro-batching off")
    add("--max-wait-ms", type=float, default=2.0, help="how long a batch waits for more requests")
    add("--max-items", type=int, default=64, help="most inputs per predict request")
    add("--max-text-chars", type=int, default=10_000, help="longest text accepted (characters)")
    add("--max-body-bytes", type=int, default=16 << 20, help="largest predict request body")
    add("--max-upload-bytes", type=int, default=1 << 30, help="largest bundle archive accepted by the admin upload")
    add("--max-bundle-bytes", type=int, default=MAX_BUNDLE_BYTES, help="largest bundle once unpacked")
    add("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per physical core)")
    add("--watch-dir", type=Path, help="serve the newest bundle .tar.gz dropped into this folder (air-gapped sites)")
    add("--watch-interval", type=float, default=2.0, help="seconds between looks at --watch-dir")
    add("--max-image-pixels", type=int, default=0, help="decoded pixels per image (0: 64x the model input)")
    add("--parse-workers", type=int, default=4, help="threads that parse bodies and decode inputs")
    add("--max-connections", type=int, default=256, help="open connections + running requests; above: 503")
    add("--body-timeout", type=float, default=30.0, help="seconds a client may take to send a request body")
    add("--head-timeout", type=float, default=10.0, help="seconds a client may take to send a request head")
    add("--keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection stays open")
    add("--tls-cert", type=Path, help="PEM certificate: serve HTTPS (with --tls-key)")
    add("--tls-key", type=Path, help="PEM private key of --tls-cert")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.bundle is None and args.state_dir is None and args.watch_dir is None:
        parser.error("serve: give --bundle, --state-dir, or both (or --watch-dir)")
    from transflow_edge.bundle import BundleError
    from transflow_edge.server import Settings, load_token, serve

    try:
        settings = Settings(
            bundle=args.bundle,
            state_dir=args.state_dir,
            token=load_token(args.token_file),
            max_items=args.max_items,
            max_text_chars=args.max_text_chars,
            max_body_bytes=args.max_body_bytes,
            max_upload_bytes=args.max_upload_bytes,
            max_bundle_bytes=args.max_bundle_bytes,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            intra_op_threads=args.threads,
            watch_dir=args.watch_dir,
            watch_interval_s=args.watch_interval,
            max_image_pixels=args.max_image_pixels,
            parse_workers=args.parse_workers,
            max_connections=args.max_connections,
            body_timeout_s=args.body_timeout,
            head_timeout_s=args.head_timeout,
            keep_alive_s=args.keep_alive,
            tls_certfile=args.tls_cert,
            tls_keyfile=args.tls_key,
        )
        if settings.token is None:
            print("admin endpoints disabled: no $TRANSFLOW_EDGE_TOKEN and no --token-file", file=sys.stderr)
        serve(settings, host=args.host, port=args.port, log_level=args.log_level)
    except (BundleError, ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
