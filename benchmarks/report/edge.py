"""The edge benchmark's section and goals: latency and throughput per concurrency, server overhead, swap under load,
/healthz under hostile bodies, and the edge distribution's install footprint."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import fmt, md_table

TITLE = "Edge server"


def section(r: dict[str, Any]) -> str:
    """benchmarks/bench_edge.py's result: latency / throughput per concurrency, server overhead, swap under load."""
    server, ratios = r["server"], r["ratios"]
    levels = sorted({k for runs in server.values() for k in runs}, key=lambda c: int(c.lstrip("c")))
    rows = []
    for c in levels:
        b, u = server.get("batched", {}).get(c, {}), server.get("unbatched", {}).get(c, {})
        rows.append(
            [
                c.lstrip("c"),
                b.get("p50_ms"),
                b.get("p99_ms"),
                b.get("throughput_per_s"),
                b.get("mean_batch"),
                u.get("p50_ms"),
                u.get("p99_ms"),
                u.get("throughput_per_s"),
                ratios.get(f"throughput_batched_over_unbatched_{c}"),
            ]
        )
    headers = [
        "clients",
        "batched p50 ms",
        "p99 ms",
        "req/s",
        "mean batch",
        "unbatched p50 ms",
        "p99 ms",
        "req/s",
        "batched ÷ unbatched req/s",
    ]
    out = [md_table(headers, rows)]
    bare = r.get("bare", {})
    out.append(
        f"Bare `InferenceSession.run` (same preprocessing, one text): p50 {fmt(bare.get('p50_ms'))} ms. "
        "Server overhead "
        f"at one client, p50: unbatched {fmt(ratios.get('overhead_p50_ms_unbatched_c1'))} ms, batched "
        f"{fmt(ratios.get('overhead_p50_ms_batched_c1'))} ms (inside the server: "
        f"{fmt(ratios.get('overhead_p50_ms_unbatched_c1_server_side'))} / "
        f"{fmt(ratios.get('overhead_p50_ms_batched_c1_server_side'))} ms)."
    )
    hostile = r.get("hostile", {})
    if hostile:
        out.append(
            f"`/healthz` while hostile clients loop 20,000-part multipart and 16 MB JSON bodies: p50 "
            f"{fmt(hostile.get('p50_ms'))} ms, p99 {fmt(hostile.get('p99_ms'))} ms; the hostile requests were "
            f"answered {fmt(hostile.get('hostile_statuses'))}."
        )
    install = r.get("install", {})
    if install:
        out.append(
            f"The edge distribution alone (`pip install -c requirements/constraints.txt ./edge` into a fresh venv, "
            f"pip's cache warm): {fmt(install.get('edge_install_seconds'))} s, {fmt(install.get('edge_venv_mb'))} MB, "
            f"torch importable: {fmt(install.get('edge_has_torch'))}; the full install (.venv): "
            f"{fmt(install.get('full_venv_mb'))} MB."
        )
    paired = r.get("paired", {})
    if paired:
        out.append(
            "Overhead paired (a bare run and a served request of the same text, alternately, so both see the same "
            "load; median of the differences): "
            + "; ".join(
                f"{name} {fmt(p.get('overhead_p50_ms'))} ms over {fmt(p.get('pairs'))} pairs "
                f"(bare {fmt(p.get('bare_p50_ms'))}, served {fmt(p.get('server_p50_ms'))} ms)"
                for name, p in paired.items()
            )
            + "."
        )
    swap = r.get("swap", {})
    if swap:
        out.append(
            f"Bundle swap under load (upload, rollback, rollback): {fmt(swap.get('requests'))} requests, "
            f"{fmt(swap.get('failed'))} failed, answered by versions {fmt(swap.get('versions'))}."
        )
    return "\n\n".join(out)


def goals(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(goal, target, measured, met) for the goals bench_edge.py prints, read from its ratios (only those present)."""
    ratios, out = r.get("ratios", {}), []
    for name in ("unbatched", "batched"):  # paired with a bare run of the same text when measured so
        v = ratios.get(f"overhead_p50_ms_{name}_paired", ratios.get(f"overhead_p50_ms_{name}_c1"))
        if v is not None:
            out.append((f"server overhead p50 at 1 client, {name}", "≤ 2 ms", fmt(v) + " ms", v <= 2))
    v = ratios.get("throughput_batched_over_unbatched_min")
    if v is not None:
        out.append(("micro-batching req/s, worst concurrency", "≥ 1.0×", fmt(v) + "×", v >= 1))
    v = ratios.get("throughput_batched_over_unbatched_c32")
    if v is not None:
        out.append(("micro-batching req/s at 32 clients", "≥ 1.5×", fmt(v) + "×", v >= 1.5))
    v = ratios.get("healthz_p99_ms_under_attack")
    if v is not None:
        out.append(("/healthz p99 under hostile bodies", "< 100 ms", fmt(v) + " ms", v < 100))
    v = ratios.get("swap_failed_requests")
    if v is not None:
        out.append(("failed requests during a bundle swap", "0", fmt(v), v == 0))
    return out
