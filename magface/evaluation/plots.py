"""Evaluation figures: ROC curves, ERC curves, magnitude histograms, magnitude vs distance to the centre.

Every function builds a `matplotlib.figure.Figure` directly (Agg canvas, no pyplot global state, nothing
shown) and returns it; callers save it (`fig.savefig`) or hand it to `Tracker.log_figure`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from magface.evaluation.metrics import DEFAULT_FARS


def _figure(size=(6.0, 4.5)) -> tuple[Figure, object]:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def roc_figure(curves: Mapping[str, tuple], title: str = "ROC", fars=DEFAULT_FARS) -> Figure:
    """ROC curves on a log-FPR axis that starts where the curves start (a small set's first false accept is
    far above 1e-6). curves: {name: (fpr, tpr) or (fpr, tpr, thresholds)} e.g. from roc_points."""
    fig, ax = _figure()
    lo = None
    for name, curve in curves.items():
        fpr, tpr = np.asarray(curve[0]), np.asarray(curve[1])
        ok = fpr > 0
        ax.plot(fpr[ok], tpr[ok], lw=1.2, label=name)
        if ok.any():
            lo = float(fpr[ok].min()) if lo is None else min(lo, float(fpr[ok].min()))
    lo = min(fars) if lo is None else lo
    ax.set_xscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_xticks([f for f in fars if f >= lo] or [1.0])
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.grid(True, which="major", ls="--", lw=0.5)
    ax.set_title(title)
    ax.legend(loc="lower right")
    return fig


def erc_figure(curves: Mapping[str, Mapping], title: str | None = None) -> Figure:
    """Error-versus-reject curves. curves: {name: error_versus_reject(...) result}; the legend shows the AUC."""
    fig, ax = _figure()
    fmr = None
    for name, erc in curves.items():
        fmr = erc.get("fmr", fmr)
        ax.plot(100 * np.asarray(erc["fractions"]), erc["fnmr"], marker=".", lw=1.2, label=f"{name} (AUC {erc['auc']:.4f})")
    ax.set_xlabel("Ratio of rejected pairs [%]")
    ax.set_ylabel("FNMR")
    at = f"FNMR at FMR={fmr:g}" if fmr is not None else "ERC"
    ax.set_title(f"{title}: {at}" if title and fmr is not None and "FMR" not in title else (title or at))
    ax.grid(True, ls="--", lw=0.5)
    ax.legend(loc="upper right")
    return fig


def edc_figure(curves: Mapping[str, Mapping], title: str | None = None, limit: float = 0.3) -> Figure:
    """Error-versus-discard characteristics as steps. curves: {name: quality.edc_curve(...) result}; the legend
    shows pAUC to 20% and 30% discard; the x axis stops a little past `limit`."""
    from magface.evaluation.quality import edc_pauc

    fig, ax = _figure()
    for name, c in curves.items():
        x, y = np.asarray(c["discard_fractions"]), np.asarray(c["fnmr"])
        ax.step(100 * x, y, where="post", lw=1.2,
                label=f"{name} (pAUC20 {edc_pauc(c, 0.2):.4f}, pAUC30 {edc_pauc(c, 0.3):.4f})")
    ax.axvline(20, color="grey", ls=":", lw=0.8)
    ax.axvline(30, color="grey", ls=":", lw=0.8)
    ax.set_xlim(0, 100 * min(1.0, limit + 0.1))
    ax.set_xlabel("Discarded genuine comparisons [%] (lowest quality first)")
    ax.set_ylabel("FNMR at the full-set threshold")
    ax.set_title(title or "EDC")
    ax.grid(True, ls="--", lw=0.5)
    ax.legend(loc="upper right", fontsize="small")
    return fig


def magnitude_histogram(magnitudes, bins: int = 50, title: str = "Feature magnitudes",
                        bounds: Mapping[str, float] | None = None) -> Figure:
    """Histogram(s) of feature magnitudes: an array, or {name: array} overlaid (e.g. per benchmark or quality bin).
    bounds: labelled vertical lines, e.g. the loss's {"l_a": 10, "u_a": 110}."""
    fig, ax = _figure()
    groups = magnitudes if isinstance(magnitudes, Mapping) else {"": magnitudes}
    all_m = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in groups.values()])
    edges = np.histogram_bin_edges(all_m, bins=bins)
    for name, m in groups.items():
        ax.hist(np.asarray(m).ravel(), bins=edges, alpha=0.6 if len(groups) > 1 else 1.0, label=name or None)
    for i, (name, x) in enumerate((bounds or {}).items()):
        ax.axvline(x, color="C3", ls="--" if i % 2 == 0 else ":", lw=1.2, label=f"{name} = {x:g}")
    ax.set_xlabel("Magnitude ‖f‖")
    ax.set_ylabel("Images")
    ax.set_title(title)
    if len(groups) > 1 or bounds:
        ax.legend()
    return fig


def magnitude_center_figure(data: Mapping, title: str = "Magnitude vs distance to centre", max_points: int = 20000) -> Figure:
    """The paper's Figure 8: scatter of magnitude against cosine distance to the class centre, with the binned
    mean. data: magnitude_vs_center(...) result."""
    fig, ax = _figure()
    mag, dist = np.asarray(data["magnitude"]), np.asarray(data["distance"])
    idx = np.arange(mag.size)
    if mag.size > max_points:
        idx = np.random.default_rng(0).choice(mag.size, max_points, replace=False)
    ax.scatter(mag[idx], dist[idx], s=3, alpha=0.3, lw=0)
    edges = np.quantile(mag, np.linspace(0, 1, 11))
    which = np.clip(np.searchsorted(edges, mag, side="right") - 1, 0, 9)
    centres = [(mag[which == b].mean(), dist[which == b].mean()) for b in range(10) if np.any(which == b)]
    if centres:
        ax.plot(*zip(*centres), color="C3", marker="o", lw=1.5, label="binned mean")
        ax.legend()
    ax.set_xlabel("Magnitude ‖f‖")
    ax.set_ylabel("Cosine distance to centre")
    ax.set_title(f"{title} (Spearman {data.get('spearman', float('nan')):.3f})")
    ax.grid(True, ls="--", lw=0.5)
    return fig
