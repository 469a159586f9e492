"""`transflow report`: rebuild a version's candidate report. Registered in `flows/cli.py` with one line.

Exit codes: 0 written, 2 bad input or the registry failed (one red line, no traceback).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from flows.cli_registry import TRACKING_OPT, _guarded
from flows.temp_server import ensure_prefect_api

console = Console()


def report_cmd(
    target: str = typer.Argument(..., help="NAME@ALIAS or NAME/VERSION, e.g. tweets-sentiment@challenger."),
    against: str = typer.Option("champion", "--against", help="Alias or version number to compare with."),
    out: Path | None = typer.Option(None, "--out", help="Folder for report.html/.md/.json (default ./reports/…)."),
    log: bool = typer.Option(True, help="Log the report to the version's run and tag the version (report.*)."),
    tracking_uri: str | None = TRACKING_OPT,
) -> None:
    """Candidate report: challenger vs champion on the same test split (difference with a paired bootstrap CI,
    McNemar, per-class deltas, confusion matrices), export ladder, latency per runtime with the CPU's
    instruction set, lineage and model card, as one self-contained HTML page, Markdown and JSON."""
    ensure_prefect_api()  # the guarded temporary server, if no Prefect API is configured
    from flows.report import report

    written = _guarded(lambda: report(target, against, str(out) if out else None, tracking_uri, log))
    verdict = {True: "significant", False: "not significant", None: "no comparison"}[written["significant"]]
    console.print(f"report: [bold]{written['html']}[/] ({written['bytes'] // 1024} KiB, {written['seconds']}s); "
                  f"against v{written['against_version'] or '-'}: {verdict}")  # fmt: skip
