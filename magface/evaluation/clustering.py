"""Clustering of face features and its scores (BCubed, NMI), and the magnitude-versus-centre relationship
of the MagFace paper (its Figure 8: high-magnitude features lie close to their class centre).

Clusterers are scikit-learn's. BCubed and NMI are computed here from one contingency table:
- BCubed (Bagga & Baldwin): precision = mean over items of |own cluster ∩ own class| / |own cluster|,
  recall = the same over |own class|, F = harmonic mean.
- NMI = I(true; pred) / mean(H(true), H(pred)): the ARITHMETIC-mean normalisation, scikit-learn's default
  (`normalized_mutual_info_score(average_method="arithmetic")`); natural logs; 1.0 when both labelings are
  a single cluster.
"""

from __future__ import annotations

import numpy as np

METHODS = ("kmeans", "ahc", "dbscan")


def _contingency(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cell counts, class sizes per cell, cluster sizes per cell) for the non-empty cells."""
    t = np.asarray(labels_true)
    p = np.asarray(labels_pred)
    if t.ndim != 1 or t.shape != p.shape or t.size == 0:
        raise ValueError(f"labels must be non-empty 1-D arrays of equal length, got {t.shape} and {p.shape}")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    cells, counts = np.unique(np.stack([ti.ravel(), pi.ravel()]), axis=1, return_counts=True)
    class_size = np.bincount(ti.ravel())[cells[0]]
    cluster_size = np.bincount(pi.ravel())[cells[1]]
    return counts.astype(np.float64), class_size.astype(np.float64), cluster_size.astype(np.float64)


def bcubed(labels_true, labels_pred) -> tuple[float, float, float]:
    """BCubed (precision, recall, F) of a predicted clustering against the true identities."""
    n_cell, n_class, n_cluster = _contingency(labels_true, labels_pred)
    n = n_cell.sum()
    precision = float(np.sum(n_cell**2 / n_cluster) / n)
    recall = float(np.sum(n_cell**2 / n_class) / n)
    return precision, recall, 2 * precision * recall / (precision + recall)


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information with arithmetic-mean normalisation (scikit-learn's default)."""
    n_cell, n_class, n_cluster = _contingency(labels_true, labels_pred)
    n = n_cell.sum()

    def entropy(labels) -> float:
        _, c = np.unique(np.asarray(labels), return_counts=True)
        pr = c / c.sum()
        return float(-np.sum(pr * np.log(pr)))

    h_true, h_pred = entropy(labels_true), entropy(labels_pred)
    if h_true == 0.0 and h_pred == 0.0:
        return 1.0
    mi = max(float(np.sum(n_cell / n * (np.log(n_cell * n) - np.log(n_class * n_cluster)))), 0.0)
    return mi / max((h_true + h_pred) / 2, np.finfo(np.float64).eps)


def cluster_features(features, method: str = "kmeans", n_clusters: int | None = None, **params) -> np.ndarray:
    """Cluster rows of `features` with scikit-learn; returns one integer label per row.

    method: "kmeans" (`KMeans`, needs n_clusters; n_init=10 and random_state=0 unless given), "ahc"
    (`AgglomerativeClustering`, needs n_clusters; ward linkage unless given) or "dbscan" (`DBSCAN`; eps and
    min_samples in params, metric euclidean unless given; on unit features d^2 = 2 - 2 cos). DBSCAN's noise
    points (-1) become singleton clusters unless `noise_as_singletons=False`, so BCubed/NMI count them as
    their own clusters rather than as one big one.
    """
    from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans

    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (n, d) array, got shape {x.shape}")
    if method in ("kmeans", "ahc") and (n_clusters is None or not 1 <= n_clusters <= x.shape[0]):
        raise ValueError(f"{method} needs n_clusters in [1, {x.shape[0]}], got {n_clusters}")
    if method == "kmeans":
        params = {"n_init": 10, "random_state": 0, **params}
        return KMeans(n_clusters=n_clusters, **params).fit_predict(x).astype(np.int64)
    if method == "ahc":
        return AgglomerativeClustering(n_clusters=n_clusters, **params).fit_predict(x).astype(np.int64)
    if method == "dbscan":
        singletons = params.pop("noise_as_singletons", True)
        labels = DBSCAN(**params).fit_predict(x).astype(np.int64)
        noise = labels < 0
        if singletons and noise.any():
            labels[noise] = labels.max(initial=-1) + 1 + np.arange(np.count_nonzero(noise))
        return labels
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def cluster_report(
    features_unit,
    magnitudes,
    labels_true,
    methods=METHODS,
    params: dict[str, dict] | None = None,
) -> dict:
    """Cluster with each method and score it against the identities.

    n_clusters for k-means/AHC defaults to the true number of identities; `params` maps a method to extra
    keyword arguments (e.g. {"dbscan": {"eps": 0.9, "min_samples": 3}}). Returns
    {method: {"bcubed_precision", "bcubed_recall", "bcubed_f", "nmi", "n_clusters", "labels"},
     "magnitude_vs_center": magnitude_vs_center(features_unit, magnitudes, labels_true)}.
    """
    params = params or {}
    labels_true = np.asarray(labels_true)
    k = int(np.unique(labels_true).size)
    report: dict = {}
    for method in methods:
        kw = dict(params.get(method, {}))
        if method != "dbscan":
            kw.setdefault("n_clusters", k)
        pred = cluster_features(features_unit, method, **kw)
        p, r, f = bcubed(labels_true, pred)
        report[method] = {
            "bcubed_precision": p,
            "bcubed_recall": r,
            "bcubed_f": f,
            "nmi": nmi(labels_true, pred),
            "n_clusters": int(np.unique(pred).size),
            "labels": pred,
        }
    report["magnitude_vs_center"] = magnitude_vs_center(features_unit, magnitudes, labels_true)
    return report


def magnitude_vs_center(features_unit, magnitudes, labels) -> dict:
    """The paper's Figure 8 data: each sample's magnitude and cosine distance (1 - cos) to its group's centre.

    The centre is the normalised mean of the group's unit features (`labels`: identities, or cluster labels).
    Returns {"magnitude", "distance", "label", "spearman"}: Spearman's rho of magnitude vs distance over
    samples in groups of >= 2 (MagFace predicts it negative: higher magnitude, closer to the centre).
    """
    from scipy.stats import spearmanr

    x = np.asarray(features_unit, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    mag = np.asarray(magnitudes, dtype=np.float64)
    _, inv, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    inv = inv.ravel()
    centres = np.zeros((counts.size, x.shape[1]))
    np.add.at(centres, inv, x)
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    distance = 1.0 - np.einsum("ij,ij->i", x, centres[inv])
    multi = counts[inv] >= 2
    rho = float(spearmanr(mag[multi], distance[multi]).statistic) if np.count_nonzero(multi) > 2 else float("nan")
    return {"magnitude": mag, "distance": distance, "label": np.asarray(labels), "spearman": rho}
