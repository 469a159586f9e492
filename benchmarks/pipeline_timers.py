"""The pipeline benchmark's timers: a ledger of seconds per category (Prefect, MLflow, DVC, …) and the patches that
wrap the real flow's calls with it, removed afterwards (see `bench_pipeline`'s docstring for what is timed)."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import tasks.data
from tasks.tracking import Tracker


@dataclass
class Ledger:
    """Seconds per category, plus every timed call (for the per-task table)."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    depth: dict[str, int] = field(default_factory=dict)

    def timed(self, category: str, name: Callable[..., str] | str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` wrapped to add its wall time to `category`; a call nested in the same category counts once.
        Each recorded call also keeps the seconds other categories gained during it (`inner`)."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.depth.get(category, 0):
                return fn(*args, **kwargs)
            self.depth[category] = 1
            before = dict(self.seconds)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.depth[category] = 0
                self.seconds[category] = self.seconds.get(category, 0.0) + spent
                self.calls.append(
                    {
                        "category": category,
                        "name": name(*args, **kwargs) if callable(name) else name,
                        "seconds": spent,
                        "inner": {k: v - before.get(k, 0.0) for k, v in self.seconds.items() if k != category},
                        "rows": _rows(args) if category == "mlflow" else None,
                    }
                )

        return wrapper

    def total(self, category: str) -> float:
        return self.seconds.get(category, 0.0)


def _rows(args: tuple[Any, ...]) -> int | None:
    """How many points a `Tracker.log_metrics(run_id, rows)` call carried."""
    return len(args[2]) if len(args) >= 3 and isinstance(args[2], list) else None


@contextlib.contextmanager
def patched(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    own = name in vars(owner)
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


@contextlib.contextmanager
def instrumented(ledger: Ledger) -> Iterator[Ledger]:
    """Every timer of bench_pipeline's docstring, installed for the duration of the block."""
    # Prefect (and flows, which import it) here, not at the top: bench_pipeline points PREFECT_HOME at a throwaway
    # directory first, which only takes effect before Prefect is imported.
    import prefect.flow_engine
    import prefect.task_engine
    import prefect.tasks
    from prefect.server.api.server import SubprocessASGIServer

    import flows.retrain

    def fn_name(fn: Any, *args: Any, **kwargs: Any) -> str:
        return getattr(fn, "__name__", str(fn))

    def task_name(task: Any, *args: Any, **kwargs: Any) -> str:
        return getattr(task, "name", "?")

    with contextlib.ExitStack() as stack:
        for name, member in list(vars(Tracker).items()):
            if callable(member) and not name.startswith("_") and not isinstance(member, (staticmethod, classmethod)):
                label = f"Tracker.{name}"
                stack.enter_context(patched(Tracker, name, ledger.timed("mlflow", label, member)))
        stack.enter_context(
            patched(tasks.data, "verify_data", ledger.timed("dvc", "verify_data", tasks.data.verify_data))
        )
        stack.enter_context(
            patched(
                flows.retrain,
                "collect_lineage",
                ledger.timed("lineage", "collect_lineage", flows.retrain.collect_lineage),
            )
        )
        start = SubprocessASGIServer.start
        stack.enter_context(patched(SubprocessASGIServer, "start", ledger.timed("server_start", "server start", start)))
        call = prefect.tasks.Task.__call__
        stack.enter_context(patched(prefect.tasks.Task, "__call__", ledger.timed("task_call", task_name, call)))
        task_fn = prefect.task_engine.call_with_parameters
        stack.enter_context(
            patched(prefect.task_engine, "call_with_parameters", ledger.timed("task_fn", fn_name, task_fn))
        )
        flow_fn = prefect.flow_engine.call_with_parameters
        stack.enter_context(
            patched(prefect.flow_engine, "call_with_parameters", ledger.timed("flow_fn", fn_name, flow_fn))
        )
        yield ledger
