"""The candidate's figures on /metrics (see candidate.py): read at scrape time from the slot, so the series exist
only while a candidate is held, and only the live model and the candidate carry a version label."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from transflow_edge.candidate import CandidateSlot


class CandidateCollector:
    """The candidate's figures on /metrics, read at scrape time (no series once it is promoted or dropped)."""

    def __init__(self, slot: CandidateSlot) -> None:
        self.slot = slot

    def collect(self) -> Iterator[Any]:
        held = self.slot.current
        requests = CounterMetricFamily(
            "transflow_edge_version_requests", "Requests by role while a candidate is held.", labels=["role", "version"]
        )
        errors = CounterMetricFamily(
            "transflow_edge_version_errors",
            "Model errors by role while a candidate is held.",
            labels=["role", "version"],
        )
        latency = GaugeMetricFamily(
            "transflow_edge_version_latency_seconds",
            "Prepared inputs to logits, by role (window of the last requests).",
            labels=["role", "version", "quantile"],
        )
        agreement = GaugeMetricFamily(
            "transflow_edge_candidate_agreement_ratio", "Top-1 agreement of candidate and live.", labels=["version"]
        )
        compared = CounterMetricFamily(
            "transflow_edge_candidate_compared", "Inputs answered by both models.", labels=["version"]
        )
        dropped = CounterMetricFamily(
            "transflow_edge_candidate_dropped", "Copies dropped because the queue was full.", labels=["version"]
        )
        fraction = GaugeMetricFamily(
            "transflow_edge_candidate_fraction", "Share of requests the candidate answers.", labels=["version", "mode"]
        )
        if held is not None:
            figures = self.slot.figures(held)
            version = held.model.version
            for role in ("live", "candidate"):
                f = figures[role]
                requests.add_metric([role, f["version"]], f["requests"])
                errors.add_metric([role, f["version"]], f["errors"])
                for q, key in (("0.5", "p50_ms"), ("0.95", "p95_ms")):
                    if f[key] is not None:
                        latency.add_metric([role, f["version"], q], f[key] / 1000)
            if figures["agreement"] is not None:
                agreement.add_metric([version], figures["agreement"])
            compared.add_metric([version], figures["compared"])
            dropped.add_metric([version], figures["dropped"])
            fraction.add_metric([version, held.mode], held.fraction)
        yield from (requests, errors, latency, agreement, compared, dropped, fraction)
