"""`transflow edge serve …`: a thin alias of the edge distribution's own `transflow-edge serve …`.

The options live once, in `transflow_edge.cli` (argparse); this forwards every argument there unchanged.
Only typer at import time, never torch.
"""

from __future__ import annotations

import typer

edge_app = typer.Typer(help="The light edge inference server for ONNX bundles (no torch).", no_args_is_help=True)
FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@edge_app.callback()
def edge() -> None:
    """The light edge inference server for ONNX bundles (no torch)."""  # keeps `serve` a subcommand on its own


@edge_app.command("serve", context_settings=FORWARD, add_help_option=False)
def serve(ctx: typer.Context) -> None:
    """Serve a bundle over HTTP (same options as `transflow-edge serve`; see `transflow edge serve --help`)."""
    from transflow_edge.cli import main

    raise typer.Exit(main(["serve", *ctx.args]))
