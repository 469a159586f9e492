"""The pipeline benchmark's section: the retraining flow's wall time split into Prefect, MLflow, DVC and compute."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import fmt, md_table

TITLE = "Orchestration overhead (retraining flow)"


def section(r: dict[str, Any]) -> str:
    s, p = r["split_s"], r["split_pct"]
    labels = {
        "prefect_server_start": "Prefect: temporary server start",
        "prefect_flow_engine": "Prefect: flow engine (flow wall − flow function − server start)",
        "prefect_task_engine": "Prefect: task engine (Σ task call − task function)",
        "mlflow": "MLflow (every `Tracker` call, incl. import and store set-up)",
        "dvc": "DVC check (`verify_data`: re-hash `data/`)",
        "compute": "compute (training, evaluation, export, glue)",
    }
    out = [
        md_table(
            ["part", "seconds", "% of wall"],
            [[labels[k], s[k], fmt(p[k + "_pct"], 1)] for k in labels] + [["**end to end**", s["wall"], "100"]],
        )
    ]
    server = r.get("server", {})
    lines = [
        f"Prefect + MLflow + DVC = **{fmt(p['overhead_pct'], 1)}%** of the end-to-end wall time; "
        f"{fmt(p['overhead_without_server_start_pct'], 1)}% without the temporary server's start "
        f"({fmt(server.get('cold_start_s'))} s on a fresh Prefect database"
    ]
    if server.get("warm_start_s") is not None:
        lines.append(f"; {fmt(server['warm_start_s'])} s when the database exists")
    lines.append(f"). The server process used {fmt(server.get('cpu_s'))} CPU-seconds, on the same cores as training.")
    store = r.get("mlflow_store")
    if store and "overhead_warm_pct" in p:
        lines.append(
            f" On a machine that ran the flow before (Prefect database and MLflow store exist: warm server start, no "
            f"store creation, which took {fmt(store['creation_s'])} s here) the share is "
            f"**{fmt(p['overhead_warm_pct'], 1)}%**."
        )
    out.append("".join(lines))
    demo = r.get("demo", {})
    if "overhead_pct" in demo:
        out.append(
            f"Demo-sized run, extrapolated (this run's overhead, which is the same tasks and MLflow calls, over the "
            f"demo's wall time from {demo['source']}): {fmt(demo['overhead_s'])} s of {fmt(demo['demo_wall_s'])} s = "
            f"**{fmt(demo['overhead_pct'], 1)}%** ({fmt(demo['overhead_without_server_start_pct'], 1)}% without the "
            f"server start; {fmt(demo.get('overhead_warm_pct'), 1)}% on a machine that ran the flow before)."
        )
    else:
        out.append(f"Demo-sized run: not extrapolated — {demo.get('source', 'no demo summary')}.")
    out.append(
        md_table(
            ["task", "calls", "in the function, s", "of which MLflow, s", "of which DVC, s", "Prefect around it, s"],
            [
                [t["task"], t["calls"], t["fn_s"], t["mlflow_s"], t["dvc_s"], fmt(t["prefect_s"], 3)]
                for t in r["per_task"]
            ],
        )
    )
    out.append(
        md_table(["MLflow call", "n", "seconds"], [[m["call"], m["n"], m["seconds"]] for m in r["mlflow_calls"]])
    )
    out.append(
        f"The first MLflow call ({fmt(r.get('mlflow_first_call_s'))} s) includes importing mlflow and creating the "
        "run's fresh sqlite store; `log_onnx` re-serialises the ONNX model in MLflow's onnx flavour."
    )
    lg = r["step_logging"]
    out.append(
        f"Per-step metric logging: one `Tracker.log_metrics` call with one demo epoch of per-step points ({lg['rows']} "
        f"points, one per step — `fit` keeps one per 10 steps) took {fmt(1000 * lg['seconds'], 1)} ms, against "
        f"{lg['rows']} steps × {fmt(lg['step_s'], 3)} s (the fastest encoder stage of this run) = "
        f"**{fmt(lg['pct_of_step_time'], 3)}%** of step time. In the flow itself: {r['flow_log_metrics']['calls']} "
        f"`log_metrics` calls, {r['flow_log_metrics']['rows']} points, {fmt(r['flow_log_metrics']['seconds'])} s."
    )
    setup = r.get("setup", {})
    overrides = ", ".join(setup.get("overrides") or []) or "no overrides"
    out.append(f"Setup: the real flow on `{fmt(setup.get('config'))}` ({overrides}; temp MLflow store and output dir).")
    return "\n\n".join(out)
