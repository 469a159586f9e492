"""Prefect flows, the CLI and the RunConfig: the edge of the program."""

import os

# Defaults for Prefect's local (ephemeral) server, set before Prefect is imported: this product runs offline
# (no telemetry), and on a busy 2-core machine the server can need more than Prefect's default 20 s to start.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
