"""The int8 ladder on a synthetic model with one quantisation-sensitive class: dynamic int8 keeps the macro budget
but loses that class, so the ladder must climb to a later rung (a static rung with the outlier node in float)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tasks.export_ladder import calibration_slice, feeds_hash, outlier_ranking, predict, run_ladder

K = 10  # classes; class 9 differs from class 8 only by one small feature
SMALL, OUTLIER = K, K + 1  # input columns: K class bumps, the small feature, a constant outlier feature


def synthetic_model(path: Path) -> Path:
    """x[N, K+2] → MatMul(W1) → MatMul(W2) → logits[N, K]. W1 drops the outlier column and amplifies the small
    feature, so only the first MatMul's input has the outlier that ruins per-tensor int8 for class 9."""
    w1 = np.zeros((K + 2, K + 1), np.float32)
    w1[np.arange(K), np.arange(K)] = 1.0
    w1[SMALL, K] = 20.0
    w2 = np.zeros((K + 1, K), np.float32)
    w2[np.arange(K), np.arange(K)] = 1.0
    w2[8, 9] = 1.0  # class 9 scores like class 8 …
    w2[K, 9], w2[K, 8] = 1.0, -1.0  # … plus or minus the amplified small feature
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
         helper.make_node("MatMul", ["h", "w2"], ["logits"], name="second")],
        "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K + 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def examples(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), n_per_class)
    x = rng.uniform(0, 1, (len(y), K + 2)).astype(np.float32)
    x[:, :K] *= 0.5
    bump = np.where(y == 9, 8, y)
    x[np.arange(len(y)), bump] += 8.0
    x[:, SMALL] = np.where(y == 9, 0.3, -0.3)
    x[:, OUTLIER] = 200.0
    return x, y


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    path = synthetic_model(tmp_path / "model.onnx")
    x, y = examples(20, seed=0)
    cal_x, _ = examples(10, seed=1)
    pick = calibration_slice(len(cal_x), 32, seed=7)
    return {"path": path, "batches": [{"x": x}], "y": y, "calibration": [{"x": cal_x[pick]}],
            "classes": [f"c{i}" for i in range(K)], "work": tmp_path}  # fmt: skip


def test_fp32_is_perfect_and_the_outlier_node_ranks_first(setup: dict) -> None:
    assert (predict(setup["path"], setup["batches"]) == setup["y"]).all()
    assert outlier_ranking(setup["path"], setup["calibration"])[0] == "first"


def test_dynamic_keeps_the_macro_budget_but_loses_one_class_so_a_later_rung_ships(setup: dict) -> None:
    fp32_pred = predict(setup["path"], setup["batches"])
    ladder = run_ladder(
        setup["path"], setup["path"], setup["work"], setup["batches"], setup["y"], fp32_pred, setup["classes"],
        setup["calibration"], macro_budget=15.0, class_budget=2.0, try_all=True, pick="first",
    )  # fmt: skip
    rungs = {r["rung"]: r for r in ladder["rungs"]}
    dynamic = rungs["dynamic"]
    assert dynamic["macro_drop_pt"] <= 15.0, "the aggregate alone would ship dynamic int8"
    assert dynamic["worst_class"] == "c9" and dynamic["worst_class_drop_pt"] > 50 and not dynamic["passed"]
    assert not rungs["static"]["passed"], "per-tensor static int8 has the same outlier problem"
    mixed = rungs["static_mixed[1]"]
    assert mixed["passed"] and mixed["excluded_nodes"] == ["first"] and mixed["worst_class_drop_pt"] <= 2.0
    assert ladder["shipped"] == "static_mixed[1]" and mixed["shipped"]
    assert all(r["latency_b1_ms"] and r["latency_b1_ms"] > 0 for r in ladder["rungs"])
    assert [r["rung"] for r in ladder["rungs"]][-1] == "fp32" and not rungs["fp32"]["shipped"]


def test_without_the_class_budget_dynamic_ships_and_without_calibration_fp32_does(setup: dict) -> None:
    fp32_pred = predict(setup["path"], setup["batches"])
    args = (setup["path"], setup["path"], setup["work"], setup["batches"], setup["y"], fp32_pred, setup["classes"])
    assert run_ladder(*args, setup["calibration"], 15.0, None, pick="first")["shipped"] == "dynamic"
    none = run_ladder(*args, [], 15.0, 2.0)
    assert none["shipped"] == "fp32" and none["file"] is None
    assert [r["rung"] for r in none["rungs"]] == ["dynamic", "static", "static_mixed", "fp32"]
    assert "no int8 rung kept the budgets" in none["reason"]


@pytest.mark.parametrize(
    ("dynamic_ms", "fp32_ms", "ships"), [(2.0, 1.0, "fp32"), (0.5, 1.0, "dynamic")], ids=["fp32-faster", "int8-faster"]
)
def test_the_fastest_rung_within_the_budgets_ships(
    setup: dict, monkeypatch: pytest.MonkeyPatch, dynamic_ms: float, fp32_ms: float, ships: str
) -> None:
    """The timings are fixed here (the selection is under test, not this machine's speed): dynamic int8 keeps the
    budgets, and whichever of it and fp32 is faster at batch 1 ships."""
    import tasks.export_ladder as ladder_module

    latency = {"model.onnx": fp32_ms, "ladder-dynamic.onnx": dynamic_ms}  # every static rung: 9 ms
    monkeypatch.setattr(ladder_module, "batch1_latency", lambda path, feed: latency.get(Path(path).name, 9.0))
    fp32_pred = predict(setup["path"], setup["batches"])
    args = (setup["path"], setup["path"], setup["work"], setup["batches"], setup["y"], fp32_pred, setup["classes"])
    walked = run_ladder(*args, setup["calibration"], 15.0, None)  # pick="fastest" is the default
    rungs = {r["rung"]: r for r in walked["rungs"]}
    assert rungs["dynamic"]["passed"] and list(rungs)[:2] == ["dynamic", "static"], "every rung is tried"
    assert rungs["static_mixed[1]"]["passed"], "a passing rung that is slower does not ship"
    assert walked["shipped"] == ships and [r["rung"] for r in walked["rungs"] if r["shipped"]] == [ships]
    assert (walked["file"] is None) == (ships == "fp32")
    if ships == "fp32":
        assert "dynamic kept the budgets" in walked["reason"] and "slower at batch 1" in walked["reason"]
    else:
        assert walked["reason"].startswith("dynamic ships:") and "vs fp32 1.000 ms" in walked["reason"]


def test_calibration_slice_is_seeded_and_hashed() -> None:
    assert calibration_slice(100, 10, 3) == calibration_slice(100, 10, 3) != calibration_slice(100, 10, 4)
    a = [{"x": np.ones((2, 3), np.float32)}]
    assert feeds_hash(a) == feeds_hash([{"x": np.ones((2, 3), np.float32)}]) != feeds_hash([{"x": np.zeros((2, 3))}])
