"""Unit tests of the benchmark suite's pure helpers: formulas, timing bookkeeping, the overhead split, the runner's
result merging, Markdown rendering and which model the benchmarks measure. Nothing here times anything or asserts
on a duration."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transflow_edge.bundle import pack, verify_bundle, write_manifest

from benchmarks import __main__ as runner
from benchmarks import bench_limits, bench_pipeline, bench_training, common, model, pipeline_timers, report
from benchmarks import training_workload as workload
from benchmarks.report.markdown import fmt, md_table
from runconfig import RunConfig, load_config
from tasks.tracking import Tracker

ZEN4_CPUINFO = (
    "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\ncpu MHz\t\t: 2596.140\ncpu MHz\t\t: 2600.0\n"
)
INTEL_CPUINFO = "vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\ncpu MHz\t\t: 2100.000\n"


# --- limits: FLOPs and peak ----------------------------------------------------------------------------------


def test_minilm_matmul_params_and_flops_follow_the_stated_formula() -> None:
    p = bench_limits.matmul_params(layers=6, hidden=384, intermediate=1536)
    assert p == 6 * (4 * 384 * 384 + 2 * 384 * 1536) == 10_616_832
    flops = bench_limits.flops_per_sequence(p, layers=6, hidden=384, seq=64, head_params=384 * 3)
    assert flops["dense"] == 2 * p * 64
    assert flops["attention"] == 4 * 6 * 64 * 64 * 384
    assert flops["head"] == 2 * 384 * 3
    assert flops["total"] == flops["dense"] + flops["attention"] + flops["head"]
    assert flops["total"] / 1e9 == pytest.approx(1.397, abs=1e-3)


def test_attention_term_grows_with_the_square_of_the_sequence() -> None:
    short = bench_limits.flops_per_sequence(0, 6, 384, 64)["attention"]
    long = bench_limits.flops_per_sequence(0, 6, 384, 128)["attention"]
    assert long == 4 * short


def test_peak_is_cores_ghz_fma_lanes_two_and_int8_is_four_times() -> None:
    peak = bench_limits.peak_gflops(cores=2, ghz=2.596)
    assert peak["fp32"] == pytest.approx(2 * 2.596 * 2 * 16 * 2)
    assert peak["int8_vnni"] == pytest.approx(4 * peak["fp32"])


def test_frequency_prefers_lscpu_max_then_the_highest_cpuinfo_clock() -> None:
    assert common.cpu_ghz(ZEN4_CPUINFO, "CPU max MHz:  3700.0000\n") == (3.7, "lscpu 'CPU max MHz'")
    ghz, source = common.cpu_ghz(ZEN4_CPUINFO, "Model name: AMD EPYC\n")
    assert ghz == pytest.approx(2.6) and "cpuinfo" in source
    ghz, source = common.cpu_ghz("", "")
    assert ghz != ghz and source == "unknown"  # NaN


def test_zen4_gets_the_256_bit_datapath_note_and_intel_does_not() -> None:
    note = bench_limits.datapath_note(bench_limits.cpu_identity(ZEN4_CPUINFO))
    assert note and "Zen 4" in note and "half" in note
    assert bench_limits.datapath_note(bench_limits.cpu_identity(INTEL_CPUINFO)) is None


# --- training: workload, timing, ratios ------------------------------------------------------------------------


def test_padding_stats_count_what_each_policy_computes_on() -> None:
    ids = [[1] * 2, [1] * 4, [1] * 6, [1] * 8]
    stats = workload.padding_stats(ids, batch_size=2, max_length=10)
    assert stats["mean_tokens"] == 5
    assert stats["dynamic_padded_tokens"] == (2 * 4 + 2 * 8) / 4
    assert stats["fixed_padded_tokens"] == 10
    assert stats["dynamic_real_fraction"] == pytest.approx(5 / 6)
    assert stats["fixed_real_fraction"] == pytest.approx(0.5)
    mixed = [[1] * 2, [1] * 8, [1] * 2, [1] * 8]  # every batch of 2 holds a long one; grouping pairs them
    grouped = workload.padding_stats(mixed, batch_size=2, max_length=10)
    assert grouped["dynamic_padded_tokens"] == 8 and grouped["grouped_padded_tokens"] == 5


def test_fixed_collate_pads_every_batch_to_the_same_length() -> None:
    out = workload.fixed_collate(pad_id=0, length=5)([[7, 8], [9, 9, 9]])
    assert out["input_ids"].tolist() == [[7, 8, 0, 0, 0], [9, 9, 9, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]


def test_adamw_groups_decay_matrices_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = workload.adamw_groups(model)
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == workload.WEIGHT_DECAY
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_rotation_gives_every_loop_every_position() -> None:
    names = ["a", "b", "c"]
    orders = [bench_training.rotated(names, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert {o[0] for o in orders} == set(names)


def test_clock_times_only_the_steps_after_the_warmup() -> None:
    clock = workload.Clock(warmup=1, batch_size=4, marks=[0.0, 10.0, 11.0, 13.0])
    out = clock.result()
    assert out["timed_steps"] == 2 and out["seconds"] == 3.0
    assert out["samples_per_s"] == pytest.approx(8 / 3)
    assert out["step_s"] == [1.0, 2.0]
    with pytest.raises(RuntimeError):
        workload.Clock(warmup=2, batch_size=4, marks=[0.0, 1.0, 2.0]).result()


def test_timed_batches_mark_step_ends_and_validation_marks_the_last() -> None:
    inner = [({"x": torch.zeros(1)}, torch.zeros(1)) for _ in range(3)]
    clock = workload.Clock(warmup=1, batch_size=1)
    batches = workload.TimedBatches(inner, clock)  # type: ignore[arg-type]
    val = workload.EndMarker(["v"], clock, n_steps=3)
    assert len(val) == 1 and clock.marks == []  # validation touched before training ends: no mark
    for i in range(len(batches)):
        batches[i]
        batches[i]  # a second request of the same batch is not a new step
    assert len(clock.marks) == 3
    list(val)
    assert len(clock.marks) == 4 and clock.marks == sorted(clock.marks)
    list(val)
    assert len(clock.marks) == 4


def test_summarise_takes_medians_and_checks_the_goals() -> None:
    def runs(*sps: float) -> list[dict]:
        return [{"samples_per_s": s, "median_step_s": 1.0, "threads": 2, "optimizer": "AdamW"} for s in sps]

    out = bench_training.summarise(
        {
            "ours": runs(10.0, 12.0, 11.0),
            "plain": runs(11.0, 11.0, 11.0),
            "trainer": runs(12.0, 12.0, 12.0),
            "ours_fixed_padding": runs(5.5, 5.5, 5.5),
        }
    )
    assert out["loops"]["ours"]["samples_per_s"] == 11.0  # no per-step times: the median of rounds
    assert out["ratios"]["ours_vs_plain"] == pytest.approx(1.0)
    assert out["ratios"]["ours_vs_trainer"] == pytest.approx(11 / 12)
    assert out["ratios"]["dynamic_padding_speedup"] == pytest.approx(2.0)
    assert out["goals"]["ours_vs_plain"]["met"] is True
    assert out["goals"]["ours_vs_trainer"]["met"] is False
    assert "ours_vs_trainer_same_optimizer" not in out["ratios"]


def test_best_of_rounds_takes_each_steps_fastest_time() -> None:
    rounds = [{"samples": 8, "step_s": [1.0, 4.0]}, {"samples": 8, "step_s": [3.0, 1.0]}]
    assert bench_training.best_of_rounds(rounds) == pytest.approx(8 / 2.0)
    assert (
        bench_training.best_of_rounds([{"samples": 8, "step_s": [1.0]}, {"samples": 8, "step_s": [1.0, 2.0]}]) is None
    )
    out = bench_training.summarise(
        {
            "ours": [{**r, "samples_per_s": 1.0, "median_step_s": 1.0, "threads": 2} for r in rounds],
            "plain": [{"samples": 8, "step_s": [2.0, 2.0], "samples_per_s": 2.0, "median_step_s": 2.0, "threads": 2}],
        }
    )
    assert out["loops"]["ours"]["samples_per_s"] == pytest.approx(4.0)
    assert out["loops"]["ours"]["samples_per_s_median_of_rounds"] == 1.0
    assert out["ratios"]["ours_vs_plain"] == pytest.approx(2.0)


# --- pipeline: the split -----------------------------------------------------------------------------------------


def test_split_adds_up_to_the_wall_time() -> None:
    seconds = {"flow_fn": 90.0, "server_start": 6.0, "task_call": 80.0, "task_fn": 79.0, "mlflow": 3.0, "dvc": 1.0}
    parts = bench_pipeline.split(100.0, seconds)
    assert parts["prefect_flow_engine"] == pytest.approx(4.0)
    assert parts["prefect_task_engine"] == pytest.approx(1.0)
    assert parts["prefect"] == pytest.approx(11.0)
    assert parts["compute"] == pytest.approx(90 - 1 - 3 - 1)
    total = sum(parts[k] for k in ("prefect", "mlflow", "dvc", "compute"))
    assert total == pytest.approx(parts["wall"])
    pct = bench_pipeline.fractions(parts)
    assert pct["overhead_pct"] == pytest.approx(15.0)
    assert pct["overhead_without_server_start_pct"] == pytest.approx(9.0)


def test_extrapolation_keeps_the_overhead_and_grows_the_compute() -> None:
    parts = bench_pipeline.split(
        100.0, {"flow_fn": 90.0, "server_start": 6.0, "task_call": 80.0, "task_fn": 79.0, "mlflow": 3.0, "dvc": 1.0}
    )
    demo = bench_pipeline.extrapolate(parts, demo_seconds=590.0)
    assert demo["demo_wall_s"] == pytest.approx(600.0)
    assert demo["overhead_s"] == pytest.approx(15.0)
    assert demo["overhead_pct"] == pytest.approx(2.5)
    assert demo["overhead_without_server_start_pct"] == pytest.approx(1.5)
    warm = bench_pipeline.extrapolate(parts, demo_seconds=590.0, warm_start=2.0, store_creation=1.0)
    assert warm["overhead_warm_pct"] == pytest.approx(100 * (15 - 5) / (600 - 5))
    assert bench_pipeline.warm_fraction(parts, warm_start=2.0, store_creation=1.0) == pytest.approx(100 * 10 / 95)


def test_ledger_counts_nested_calls_once_and_records_inner_time() -> None:
    ledger = pipeline_timers.Ledger()
    inner = ledger.timed("mlflow", "inner", lambda run_id, rows: len(rows))
    outer_mlflow = ledger.timed("mlflow", "outer", lambda: inner("r", [1, 2]))
    task = ledger.timed("task_call", "t", lambda: outer_mlflow())
    assert task() == 2
    names = [c["name"] for c in ledger.calls]
    assert names == ["outer", "t"]  # the nested mlflow call is inside the outer one
    t = ledger.calls[-1]
    assert t["inner"]["mlflow"] == pytest.approx(ledger.total("mlflow"))
    assert ledger.total("task_call") >= ledger.total("mlflow")


def test_per_task_separates_the_function_from_prefect() -> None:
    calls = [
        {"category": "task_fn", "name": "run_stage", "seconds": 9.0, "inner": {}},
        {"category": "task_call", "name": "run_stage", "seconds": 10.0, "inner": {"task_fn": 9.0, "mlflow": 0.5}},
        {"category": "task_call", "name": "run_stage", "seconds": 5.0, "inner": {"task_fn": 4.5}},
        {"category": "task_call", "name": "encode", "seconds": 1.0, "inner": {"task_fn": 0.9, "dvc": 0.1}},
    ]
    rows = {r["task"]: r for r in bench_pipeline.per_task(calls)}
    assert rows["run_stage"]["calls"] == 2
    assert rows["run_stage"]["fn_s"] == pytest.approx(13.5)
    assert rows["run_stage"]["prefect_s"] == pytest.approx(1.5)
    assert rows["run_stage"]["mlflow_s"] == pytest.approx(0.5)
    assert rows["encode"]["dvc_s"] == pytest.approx(0.1)


def test_demo_seconds_adds_back_the_training_of_resumed_stages(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.json"
    fresh.write_text(json.dumps({"seconds": 600.0, "stages": [{"seconds": 100.0, "resumed": False}]}))
    assert bench_pipeline.demo_seconds(fresh)[0] == 600.0
    resumed = tmp_path / "resumed.json"
    stages = [{"seconds": 80.0, "resumed": True}, {"seconds": 150.0, "resumed": True}]
    resumed.write_text(json.dumps({"seconds": 160.0, "stages": stages}))
    seconds, source = bench_pipeline.demo_seconds(resumed)
    assert seconds == pytest.approx(390.0) and "reconstructed" in source
    assert bench_pipeline.demo_seconds(tmp_path / "missing.json")[0] is None


def test_patched_restores_own_and_inherited_attributes() -> None:
    class Base:
        def f(self) -> str:
            return "base"

    class Child(Base):
        def g(self) -> str:
            return "g"

    with (
        pipeline_timers.patched(Child, "f", lambda self: "patched"),
        pipeline_timers.patched(Child, "g", lambda s: "x"),
    ):
        assert Child().f() == "patched" and Child().g() == "x"
    assert Child().f() == "base" and "f" not in vars(Child)
    assert Child().g() == "g"


# --- the runner: merging, paths, rendering -------------------------------------------------------------------------

MACHINE = {
    "cpu": "AMD EPYC",
    "cores": 2,
    "avx512f": True,
    "avx512_vnni": True,
    "amx": False,
    "torch": "2.x",
    "ghz": 2.6,
}


def merged(benchmarks: dict, quick: bool = True) -> dict:
    seconds = {name: 10.0 for name in benchmarks}
    return runner.merge_results(MACHINE, benchmarks, seconds, quick, dt.datetime(2026, 1, 2, 3, 4, 5))


def test_merge_puts_the_machine_once_and_flags_a_different_one() -> None:
    out = merged(
        {
            "training": {"ratios": {"ours_vs_plain": 1.0}, "machine": MACHINE},
            "limits": {"results": {}, "machine": {**MACHINE, "cpu": "other"}},
            "edge": {"skipped": "not there"},
        }
    )
    assert out["machine"] == MACHINE and out["date"] == "2026-01-02" and out["mode"] == "quick"
    assert all("machine" not in r for r in out["benchmarks"].values())
    assert out["machine_mismatch"] == ["limits"]
    assert out["seconds"]["total"] == 30.0 and out["budget_s"] == 240
    assert list(out["benchmarks"]) == ["training", "limits", "edge"]


def test_a_partial_rerun_replaces_its_benchmarks_and_keeps_the_others() -> None:
    old = merged({"inference": {"a": 1}, "training": {"old": True}})
    new = merged({"training": {"new": True}})
    out = runner.combine(old, new)
    assert out["benchmarks"] == {"inference": {"a": 1}, "training": {"new": True}}
    assert out["kept_from_earlier_run"] == ["inference"]
    assert out["ran"] == {"inference": "2026-01-02T03:04:05", "training": "2026-01-02T03:04:05"}
    assert out["seconds"]["total"] == 20.0
    assert runner.combine(merged({"inference": {}}, quick=False), new) == new  # full and quick never mix
    md = report.render_markdown(out, "x.json")
    assert "Kept from earlier runs (when each ran): inference (2026-01-02T03:04:05)." in md


def test_results_file_is_named_by_machine_and_date() -> None:
    assert runner.results_path(merged({}, quick=False), "build box/1").name == "build-box-1-2026-01-02.json"
    assert runner.results_path(merged({}), "vm").name == "vm-2026-01-02-quick.json"


def test_selected_keeps_the_suite_order_and_rejects_unknown_names() -> None:
    assert runner.selected(["limits", "training"], []) == ["training", "limits"]
    assert "pipeline" not in runner.selected(None, ["pipeline"])
    with pytest.raises(SystemExit):
        runner.selected(["nope"], [])


def test_md_table_and_numbers() -> None:
    table = md_table(["a", "b"], [[1234, 0.5], ["x|y", None]])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| 1,234 | 0.50 |", "| x\\|y | – |"]
    assert fmt(float("nan")) == "n/a" and fmt(True) == "yes" and fmt(0.0001) == "0.0001"


def test_goal_rows_cover_reported_goals_probe_and_edge() -> None:
    training = {"ratios": {"ours_vs_trainer": 0.9}, "goals": {"ours_vs_trainer": {"target": "≥ 1.00×", "met": False}}}
    rows = report.goal_rows("training", training)
    assert rows == [["training", "ours_vs_trainer", "≥ 1.00×", "0.900×", "**not met**"]]
    probe = report.goal_rows("probe", {"speedup_per_epoch_after_first": 7.0})
    assert probe[0][-1] == "**met**"
    edge = {"ratios": {"overhead_p50_ms_unbatched_c1": 3.0, "swap_failed_requests": 0}}
    assert [r[-1] for r in report.goal_rows("edge", edge)] == ["**not met**", "**met**"]


def test_render_shows_machine_goals_errors_and_keeps_notes() -> None:
    doc = merged(
        {
            "training": {
                "ratios": {"ours_vs_plain": 1.01},
                "goals": {"ours_vs_plain": {"target": "≥ 0.97×", "met": True}},
            },
            "edge": {"skipped": "benchmarks/bench_edge.py is not there yet"},
            "limits": {"error": "boom"},
            "custom": {"n": 3, "group": {"a": {"x": 1.5}}},
        }
    )
    md = report.render_markdown(doc, "benchmarks/results/x.json", notes="my finding")
    assert "AMD EPYC" in md and "AVX-512F, AVX-512 VNNI" in md
    assert "| training | ours_vs_plain | ≥ 0.97× | 1.010× | **met** |" in md
    assert "**skipped**: benchmarks/bench_edge.py is not there yet" in md and "**error**: boom" in md
    assert "| n | 3 |" in md and "| a | 1.50 |" in md  # an unknown benchmark renders generically
    assert report.kept_notes(md) == "my finding"
    again = report.render_markdown(doc, "x.json", report.kept_notes(md))
    assert report.kept_notes(again) == "my finding"
    assert report.kept_notes("# no markers") is None


def test_child_writes_the_result_or_why_it_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fake_bench.py").write_text(
        "def main(argv):\n"
        "    if argv == ['--fail']:\n        raise ValueError('bad')\n"
        "    if argv == ['--exit']:\n        raise SystemExit('no exported run')\n"
        "    return {'argv': argv, 'x': 1.5}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_bench", raising=False)
    out = tmp_path / "out.json"
    assert runner.child("fake_bench", out, ["--quick"]) == 0
    assert json.loads(out.read_text()) == {"argv": ["--quick"], "x": 1.5}
    assert runner.child("fake_bench", out, ["--fail"]) == 1
    assert json.loads(out.read_text())["error"] == "ValueError: bad"
    assert runner.child("fake_bench", out, ["--exit"]) == 1
    assert json.loads(out.read_text()) == {"error": "no exported run"}


def test_a_missing_benchmark_module_is_skipped_not_run() -> None:
    result, seconds = runner.run_one("edge", "benchmarks.no_such_bench", [], timeout=1)
    assert "skipped" in result and seconds == 0.0


# --- the report: one section per benchmark, rendered from stored results --------------------------------------

STORED = Path(runner.ROOT) / "benchmarks" / "results" / "vm-2026-11-24.json"


def test_stored_results_render_every_section_as_before() -> None:
    """The committed full-suite results render to the lines BENCHMARKS.md had when the sections lived in the runner."""
    md = report.render_markdown(json.loads(STORED.read_text()), "benchmarks/results/vm-2026-11-24.json", "kept")
    lines = md.splitlines()
    expected = [
        "Generated by `python -m benchmarks run` (`make bench`) on 2026-11-24T16:29:28: the **full** suite, benchmarks "
        "9.7 min (budget 15 min). Raw results: `benchmarks/results/vm-2026-11-24.json`. Every claim is a ratio "
        "measured side by side in one run on this machine; absolute times are this CPU's only.",
        "| probe | cached vs naive, per epoch after the first | ≥ 5× | 299.3× | **met** |",
        "| edge | server overhead p50 at 1 client, unbatched | ≤ 2 ms | 3.38 ms | **not met** |",
        "| edge | failed requests during a bundle swap | 0 | 0 | **met** |",
        "| training | ours_vs_trainer | ≥ 1.00× | 0.994× | **not met** |",
        "| pipeline | demo_overhead_warm_pct | ≤ 5% | 2.569% | **met** |",
        "## Inference: torch vs ONNX fp32 vs ONNX int8",
        "| 1 | onnx_int8 | 2.89 | 4.10 | 343.21 | 3.88 |",
        "## Probe stage: cached features vs frozen backbone every epoch",
        "| epochs | 4 |",
        "## Edge server",
        "| 32 | 165.22 | 570.96 | 183.15 | 7.22 | 138.68 | 612.98 | 205.48 | 0.89 |",
        "## Training throughput",
        "| ours | 35.62 | 35.54, 34.72 | 0.91 | AdamW fused | 2 |",
        "### Profile of the training hot path",
        "| backward | 54.6 |",
        "## Orchestration overhead (retraining flow)",
        "| Prefect: temporary server start | 9.84 | 24.7 |",
        "## Distance to the limit (MiniLM, seq 64, batch 32)",
        "| onnxruntime int8 | 127.51 | 250.96 | 350.52 | 1,329.22 | 26.4 | 52.7 |",
    ]
    missing = [line for line in expected if line not in lines]
    assert not missing
    order = [lines.index(f"## {report.title(n)}") for n in ("inference", "probe", "edge", "training", "pipeline")]
    assert order == sorted(order)
    assert "could not render" not in md and report.kept_notes(md) == "kept"


def test_the_model_measured_is_named_in_the_report() -> None:
    doc = merged({"inference": {"error": "x"}}) | {"model": "tweets-sentiment@champion (tweets-sentiment v3)"}
    md = report.render_markdown(doc, "x.json")
    assert "Model measured by the inference, edge and limits benchmarks: tweets-sentiment@champion" in md


def test_rendering_imports_neither_torch_nor_prefect(tmp_path: Path) -> None:
    """The runner renders in its own process; importing Prefect there would create ~/.prefect."""
    code = (
        "import json, sys, pathlib\n"
        "from benchmarks import __main__ as runner, report\n"
        f"report.render_file(pathlib.Path({str(STORED)!r}), pathlib.Path({str(tmp_path / 'B.md')!r}))\n"
        "print(sorted(m for m in ('torch', 'prefect', 'mlflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
    assert "## Training throughput" in (tmp_path / "B.md").read_text()


# --- which model: named, never the newest run ------------------------------------------------------------------


def tiny_bundle(where: Path, name: str = "tweets") -> Path:
    where.mkdir(parents=True)
    (where / "model.onnx").write_bytes(b"not really onnx")
    (where / "labels.json").write_text('["negative", "neutral", "positive"]')
    write_manifest(where, {"name": name, "version": "1", "modality": "text", "default_model": "model.onnx"})
    return where


def demo_setup(tmp_path: Path) -> tuple[Path, Path]:
    """A demo config in tmp_path (its own output dir and DVC pin) and the run directory it trains into."""
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    config = tmp_path / "demo.yaml"
    config.write_text(
        f"name: text-tweets\noutput_dir: {tmp_path / 'runs'}\n"
        f"data: {{modality: text, path: {tmp_path / 'data'}, dvc_file: {tmp_path / 'data.dvc'}}}\n"
        "stages: [{kind: probe, epochs: 1}]\n"
    )
    return config, load_config(config).workdir("0123456789abcdef0123456789abcdef")


def test_the_demo_model_is_the_demo_configs_run_not_the_newest(tmp_path: Path) -> None:
    config, run_dir = demo_setup(tmp_path)
    with pytest.raises(SystemExit) as missing:
        model.demo_model(config)
    message = str(missing.value)
    assert "\n" not in message and str(run_dir / "export" / "bundle") in message and "make demo" in message
    tiny_bundle(run_dir / "export" / "bundle")
    newer = tmp_path / "runs" / "vision-digits-aaaa-bbbb"
    tiny_bundle(newer / "export" / "bundle", "digits")
    found = model.demo_model(config)
    assert found.run_dir == run_dir and found.bundle == run_dir / "export" / "bundle"
    assert run_dir.name.startswith("text-tweets-01234567-")


def test_a_named_run_dir_bundle_or_archive_is_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    tiny_bundle(run_dir / "export" / "bundle")
    named = model.resolve_model(str(run_dir))
    assert named.run_dir == run_dir and named.local == run_dir
    bundle = tiny_bundle(tmp_path / "bundle")
    only = model.resolve_model(str(bundle))
    assert only.run_dir is None and only.local == bundle
    with pytest.raises(SystemExit, match="needs a run directory"):
        only.require_run_dir("bench_inference")
    monkeypatch.setattr(model, "CACHE", tmp_path / "cache")
    archive = pack(bundle, tmp_path / "bundle.tar.gz")
    unpacked = model.resolve_model(str(archive))
    assert unpacked.run_dir is None and (unpacked.bundle / "manifest.json").is_file()
    assert model.resolve_model(str(archive)).bundle == unpacked.bundle  # unpacked once, reused
    (bundle / "model.onnx").write_bytes(b"changed")
    with pytest.raises(SystemExit, match="sha256"):
        model.resolve_model(str(bundle))
    with pytest.raises(SystemExit, match="no such run directory or bundle"):
        model.resolve_model(str(tmp_path / "nowhere"))


def test_a_registered_model_that_does_not_exist_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(model, "CACHE", tmp_path / "cache")
    with pytest.raises(SystemExit) as missing:
        model.resolve_model("no-such-model@champion")
    assert str(missing.value).startswith("--model no-such-model@champion: ") and "\n" not in str(missing.value)


def test_the_runner_passes_the_resolved_model_to_the_benchmarks_that_measure_one() -> None:
    assert {n for n, b in runner.BENCHMARKS.items() if b.takes_model} == {"inference", "edge", "limits"}
    with pytest.raises(SystemExit, match="no such run directory or bundle"):
        runner.named_model("definitely/not/here", timeout=120)


def test_a_registered_alias_is_downloaded_once_as_a_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real MLflow store (sqlite + local artifacts): config.json, model/ and the bundle archive logged on a run,
    the version registered with its bundle_sha256 tag and an alias, then `--model NAME@ALIAS` resolved."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(model, "CACHE", tmp_path / "cache")
    tracker = Tracker(uri)
    run_id = tracker.start_run("bench-test", "tiny", {})
    config = tmp_path / "logged" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(RunConfig(stages=[{"kind": "probe"}]).resolved()))
    tracker.log_artifacts(run_id, config)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.safetensors").write_bytes(b"w")
    tracker.log_artifacts(run_id, tmp_path / "model", "model")
    bundle = tiny_bundle(tmp_path / "bundle")
    tracker.log_artifacts(run_id, pack(bundle, tmp_path / "bundle.tar.gz"), "bundle")
    sha = verify_bundle(bundle).sha256
    version = tracker.register(run_id, "tiny-model", "model", {"bundle_sha256": sha}, alias="champion")
    tracker.end_run(run_id)

    found = model.resolve_model("tiny-model@champion")
    assert found.run_dir == tmp_path / "cache" / f"tiny-model-v{version}"
    assert (found.run_dir / "model" / "weights.safetensors").read_bytes() == b"w"
    assert RunConfig.model_validate_json((found.run_dir / "config.json").read_text()).stages[0].kind == "probe"
    assert verify_bundle(found.bundle).sha256 == sha
    assert found.named == f"tiny-model@champion (tiny-model v{version})"
    with pytest.raises(SystemExit, match="tiny-model@nope"):
        model.resolve_model("tiny-model@nope")


def test_the_vision_loop_section_shows_its_loops_and_its_goal() -> None:
    result = {
        "arch": "vit-tiny-conv",
        "batch": 64,
        "steps": 12,
        "warmup": 2,
        "rounds": 2,
        "plain": {"images_per_s": 1000.0, "median_round_images_per_s": 950.0},
        "fit": {"images_per_s": 920.0, "median_round_images_per_s": 900.0},
        "ratios": {"fit_vs_plain": 0.92},
        "goal_fit_vs_plain": 0.9,
        "meets_goal": True,
    }
    md = report.render_markdown(merged({"vision_loop": result}), "x.json")
    assert "| vision_loop | fit vs plain loop, images/s | ≥ 0.9× | 0.920× | **met** |" in md
    assert "## Vision training loop (small ViT, Fashion-MNIST)" in md and "| fit | 920.00 | 900.00 |" in md
