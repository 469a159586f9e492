"""How every `transflow` command ends: documented exit codes and a one-line error on stderr.

    0  ok (for `promote`: promoted)
    1  refused or a failed check: the gate refused, the data does not match its pin, the export failed parity,
       a deploy was rolled back, a bundle disagrees with the registry
    2  bad input: a missing or invalid file, config key, model name, version or alias; an unreachable registry

Errors are classified by exception class name (walking the MRO), so this module imports no heavy library and
`main` can catch what a command raises without loading torch, mlflow or prefect first.
"""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import typer

EXIT_OK, EXIT_REFUSED, EXIT_BAD_INPUT = 0, 1, 2
MAX_CHARS = 600  # one line on a terminal log, still naming the file/key/version

# Exception class → exit code; the first class of an exception's MRO found here decides.
CODES = {
    # bad input: the user named something that does not exist or is not valid
    "ConfigError": EXIT_BAD_INPUT,
    "DataNotFound": EXIT_BAD_INPUT,
    "SourceMissingError": EXIT_BAD_INPUT,
    "RegistryError": EXIT_BAD_INPUT,
    "BundleError": EXIT_BAD_INPUT,
    "MlflowException": EXIT_BAD_INPUT,
    "FileNotFoundError": EXIT_BAD_INPUT,
    "TrainDeploymentError": EXIT_BAD_INPUT,
    "DeployInputError": EXIT_BAD_INPUT,
    # a check failed or was refused
    "DataError": EXIT_REFUSED,
    "ExportError": EXIT_REFUSED,
    "DeployError": EXIT_REFUSED,
    "GpuPreflightError": EXIT_REFUSED,
    "DistributedStageError": EXIT_REFUSED,
    "WatchError": EXIT_REFUSED,
}


def one_line(message: object) -> str:
    """Newlines and runs of spaces become one separator; long messages are cut, keeping their start."""
    lines = [" ".join(part.split()) for part in str(message).splitlines()]
    text = "; ".join(line for line in lines if line)
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1] + "…"


def fail(message: object, code: int = EXIT_REFUSED) -> NoReturn:
    """Print `error: …` as one line on stderr and exit with `code`."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of an error the CLI reports in one line; None for anything else (a bug: traceback)."""
    for cls in type(exc).__mro__:
        if cls.__name__ in CODES:
            return CODES[cls.__name__]
    return None


class _NoTraceback(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback; the CLI's one-line error says the same. The
    record keeps its message (which names the exception), and the run's state in Prefect keeps the error."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def quiet_tracebacks() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTraceback) for f in logger.filters):
            logger.addFilter(_NoTraceback())


def run_cli(app: typer.Typer, args: list[str] | None = None) -> int:
    """Run the Typer app; a known error from any command becomes one line and its exit code."""
    quiet_tracebacks()
    try:  # standalone_mode=False: click returns typer.Exit's code and raises everything else to us
        result = app(args=args, prog_name="transflow", standalone_mode=False)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        return 130
    except Exception as exc:
        names = {cls.__name__ for cls in type(exc).__mro__}  # typer vendors its own click: match by name
        if "NoArgsIsHelpError" in names:  # `transflow data`: the group's help, as click would show it
            ctx = getattr(exc, "ctx", None)
            typer.echo(ctx.get_help() if ctx else str(exc), err=True)
            return EXIT_BAD_INPUT
        if "UsageError" in names:  # unknown option, missing argument, bad value
            ctx = getattr(exc, "ctx", None)
            where = f"{ctx.command_path}: " if ctx else ""
            typer.echo(f"error: {where}{one_line(exc.format_message())}", err=True)  # type: ignore[attr-defined]
            return EXIT_BAD_INPUT
        if "Abort" in names:
            return 130
        code = exit_code_for(exc)
        if code is None:
            raise
        prefix = f"{type(exc).__name__}: " if _show_type(exc) else ""
        typer.echo(f"error: {prefix}{one_line(str(exc) or type(exc).__name__)}", err=True)
        return code
    return result if isinstance(result, int) else EXIT_OK


def _show_type(exc: BaseException) -> bool:
    """Our own errors speak for themselves; a library's (MlflowException, FileNotFoundError) gets its name."""
    return type(exc).__module__.split(".")[0] not in {"tasks", "flows", "runconfig", "transflow_edge"}


def main(app: typer.Typer) -> NoReturn:
    sys.exit(run_cli(app))
