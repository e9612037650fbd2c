"""Error-versus-reject curves (ERC) for face image quality, as in MagFace's `eval_quality.py` (and CR-FIQA).

A pair's quality is the min of its two images' qualities (for MagFace: feature magnitudes). For each reject
fraction r the int(r * n_pairs) lowest-quality pairs are dropped (stable order on ties), and FNMR is measured
on the rest at a fixed FMR:

- `threshold="recompute"` (MagFace / CR-FIQA): the threshold is re-derived on the remaining impostors. As in
  MagFace's script, with n remaining impostors sorted from most to least similar, the threshold is the
  impostor score at 0-based rank k = floor((n - 1) * fmr) and a genuine pair matches when its score is
  strictly above it; FNMR = share of remaining genuine pairs at or below the threshold. (MagFace compares
  arccos distances; arccos is monotone, so comparing the cosine scores gives the same decisions.)
- `threshold="fixed"`: one threshold from all pairs with the same rule, kept while rejecting.

The area under the curve is the trapezoid rule over the reject fraction (x) of FNMR (y).

`edc_curve` / `edc_pauc` are the error-versus-discard characteristic as ISO/IEC 29794-1 and Schlett et al.
(arXiv 2303.13294) define it, the form the field now reports: the comparison threshold is fixed once on ALL
impostor scores (the (1 - FMR) quantile, FMR 1e-3 or 1e-4); genuine comparisons are discarded in ascending
pair quality, a run of equal qualities at once; y = FNMR (score < threshold) among the genuine comparisons
left, x = fraction of genuine comparisons discarded; the curve is a step function and pAUC is its exact
area from 0 to a discard limit (20% and 30% reported), without subtracting the "theoretical best".
"""

from __future__ import annotations

import math

import numpy as np

from magface.evaluation.metrics import check_pairs

DEFAULT_REJECT_FRACTIONS = np.arange(0, 0.96, 0.05)


def pair_quality(quality1, quality2, shape, what: str) -> np.ndarray:
    """min(quality1, quality2) as float64 (quality1 alone when quality2 is None), checked: `shape`, finite."""
    q = np.asarray(quality1, dtype=np.float64)
    if quality2 is not None:
        q = np.minimum(q, np.asarray(quality2, dtype=np.float64))
    if q.shape != shape:
        raise ValueError(f"{what}: quality has shape {q.shape}, scores {shape}")
    if not np.isfinite(q).all():
        i = int(np.flatnonzero(~np.isfinite(q))[0])
        raise ValueError(f"{what}: quality of pair {i} is {q[i]!r}; qualities must be finite")
    return q


def threshold_at_fmr(impostor_scores: np.ndarray, fmr: float) -> float:
    """The impostor score at 0-based descending rank floor((n - 1) * fmr): MagFace's ERC threshold."""
    n = impostor_scores.size
    # (n-1)*fmr can land a hair under an integer in floating point (e.g. 3000 * 1e-3); nudge before floor.
    k = min(n - 1, int(math.floor((n - 1) * fmr * (1 + 1e-12))))
    return float(np.partition(impostor_scores, n - 1 - k)[n - 1 - k])


def error_versus_reject(
    scores,
    labels,
    quality1,
    quality2=None,
    *,
    fmr: float = 1e-3,
    reject_fractions=DEFAULT_REJECT_FRACTIONS,
    threshold: str = "recompute",
) -> dict:
    """ERC: FNMR at `fmr` after rejecting the lowest-quality pairs.

    quality1, quality2: per-pair qualities of the two images (pair quality = elementwise min); pass only
    quality1 when it already is the pair quality. Returns {"fractions", "fnmr", "thresholds",
    "n_genuine", "n_impostor", "auc", "fmr", "threshold_mode"}. Raises ValueError when a reject fraction
    leaves no genuine or no impostor pair.
    """
    if threshold not in ("recompute", "fixed"):
        raise ValueError(f"threshold must be 'recompute' or 'fixed', got {threshold!r}")
    if not 0.0 <= fmr <= 1.0:
        raise ValueError(f"fmr must be in [0, 1], got {fmr}")
    scores, genuine = check_pairs(scores, labels, "error_versus_reject")
    q = pair_quality(quality1, quality2, scores.shape, "error_versus_reject")
    fractions = np.asarray(reject_fractions, dtype=np.float64)
    if fractions.ndim != 1 or fractions.size == 0 or fractions.min() < 0 or fractions.max() >= 1:
        raise ValueError(f"reject_fractions must be a 1-D list in [0, 1), got {fractions}")
    order = np.argsort(q, kind="stable")  # lowest quality first
    n = scores.size
    fixed_t = threshold_at_fmr(scores[~genuine], fmr) if threshold == "fixed" else None
    fnmr = np.empty(fractions.size)
    thresholds = np.empty(fractions.size)
    n_gen = np.empty(fractions.size, dtype=np.int64)
    n_imp = np.empty(fractions.size, dtype=np.int64)
    for i, r in enumerate(fractions):
        kept = order[int(r * n):]
        s, g = scores[kept], genuine[kept]
        n_gen[i], n_imp[i] = np.count_nonzero(g), np.count_nonzero(~g)
        if n_gen[i] == 0 or n_imp[i] == 0:
            raise ValueError(
                f"error_versus_reject: rejecting {r:.2f} of {n} pairs leaves {n_gen[i]} genuine and {n_imp[i]} "
                "impostor pairs; both are needed"
            )
        t = fixed_t if fixed_t is not None else threshold_at_fmr(s[~g], fmr)
        thresholds[i] = t
        fnmr[i] = np.count_nonzero(s[g] <= t) / n_gen[i]
    auc = float(np.trapezoid(fnmr, fractions)) if fractions.size > 1 else 0.0
    return {
        "fractions": fractions,
        "fnmr": fnmr,
        "thresholds": thresholds,
        "n_genuine": n_gen,
        "n_impostor": n_imp,
        "auc": auc,
        "fmr": fmr,
        "threshold_mode": threshold,
    }


EDC_FMRS = (1e-3, 1e-4)
EDC_LIMITS = (0.2, 0.3)


def edc_curve(scores, labels, quality1, quality2=None, *, fmr: float = 1e-3) -> dict:
    """Error-versus-discard characteristic (FNMR) with the threshold fixed on the full set.

    scores: (n_pairs,) similarities (higher = more alike); labels: 1/True genuine, 0/False impostor;
    quality1, quality2: the two sides' qualities (pair quality = min), or quality1 alone as the pair quality.
    Returns {"discard_fractions", "fnmr"} (the steps: FNMR holds from each discard fraction to the next, with a
    last point (1, 0)), "threshold", "fmr", "n_genuine", "n_impostor". Feed it to `edc_pauc`.
    """
    if not 0.0 < fmr < 1.0:
        raise ValueError(f"edc_curve: fmr must be in (0, 1), got {fmr}")
    scores, genuine = check_pairs(scores, labels, "edc_curve")
    q = pair_quality(quality1, quality2, scores.shape, "edc_curve")
    impostor = scores[~genuine].astype(np.float64)
    threshold = float(np.quantile(impostor, 1.0 - fmr))
    order = np.argsort(q[genuine], kind="stable")
    gq = q[genuine][order]
    errors = (scores[genuine][order] < threshold).astype(np.int64)
    n = gq.size
    left_errors = np.cumsum(errors[::-1])[::-1]  # errors among comparisons k.. (k discarded)
    starts = np.r_[0, np.flatnonzero(gq[1:] != gq[:-1]) + 1]  # ties leave together
    fractions = starts / n
    fnmr = left_errors[starts] / (n - starts)
    return {"discard_fractions": np.r_[fractions, 1.0], "fnmr": np.r_[fnmr, 0.0], "threshold": threshold,
            "fmr": float(fmr), "n_genuine": int(n), "n_impostor": int(impostor.size)}


def edc_pauc(curve: dict, limit: float) -> float:
    """Area under the stepwise EDC from discard fraction 0 to `limit` (in [0, 1])."""
    if not 0.0 <= limit <= 1.0:
        raise ValueError(f"edc_pauc: limit must be in [0, 1], got {limit}")
    x = np.asarray(curve["discard_fractions"], dtype=np.float64)
    y = np.asarray(curve["fnmr"], dtype=np.float64)
    right = np.minimum(np.r_[x[1:], 1.0], limit)
    width = np.clip(right - x, 0.0, None)
    return float(np.sum(y * width))


def edc_report(scores, labels, quality1, quality2=None, *, fmrs=EDC_FMRS, limits=EDC_LIMITS) -> dict:
    """EDC curves and pAUCs at each FMR: {"curves": {fmr: curve}, "pauc": {fmr: {limit: value}}}."""
    curves = {f: edc_curve(scores, labels, quality1, quality2, fmr=f) for f in fmrs}
    return {"curves": curves, "pauc": {f: {lim: edc_pauc(c, lim) for lim in limits} for f, c in curves.items()}}
