"""The report's statistics on fixed predictions, checked against scipy, statsmodels and scikit-learn directly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap, chi2
from sklearn.metrics import confusion_matrix, f1_score

from tasks.report_stats import compare_predictions, macro_f1_batched, mcnemar_test, paired_bootstrap, per_class


def fixed(n: int = 400, seed: int = 3, better: float = 0.85, worse: float = 0.75) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    a = np.where(rng.random(n) < better, y, rng.integers(0, 3, n))
    b = np.where(rng.random(n) < worse, y, rng.integers(0, 3, n))
    return y, a, b


def test_batched_macro_f1_is_sklearns_including_a_class_never_predicted() -> None:
    y, a, b = fixed()
    a[a == 2] = 0  # class 2 never predicted: F1 0 for it, as sklearn with zero_division=0
    stacked = np.stack([a, b])
    expected = [f1_score(y, p, labels=[0, 1, 2], average="macro", zero_division=0) for p in (a, b)]
    np.testing.assert_allclose(macro_f1_batched(np.stack([y, y]), stacked, 3), expected, rtol=1e-12)


def test_paired_bootstrap_equals_scipy_with_sklearns_f1_on_the_same_draws() -> None:
    y, a, b = fixed(n=200)

    def sklearn_difference(t: np.ndarray, p: np.ndarray, q: np.ndarray) -> float:
        return f1_score(t, p, labels=[0, 1, 2], average="macro", zero_division=0) - f1_score(
            t, q, labels=[0, 1, 2], average="macro", zero_division=0
        )

    ours = paired_bootstrap(y, a, b, 3, n_resamples=120, seed=11)
    reference = bootstrap(
        (y, a, b), sklearn_difference, paired=True, vectorized=False, n_resamples=120, confidence_level=0.95,
        method="percentile", batch=500, rng=np.random.default_rng(11),
    )  # fmt: skip
    assert ours["difference"] == pytest.approx(sklearn_difference(y, a, b), abs=1e-12)
    assert ours["low"] == pytest.approx(reference.confidence_interval.low, abs=1e-12)
    assert ours["high"] == pytest.approx(reference.confidence_interval.high, abs=1e-12)
    assert ours["low"] < ours["difference"] < ours["high"]


def test_paired_bootstrap_is_seeded_and_identical_models_give_a_point() -> None:
    y, a, b = fixed()
    assert paired_bootstrap(y, a, b, 3, seed=5) == paired_bootstrap(y, a, b, 3, seed=5)
    same = paired_bootstrap(y, a, a.copy(), 3)
    assert same["difference"] == same["low"] == same["high"] == 0.0


def test_mcnemar_exact_is_the_binomial_test_on_the_discordant_pairs() -> None:
    y = np.zeros(30, dtype=int)
    a = np.zeros(30, dtype=int)
    b = np.zeros(30, dtype=int)
    a[:9], b[9:12] = 1, 1  # 9 examples only the champion gets right, 3 only the challenger
    result = mcnemar_test(y, a, b)
    assert result["table"] == [[18, 3], [9, 0]]
    assert result["exact"] and result["p_value"] == pytest.approx(binomtest(3, 12, 0.5).pvalue, rel=1e-12)


def test_mcnemar_chi_square_with_continuity_correction_above_25_discordant() -> None:
    y, a, b = fixed(n=600)
    result = mcnemar_test(y, a, b)
    n01, n10 = result["challenger_only_right"], result["champion_only_right"]
    assert not result["exact"] and n01 + n10 >= 25
    statistic = (abs(n01 - n10) - 1) ** 2 / (n01 + n10)
    assert result["statistic"] == pytest.approx(statistic)
    assert result["p_value"] == pytest.approx(chi2.sf(statistic, 1))


def test_per_class_deltas_and_significance_verdict() -> None:
    y, a, b = fixed(n=1500, better=0.9, worse=0.7)
    out = compare_predictions(y, a, b, ["neg", "neu", "pos"])
    deltas = {r["class"]: r["delta_pt"] for r in out["per_class"]}
    mine = f1_score(y, a, average=None)
    theirs = f1_score(y, b, average=None)
    for i, name in enumerate(["neg", "neu", "pos"]):
        assert deltas[name] == pytest.approx(100 * (mine[i] - theirs[i]), abs=1e-3)
    assert [r["delta_pt"] for r in out["per_class"]] == sorted(deltas.values()), "worst class first"
    np.testing.assert_allclose(out["champion"]["confusion"], confusion_matrix(y, b, normalize="true"), atol=1e-4)
    assert out["significant"] and out["mcnemar"]["p_value"] < 0.05 and out["bootstrap"]["low"] > 0
    close = compare_predictions(*fixed(n=300, better=0.8, worse=0.79), ["neg", "neu", "pos"])
    assert close["significant"] is False


def test_first_champion_has_no_comparison() -> None:
    y, a, _ = fixed()
    out = compare_predictions(y, a, None, ["a", "b", "c"])
    assert out["significant"] is None and out["bootstrap"] is None
    assert per_class(y, a, None, ["a", "b", "c"])[0]["delta_pt"] is None
