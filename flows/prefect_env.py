"""Defaults for Prefect's local (ephemeral) server, applied by the entry points before Prefect is imported.

This product runs offline (no telemetry), and on a busy 2-core machine the server can need more than
Prefect's default 20 s to start. Values already in the environment win.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def apply_prefect_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
