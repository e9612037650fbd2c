"""Verification metrics on pair scores: TAR@FAR with the published IJB convention, and ROC points to plot.

The published IJB-B/IJB-C numbers (insightface's `IJB_11.py`, MagFace's `eval_ijb.py`) come from
`fpr, tpr, _ = sklearn.metrics.roc_curve(labels, scores)` (default `drop_intermediate=True`), then, for each
target FAR, the curve is flipped and `min(zip(abs(fpr - far), range(len(fpr))))` picks the point. Python's
`min` returns the first minimum of the flipped list, i.e. among the points at the smallest |FPR - FAR| the one
with the LARGEST original index: the largest FPR/TPR. That is what "largest TPR on ties" means here, and it
also settles a target exactly half-way between two points (the upper one wins).

`tar_at_far` reproduces that curve bit for bit without sorting all scores: only the points with FPR up to
just past the largest target matter, so it keeps the top impostor scores (`np.partition`), the genuine scores
above the same cutoff, and rebuilds sklearn's points (distinct thresholds, the collinear-point dropping of
`drop_intermediate`, the (0, 0) start) on that prefix. A prefix is accepted only when the points it cannot
see (below its cutoff) are provably farther from every target than the chosen one; otherwise it grows.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def check_pairs(scores, labels, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Validate 1-D `scores` and binary `labels` (bool or 0/1; 1 = genuine); returns (scores, genuine mask).

    Raises ValueError naming the offending index for non-finite scores or labels outside {0, 1}, and when
    either class is missing (a ROC is undefined then; sklearn would return NaNs with a warning).
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"{what}: scores and labels must be 1-D of equal length, got {scores.shape} and {labels.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    finite = np.isfinite(scores)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{what}: score at index {i} is {scores[i]!r}; scores must be finite")
    if labels.dtype == bool:
        genuine = labels
    else:
        genuine = labels == 1
        bad = ~(genuine | (labels == 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{what}: label at index {i} is {labels[i]!r}; labels must be 0 (impostor) or 1 (genuine)")
    n_pos = int(np.count_nonzero(genuine))
    if n_pos == 0 or n_pos == scores.size:
        raise ValueError(
            f"{what}: needs both genuine (label 1) and impostor (label 0) pairs, got {n_pos} genuine and "
            f"{scores.size - n_pos} impostor"
        )
    return scores, genuine


def _curve_from_top(values: np.ndarray, is_pos: np.ndarray, complete: bool):
    """sklearn's ROC counts (before the (0, 0) start) for the distinct thresholds in `values`.

    Returns (fps, tps, thresholds, keep, confirmed_upto): `keep` is drop_intermediate's mask; when the prefix is
    not `complete` the last point's keep flag is unknown (it needs the next, unseen point), so only points
    `< confirmed_upto` are certain.
    """
    order = np.argsort(values, kind="stable")[::-1]
    v = values[order]
    ends = np.r_[np.flatnonzero(np.diff(v)), v.size - 1]  # last index of each distinct value, as sklearn
    tps = np.cumsum(is_pos[order], dtype=np.float64)[ends]
    fps = 1.0 + ends.astype(np.float64) - tps
    n = fps.size
    keep = np.ones(n, dtype=bool)
    if n > 2:
        keep[1:-1] = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
    return fps, tps, v[ends], keep, (n if complete else n - 1)


def _prefix(neg: np.ndarray, pos: np.ndarray, n_top: int):
    """The curve restricted to thresholds >= the `n_top`-th largest impostor score (all of it if n_top >= N).
    neg, pos: the impostor and genuine scores, split once by the caller."""
    if n_top >= neg.size:
        values, n_sel_neg, complete = np.concatenate([neg, pos]), neg.size, True
    else:
        cut = np.partition(neg, neg.size - n_top)[neg.size - n_top]
        top_neg = neg[neg >= cut]
        top_pos = pos[pos >= cut]
        values, n_sel_neg = np.concatenate([top_neg, top_pos]), top_neg.size
        complete = n_sel_neg == neg.size and top_pos.size == pos.size
    is_pos = np.zeros(values.size, dtype=np.float64)
    is_pos[n_sel_neg:] = 1.0
    return _curve_from_top(values, is_pos, complete)


def _pick(fpr, tpr, keep, confirmed_upto, far, convention):
    """TPR for one target on a (possibly partial) curve with the (0, 0) point prepended, or None if the
    partial curve cannot decide it."""
    n = fpr.size
    partial_edge = fpr[-1] if confirmed_upto < n else np.inf  # first FPR the prefix may be wrong beyond
    if convention == "strict":
        ok = fpr <= far
        if not partial_edge > far:
            return None
        return float(tpr[np.flatnonzero(ok)[-1]])
    idx = np.flatnonzero(keep)
    d = np.abs(fpr[idx] - far)
    m = d.min()
    j = idx[np.flatnonzero(d == m)[-1]]  # the largest index among the nearest: insightface's flipped min()
    if j >= confirmed_upto or not partial_edge - far > m:
        return None
    return float(tpr[j])


def tar_at_far(
    scores,
    labels,
    fars: Iterable[float] = DEFAULT_FARS,
    convention: str = "nearest",
) -> dict[float, float]:
    """TAR at each target FAR, as a dict {far: tar}.

    `convention="nearest"` (the published IJB numbers): sklearn's `roc_curve` with its default
    `drop_intermediate=True`, then the curve point whose FPR is nearest the target; among equally near points
    the one with the largest TPR (insightface's flipped `min`). Identical to that procedure on any input.
    `convention="strict"`: the largest TPR over ALL thresholds (every achievable operating point, i.e.
    `roc_curve(..., drop_intermediate=False)`) whose FPR <= the target; 0.0 when none but the (0, 0) start.

    labels: 1/True = genuine, 0/False = impostor. Scores: higher = more similar, any float dtype (compared in
    their own dtype, as sklearn does). Cost: O(N) passes plus a sort of the top max(fars)*N impostor scores.
    """
    if convention not in ("nearest", "strict"):
        raise ValueError(f"convention must be 'nearest' or 'strict', got {convention!r}")
    fars = [float(f) for f in fars]
    if not fars or any(not (0.0 <= f <= 1.0) for f in fars):
        raise ValueError(f"fars must be a non-empty list of rates in [0, 1], got {fars}")
    scores, genuine = check_pairs(scores, labels, "tar_at_far")
    n_neg = scores.size - int(np.count_nonzero(genuine))
    n_pos = scores.size - n_neg
    n_top = min(n_neg, int(np.floor(max(fars) * n_neg)) + 2)
    neg, pos = scores[~genuine], scores[genuine]  # split once, not per prefix size
    while True:
        fps, tps, _, keep, confirmed = _prefix(neg, pos, n_top)
        fpr = np.r_[0.0, fps] / float(n_neg)
        tpr = np.r_[0.0, tps] / float(n_pos)
        keep = np.r_[True, keep]
        out = {f: _pick(fpr, tpr, keep, confirmed + 1, f, convention) for f in fars}
        if all(v is not None for v in out.values()):
            return out
        if n_top >= n_neg:  # the complete curve always decides; reaching here is a bug
            raise AssertionError("tar_at_far: complete ROC left a target undecided")
        n_top = min(n_neg, 4 * n_top)


def roc_points(scores, labels, max_points: int | None = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's `roc_curve(labels, scores)` (drop_intermediate=True) as (fpr, tpr, thresholds), thinned for
    plotting to at most about `max_points` points spread evenly on a log-FPR axis and on a linear one (the
    first and last points always kept). `max_points=None` returns every point."""
    scores, genuine = check_pairs(scores, labels, "roc_points")
    n_neg = scores.size - int(np.count_nonzero(genuine))
    fps, tps, thr, keep, _ = _prefix(scores[~genuine], scores[genuine], n_neg)
    fpr = np.r_[0.0, fps[keep]] / float(n_neg)
    tpr = np.r_[0.0, tps[keep]] / float(scores.size - n_neg)
    thr = np.r_[np.inf, thr[keep].astype(np.float64)]
    if max_points is None or fpr.size <= max_points:
        return fpr, tpr, thr
    half = max(max_points // 2, 2)
    grid = np.r_[np.geomspace(1.0 / n_neg, 1.0, half), np.linspace(0.0, 1.0, half)]
    idx = np.unique(np.r_[0, np.clip(np.searchsorted(fpr, grid), 0, fpr.size - 1), fpr.size - 1])
    return fpr[idx], tpr[idx], thr[idx]
