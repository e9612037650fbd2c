"""10-fold verification accuracy on `.bin` pair sets (LFW, CFP-FP, AgeDB-30), as insightface's `verification.py`.

Protocol: L2-normalise both embeddings (sklearn's `normalize`), squared L2 distance per pair, "same" when
distance < threshold. Pairs are split into `n_folds` contiguous folds (sklearn `KFold(shuffle=False)`: the
first n % k folds one pair longer); for each fold the threshold with the best accuracy on the other folds
(first best on ties, `np.argmax`) over the grid `np.arange(0, 4, 0.01)` is applied to the held-out fold.
Reported: mean and (population) std of the fold accuracies, as insightface prints them.
"""

from __future__ import annotations

import numpy as np
from sklearn.preprocessing import normalize

DEFAULT_THRESHOLDS = np.arange(0, 4, 0.01)


def contiguous_folds(n: int, n_folds: int) -> list[np.ndarray]:
    """Test indices of each fold, as sklearn's KFold(n_splits, shuffle=False)."""
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be in [2, number of pairs={n}], got {n_folds}")
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    bounds = np.r_[0, np.cumsum(sizes)]
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(n_folds)]


def _correct_counts(dist_same: np.ndarray, dist_diff: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Correct decisions at every threshold: genuine pairs with dist < t plus impostors with dist >= t."""
    tp = np.searchsorted(np.sort(dist_same), thresholds, side="left")
    tn = dist_diff.size - np.searchsorted(np.sort(dist_diff), thresholds, side="left")
    return tp + tn


def verification_accuracy(embeddings1, embeddings2, issame, n_folds: int = 10, thresholds=None):
    """(mean_acc, std_acc, details) for pairs (embeddings1[i], embeddings2[i]) labelled `issame[i]`.

    details: `fold_accuracy` (n_folds,), `best_threshold` per fold, `thresholds` (the grid), `tpr` and `fpr`
    (per threshold, averaged over the held-out folds, for a ROC plot), `distances` (squared L2 per pair).
    Integer counts decide every comparison, so the numbers equal insightface's loop exactly.
    """
    e1 = np.asarray(embeddings1)
    e2 = np.asarray(embeddings2)
    same = np.asarray(issame).astype(bool)
    if e1.ndim != 2 or e1.shape != e2.shape or same.shape != (e1.shape[0],):
        raise ValueError(f"embeddings must be (n, d) twice and issame (n,), got {e1.shape}, {e2.shape}, {same.shape}")
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    dist = np.sum(np.square(normalize(e1) - normalize(e2)), axis=1)
    n = dist.size
    folds = contiguous_folds(n, n_folds)
    acc = np.zeros(n_folds)
    best = np.zeros(n_folds)
    tprs = np.zeros((n_folds, thresholds.size))
    fprs = np.zeros((n_folds, thresholds.size))
    for k, test in enumerate(folds):
        train = np.ones(n, dtype=bool)
        train[test] = False
        train_acc = _correct_counts(dist[train & same], dist[train & ~same], thresholds) / np.count_nonzero(train)
        i = int(np.argmax(train_acc))
        best[k] = thresholds[i]
        d_same, d_diff = dist[test][same[test]], dist[test][~same[test]]
        tp = np.searchsorted(np.sort(d_same), thresholds, side="left")
        fp = np.searchsorted(np.sort(d_diff), thresholds, side="left")
        tprs[k] = tp / d_same.size if d_same.size else 0.0
        fprs[k] = fp / d_diff.size if d_diff.size else 0.0
        acc[k] = (tp[i] + d_diff.size - fp[i]) / test.size
    details = {
        "fold_accuracy": acc,
        "best_threshold": best,
        "thresholds": thresholds,
        "tpr": tprs.mean(axis=0),
        "fpr": fprs.mean(axis=0),
        "distances": dist,
    }
    return float(np.mean(acc)), float(np.std(acc)), details
