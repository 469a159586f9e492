"""`transflow edge …`: run the light edge inference server.

Only typer at import time; the server (onnxruntime, FastAPI) is imported inside the command, and never torch.
"""

from __future__ import annotations

from pathlib import Path

import typer

edge_app = typer.Typer(help="The light edge inference server for ONNX bundles (no torch).", no_args_is_help=True)


@edge_app.callback()
def edge() -> None:
    """The light edge inference server for ONNX bundles (no torch)."""  # keeps `serve` a subcommand on its own


@edge_app.command("serve")
def serve(
    bundle: Path | None = typer.Option(None, "--bundle", help="Bundle directory or .tar.gz to install and serve."),
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="Keeps bundles/<sha256>/ and the current/previous pointers across restarts."
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8080, help="TCP port."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="Admin bearer token file (else $TRANSFLOW_EDGE_TOKEN; neither: admin disabled)."
    ),
    max_batch: int = typer.Option(32, help="Most items per onnxruntime call; 1 turns micro-batching off."),
    max_wait_ms: float = typer.Option(2.0, help="How long a batch waits for more requests."),
    max_items: int = typer.Option(64, help="Most inputs per predict request."),
    max_text_chars: int = typer.Option(10_000, help="Longest text accepted (characters)."),
    max_body_bytes: int = typer.Option(16 << 20, help="Largest predict request body."),
    max_upload_bytes: int = typer.Option(1 << 30, help="Largest bundle archive accepted by the admin upload."),
    threads: int = typer.Option(0, help="onnxruntime intra-op threads (0: one per physical core)."),
    watch_dir: Path | None = typer.Option(
        None,
        "--watch-dir",
        help="Serve the newest bundle .tar.gz dropped into this folder (air-gapped sites; deploy --target dir://…).",
    ),
    watch_interval: float = typer.Option(2.0, help="Seconds between looks at --watch-dir."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Serve a bundle over HTTP: /v1/predict, /v1/model, /healthz, /readyz, /metrics and the admin endpoints."""
    if bundle is None and state_dir is None and watch_dir is None:
        raise typer.BadParameter(
            "give --bundle, --state-dir, or both (or --watch-dir)", param_hint="--bundle/--state-dir"
        )
    from edge.bundle import BundleError
    from edge.server import Settings, load_token
    from edge.server import serve as run_server

    try:
        settings = Settings(
            bundle=bundle,
            state_dir=state_dir,
            token=load_token(token_file),
            max_items=max_items,
            max_text_chars=max_text_chars,
            max_body_bytes=max_body_bytes,
            max_upload_bytes=max_upload_bytes,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            intra_op_threads=threads,
            watch_dir=watch_dir,
            watch_interval_s=watch_interval,
        )
        if settings.token is None:
            typer.echo("admin endpoints disabled: no $TRANSFLOW_EDGE_TOKEN and no --token-file", err=True)
        run_server(settings, host=host, port=port, log_level=log_level)
    except (BundleError, ValueError, OSError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
