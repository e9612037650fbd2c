"""BCubed vs its O(n^2) definition, NMI vs scikit-learn, clustering quality on blobs vs random labels,
the magnitude-vs-centre data, and that every plot renders."""

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from magface.evaluation import (
    bcubed,
    cluster_features,
    cluster_report,
    erc_figure,
    error_versus_reject,
    magnitude_center_figure,
    magnitude_histogram,
    magnitude_vs_center,
    nmi,
    roc_figure,
    roc_points,
)


def bcubed_brute_force(t, p):
    t, p = np.asarray(t), np.asarray(p)
    same_c = p[:, None] == p[None, :]
    same_l = t[:, None] == t[None, :]
    both = (same_c & same_l).sum(1)
    prec, rec = np.mean(both / same_c.sum(1)), np.mean(both / same_l.sum(1))
    return prec, rec, 2 * prec * rec / (prec + rec)


def test_bcubed_and_nmi_against_independent_definitions():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 300))
        t = rng.integers(0, rng.integers(1, 20), n)
        p = np.where(rng.random(n) < 0.7, t * 3 + 1, rng.integers(-5, 30, n))  # strings/negatives fine too
        assert bcubed(t, p) == pytest.approx(bcubed_brute_force(t, p), rel=1e-12)
        assert nmi(t, p) == pytest.approx(normalized_mutual_info_score(t, p), rel=1e-10, abs=1e-12)
    assert nmi([0, 0, 0], [5, 5, 5]) == 1.0 == normalized_mutual_info_score([0, 0, 0], [5, 5, 5])
    assert bcubed(["a", "a", "b"], ["x", "x", "x"]) == pytest.approx(bcubed_brute_force([0, 0, 1], [0, 0, 0]))


def blobs(rng, k=12, per=25, d=32, spread=0.08):
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(k), per)
    x = centres[labels] + rng.normal(0, spread, (labels.size, d))
    mags = 10 + 20 * rng.random(labels.size)
    return x / np.linalg.norm(x, axis=1, keepdims=True), mags, labels


def test_cluster_report_high_on_blobs_low_on_random():
    rng = np.random.default_rng(1)
    x, mags, labels = blobs(rng)
    report = cluster_report(x, mags, labels, params={"dbscan": {"eps": 0.9, "min_samples": 3}})
    for method in ("kmeans", "ahc", "dbscan"):
        assert report[method]["bcubed_f"] > 0.95, (method, report[method])
        assert report[method]["nmi"] > 0.95, (method, report[method])
    rand = cluster_report(x, mags, rng.permutation(labels), methods=("kmeans",))
    assert rand["kmeans"]["bcubed_f"] < 0.3 and rand["kmeans"]["nmi"] < 0.3


def test_dbscan_noise_becomes_singletons_and_bad_input():
    rng = np.random.default_rng(2)
    x, _, _ = blobs(rng, k=3, per=10)
    far = rng.normal(size=(4, x.shape[1])) * 10
    labels = cluster_features(np.vstack([x, far]), "dbscan", eps=0.9, min_samples=3)
    assert len(set(labels[-4:])) == 4 and labels.min() >= 0 and len(set(labels[:-4])) == 3
    raw = cluster_features(np.vstack([x, far]), "dbscan", eps=0.9, min_samples=3, noise_as_singletons=False)
    assert np.all(raw[-4:] == -1)
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_features(x, "kmeans")
    with pytest.raises(ValueError, match="method"):
        cluster_features(x, "spectral", n_clusters=3)


def test_magnitude_vs_center_follows_construction():
    # samples pulled toward their centre in proportion to magnitude: distance falls as magnitude rises
    rng = np.random.default_rng(3)
    k, per, d = 20, 30, 16
    centres = rng.normal(size=(k, d))
    labels = np.repeat(np.arange(k), per)
    mags = rng.uniform(10, 40, labels.size)
    x = centres[labels] / np.linalg.norm(centres[labels], axis=1, keepdims=True)
    x = x + rng.normal(0, 1, x.shape) * (2.0 / mags)[:, None]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    data = magnitude_vs_center(x, mags, labels)
    assert data["spearman"] < -0.6
    i = 5
    c = x[labels == labels[i]].mean(0)
    assert data["distance"][i] == pytest.approx(1 - x[i] @ c / np.linalg.norm(c), abs=1e-12)


def test_plots_render(tmp_path):
    rng = np.random.default_rng(4)
    s = np.r_[rng.normal(0, 1, 5000), rng.normal(3, 1, 500)]
    lab = np.r_[np.zeros(5000, int), np.ones(500, int)]
    q = rng.random(s.size)
    x, mags, labels = blobs(rng, k=4, per=10)
    figs = [
        roc_figure({"a": roc_points(s, lab), "b": roc_points(s * 0.5, lab)}),
        erc_figure({"magnitude": error_versus_reject(s, lab, q, reject_fractions=[0, 0.2, 0.4])}),
        magnitude_histogram({"lfw": mags, "ijbb": mags + 3}),
        magnitude_histogram(mags),
        magnitude_center_figure(magnitude_vs_center(x, mags, labels)),
    ]
    for i, fig in enumerate(figs):
        path = tmp_path / f"{i}.png"
        fig.savefig(path)
        assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
