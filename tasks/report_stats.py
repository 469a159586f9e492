"""The candidate report's statistics on paired predictions (challenger and champion on the same test examples):
a paired bootstrap confidence interval of the metric difference (scipy), McNemar's test (statsmodels) and
per-class F1 deltas and confusion matrices (scikit-learn). Pure numpy in, plain JSON values out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import confusion_matrix, f1_score
from statsmodels.stats.contingency_tables import mcnemar

N_RESAMPLES = 2000  # percentile CI of a difference of two proportions-like scores: 2k resamples is plenty
EXACT_BELOW = 25  # discordant pairs below this: McNemar's exact binomial test, else the chi-square version


def macro_f1_batched(y: np.ndarray, p: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 along the last axis, for any leading batch shape: scipy's vectorized bootstrap hands us
    (resamples, n) arrays, and calling sklearn once per resample would cost ~1 ms each (2 s per report).
    Same definition as sklearn's `f1_score(average="macro", zero_division=0)` over labels 0..n_classes-1."""
    f1 = np.zeros(y.shape[:-1], dtype=float)
    for c in range(n_classes):
        truth, pred = y == c, p == c
        tp = np.sum(truth & pred, axis=-1)
        denominator = np.sum(truth, axis=-1) + np.sum(pred, axis=-1)  # 2tp + fp + fn
        f1 += np.divide(2 * tp, denominator, out=np.zeros_like(f1), where=denominator > 0)
    return f1 / n_classes


def accuracy_batched(y: np.ndarray, p: np.ndarray, n_classes: int) -> np.ndarray:
    return np.mean(y == p, axis=-1)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "macro_f1": macro_f1_batched,
    "accuracy": accuracy_batched,
}


def paired_bootstrap(
    y: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray,
    n_classes: int,
    metric: str = "macro_f1",
    confidence: float = 0.95,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """Difference challenger − champion of `metric` with a paired bootstrap CI: each resample draws the same test
    examples for both models (scipy's `paired=True`), so what varies is the sample, not the pairing."""
    score = METRICS[metric]

    def difference(truth: np.ndarray, mine: np.ndarray, theirs: np.ndarray, axis: int = -1) -> np.ndarray:
        return score(truth, mine, n_classes) - score(truth, theirs, n_classes)

    y, challenger, champion = (np.asarray(a, dtype=np.int64) for a in (y, challenger, champion))
    observed = float(difference(y, challenger, champion))
    if len(y) < 2 or np.array_equal(challenger, champion):  # no variation to resample: the CI is the point
        return {"metric": metric, "difference": observed, "low": observed, "high": observed,
                "confidence": confidence, "n_resamples": 0, "method": "degenerate"}  # fmt: skip
    result = bootstrap(
        (y, challenger, champion),
        difference,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",  # BCa's jackknife costs n statistic evaluations: too slow inside every retrain
        batch=500,  # bounds memory: 500 × n × int64 per array at a time
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return {"metric": metric, "difference": observed, "low": float(low), "high": float(high),
            "confidence": confidence, "n_resamples": n_resamples, "method": "percentile"}  # fmt: skip


def mcnemar_test(y: np.ndarray, challenger: np.ndarray, champion: np.ndarray) -> dict[str, Any]:
    """McNemar's test on who is right on which example: only the discordant pairs carry information.
    Exact binomial below EXACT_BELOW discordant pairs, chi-square with continuity correction above."""
    right_a, right_b = np.asarray(challenger) == np.asarray(y), np.asarray(champion) == np.asarray(y)
    table = [
        [int(np.sum(right_a & right_b)), int(np.sum(right_a & ~right_b))],
        [int(np.sum(~right_a & right_b)), int(np.sum(~right_a & ~right_b))],
    ]
    discordant = table[0][1] + table[1][0]
    exact = discordant < EXACT_BELOW
    result = mcnemar(np.array(table), exact=exact, correction=True)
    return {
        "table": table,  # rows: challenger right / wrong; columns: champion right / wrong
        "challenger_only_right": table[0][1],
        "champion_only_right": table[1][0],
        "statistic": float(result.statistic),
        "p_value": float(result.pvalue),
        "exact": exact,
    }


def per_class(
    y: np.ndarray, challenger: np.ndarray, champion: np.ndarray | None, classes: list[str]
) -> list[dict[str, Any]]:
    """F1 per class of both models and the delta in points, worst delta first."""
    labels = list(range(len(classes)))
    mine = f1_score(y, challenger, labels=labels, average=None, zero_division=0)
    theirs = f1_score(y, champion, labels=labels, average=None, zero_division=0) if champion is not None else None
    support = np.bincount(np.asarray(y, dtype=np.int64), minlength=len(classes))
    rows = [
        {"class": c, "support": int(support[i]), "challenger_f1": float(mine[i]),
         "champion_f1": None if theirs is None else float(theirs[i]),
         "delta_pt": None if theirs is None else round(100 * float(mine[i] - theirs[i]), 3)}
        for i, c in enumerate(classes)
    ]  # fmt: skip
    return sorted(rows, key=lambda r: r["delta_pt"] if r["delta_pt"] is not None else 0.0)


def normalised_confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> list[list[float]]:
    """Rows sum to 1 (recall on the diagonal); a class without test examples is a row of zeros."""
    return confusion_matrix(y, pred, labels=list(range(n_classes)), normalize="true").round(4).tolist()


def summary(y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    return {"macro_f1": float(macro_f1_batched(y, pred, n_classes)), "accuracy": float(np.mean(y == pred)),
            "confusion": normalised_confusion(y, pred, n_classes)}  # fmt: skip


def compare_predictions(
    y: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray | None,
    classes: list[str],
    metric: str = "macro_f1",
    level: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the report says about challenger vs champion on one test split. `significant`: the CI at
    confidence 1 − level excludes 0 on the winning side AND McNemar rejects at `level`."""
    n = len(classes)
    out: dict[str, Any] = {
        "metric": metric,
        "level": level,
        "test_size": len(y),
        "challenger": summary(y, challenger, n),
        "per_class": per_class(y, challenger, champion, classes),
    }  # fmt: skip
    if champion is None:
        return out | {"champion": None, "bootstrap": None, "mcnemar": None, "significant": None}
    boot = paired_bootstrap(y, challenger, champion, n, metric, 1 - level, seed=seed)
    test = mcnemar_test(y, challenger, champion)
    return out | {
        "champion": summary(y, champion, n),
        "bootstrap": boot,
        "mcnemar": test,
        "significant": bool(boot["low"] > 0 and test["p_value"] < level),
    }  # fmt: skip
