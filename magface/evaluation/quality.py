"""Error-versus-reject curves (ERC) for face image quality, as in MagFace's `eval_quality.py` (and CR-FIQA).

A pair's quality is the min of its two images' qualities (for MagFace: feature magnitudes). For each reject
fraction r the int(r * n_pairs) lowest-quality pairs are dropped (stable order on ties), and FNMR is measured
on the rest at a fixed FMR:

- `threshold="recompute"` (MagFace / CR-FIQA): the threshold is re-derived on the remaining impostors. As in
  MagFace's script, with n remaining impostors sorted from most to least similar, the threshold is the
  impostor score at 0-based rank k = floor((n - 1) * fmr) and a genuine pair matches when its score is
  strictly above it; FNMR = share of remaining genuine pairs at or below the threshold. (MagFace compares
  arccos distances; arccos is monotone, so comparing the cosine scores gives the same decisions.)
- `threshold="fixed"` (ISO/IEC 29794-1 EDC): one threshold from all pairs with the same rule, kept while rejecting.

The area under the curve is the trapezoid rule over the reject fraction (x) of FNMR (y).
"""

from __future__ import annotations

import math

import numpy as np

from magface.evaluation.metrics import check_pairs

DEFAULT_REJECT_FRACTIONS = np.arange(0, 0.96, 0.05)


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
    q = np.asarray(quality1, dtype=np.float64)
    if quality2 is not None:
        q = np.minimum(q, np.asarray(quality2, dtype=np.float64))
    if q.shape != scores.shape:
        raise ValueError(f"error_versus_reject: quality has shape {q.shape}, scores {scores.shape}")
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
