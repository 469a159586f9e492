"""`transflow distill`: a distilled student of a registered version. Registered in `flows/cli.py` with one line.

Exit codes: 0 done (shipped or not: the summary says which and why), 2 bad input or the registry failed.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from flows.cli_errors import EXIT_BAD_INPUT, fail
from flows.cli_registry import TRACKING_OPT, _guarded
from flows.temp_server import ensure_prefect_api

console = Console()


def distill_cmd(
    target: str = typer.Argument(..., help="The teacher: NAME@ALIAS or NAME/VERSION, e.g. digits-vit@champion."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override the teacher's run config: --set distill.steps=200 (repeatable)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Work folder (default ./runs/distill-NAME-vVERSION)."),
    promote: bool = typer.Option(False, help="Run the promotion gate on the student if it ships."),
    tracking_uri: str | None = TRACKING_OPT,
) -> None:
    """Distil a registered version into a student with half its encoder blocks (copied from the teacher), trained on
    the teacher's logits over the training split; export it through the same int8 ladder and register it as a new
    version (tags distill.* name the teacher). It becomes `challenger` only if it keeps the teacher's budgets, beats
    the baselines and is export.distill_min_speedup× faster at batch 1; otherwise it stays at alias `distilled`."""
    from runconfig import ConfigError

    ensure_prefect_api()  # the guarded temporary server, if no Prefect API is configured
    from flows.distill import distill_flow

    try:
        summary = _guarded(lambda: distill_flow(target, overrides, str(out) if out else None, promote, tracking_uri))
    except ConfigError as exc:
        fail(exc, EXIT_BAD_INPUT)
    colour = "green" if summary["ship"] else "yellow"
    who = f"{summary['model_name']} v{summary['student_version']}"
    console.print(f"[bold]{who}[/] (student of v{summary['teacher_version']}, blocks {summary['layers']}): "
                  f"[{colour}]{summary['reason']}[/]")  # fmt: skip
    for r in (summary["export"].get("ladder") or {}).get("rungs", []):
        console.print(f"  rung {r['rung']}: accuracy {r['accuracy'] or 0:.4f}, worst class drop "
                      f"{r['worst_class_drop_pt'] or 0:.2f} pt, batch-1 {r['latency_b1_ms'] or 0:.3f} ms")  # fmt: skip
    if summary["promotion"]["outcome"] != "not judged":
        console.print(f"promotion: {summary['promotion']['outcome']}: {'; '.join(summary['promotion']['reasons'])}")
