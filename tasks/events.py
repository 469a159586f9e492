"""Prefect events this project emits. `transflow.model.promoted` is what chains `promote` → `deploy-edge`:
the `deploy-edge` deployment carries a trigger on it (see docs/scheduling.md), so promotion never has to
know where models are deployed.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

PROMOTED = "transflow.model.promoted"
DRIFT_DETECTED = "transflow.drift.detected"


def model_resource(model_name: str, version: str) -> dict[str, str]:
    """The event's resource: one id per registered model, so a trigger can match `transflow.model.*`."""
    return {
        "prefect.resource.id": f"transflow.model.{model_name}",
        "prefect.resource.name": model_name,
        "transflow.model.name": model_name,
        "transflow.model.version": str(version),
    }


def emit_promoted(
    model_name: str,
    version: str,
    previous: str | None = None,
    reason: str = "",
    tracking_uri: str | None = None,
    event_id: str | None = None,
    **details: Any,
) -> Any:
    """Emit `transflow.model.promoted` after `champion` moved to `version`; call it only on success.

    Returns the emitted `prefect.events.Event` (None where Prefect emits no events, e.g. no API reachable).
    Inside a flow run the event is sent in the background and flushed when the process exits. A fixed
    `event_id` (a UUID) makes a resent event the same event: Prefect stores it once and triggers skip it.
    """
    from prefect.events import emit_event

    payload = {
        "model_name": model_name,
        "version": str(version),
        "previous": None if previous is None else str(previous),
        "alias": "champion",
        "reason": reason,
        "tracking_uri": tracking_uri,
        **details,
    }
    return emit_event(
        event=PROMOTED,
        resource=model_resource(model_name, version),
        payload=payload,
        id=UUID(event_id) if event_id else None,
    )


def emit_drift_detected(model_name: str, version: str, event_id: str, **figures: Any) -> Any:
    """Emit `transflow.drift.detected` for one model version (`flows/watch_drift.py`): the fleet's PSI per statistic
    and which crossed the threshold, in the payload. A fixed `event_id` makes a resend after a crash the same event."""
    from prefect.events import emit_event

    payload = {"model_name": model_name, "version": str(version), **figures}
    return emit_event(
        event=DRIFT_DETECTED, resource=model_resource(model_name, version), payload=payload, id=UUID(event_id)
    )
