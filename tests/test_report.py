"""The report's numbers (magface/report.py) against independent computations on small inputs; the full report
run (several trainings) is not part of the suite."""

import math
import statistics

import numpy as np
import pytest
import torch

from magface import report


def test_figure3_points_are_magnitude_and_cosine_to_the_own_class_centre():
    rng = np.random.default_rng(0)
    f, w = rng.normal(size=(20, 5)), rng.normal(size=(4, 5))
    y = rng.integers(0, 4, 20)
    p = report.figure3_points(f, y, w)
    for i in range(20):
        mag = math.sqrt(sum(v * v for v in f[i]))
        wn = math.sqrt(sum(v * v for v in w[y[i]]))
        cos = sum(a * b for a, b in zip(f[i], w[y[i]])) / (mag * wn)
        assert p["magnitude"][i] == pytest.approx(mag) and p["cos"][i] == pytest.approx(cos)


def test_class_centres_and_last_samples_come_from_the_checkpoint_files(tmp_path):
    from magface.train.loop import LAST_SAMPLES_FILE
    from magface.train.state import FORMAT, rows_file

    w = torch.randn(7, 3)
    for start, end in ((0, 4), (4, 7)):  # two ranks' row files
        torch.save({"format": FORMAT, "num_classes": 7, "start": start, "end": end, "weight": w[start:end],
                    "optim": {}}, rows_file(tmp_path, start, end))
    assert np.allclose(report.class_centres(tmp_path, 7), w.numpy())
    with pytest.raises(FileNotFoundError, match="final training samples"):
        report.load_last_samples(tmp_path)
    np.savez(tmp_path / LAST_SAMPLES_FILE, features=np.ones((3, 3), np.float32), labels=np.array([0, 6, 2]))
    feats, labels = report.load_last_samples(tmp_path)
    assert feats.shape == (3, 3) and list(labels) == [0, 6, 2]


def test_mean_faces_by_magnitude_bins_counts_and_means():
    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    mags = np.array([10.0, 10.5, 19.9, 20.0, 14.0, 11.0])  # bins of width 2.5 over [10, 20]
    d = report.mean_faces_by_magnitude(images, mags, 4)
    assert np.allclose(d["edges"], [10, 12.5, 15, 17.5, 20])
    expected = {0: [0, 1, 5], 1: [4], 2: [], 3: [2, 3]}  # the maximum falls in the last bin
    assert list(d["counts"]) == [len(v) for v in expected.values()]
    for b, members in expected.items():
        if members:
            assert np.allclose(d["means"][b], images[members].astype(float).mean(0))
        else:
            assert np.isnan(d["means"][b]).all()


def test_quality_bands_mean_std_and_verdicts():
    assert list(report.quality_bands([0.0, 0.2499, 0.25, 0.5, 0.99, 1.0])) == [0, 0, 1, 2, 3, 3]
    vals = [0.5, 0.7, 0.65]
    mean, std, n = report.mean_std([*vals, None, float("nan")])
    assert (mean, n) == (pytest.approx(statistics.mean(vals)), 3) and std == pytest.approx(statistics.stdev(vals))
    assert report.mean_std([0.4])[1] == 0.0 and report.mean_std([])[2] == 0
    assert report.compare([0.6, 0.7], [0.5, 0.6])["verdict"] == "held"
    mixed = report.compare([0.9, 0.5], [0.5, 0.6])
    assert mixed["verdict"] == "mixed" and mixed["wins"] == 1 and mixed["diff"] == pytest.approx(0.15)
    assert report.compare([0.1, 0.2], [0.3, 0.4], higher_is_better=False)["verdict"] == "held"
    assert report.compare([0.5], [0.6])["verdict"] == "did not hold"
    assert report.compare([None], [0.6])["verdict"] == "not measured"


def _run(spearman, tar, plus, f_km, at_l_a, at_u_a=0.0):
    return {"metrics": {"quality_spearman": spearman, "synth_ijb.insightface.tar_far_1e-4": tar,
                        "synth_ijb.magface_plus.tar_far_1e-4": plus, "cluster.kmeans.bcubed_f": f_km,
                        "synth_verify.accuracy": 0.9},
            "train_metrics": {"epoch_mag_frac_at_l_a": at_l_a, "epoch_mag_frac_at_u_a": at_u_a}, "extra": {}}


def test_tables_and_claims_from_per_seed_runs():
    runs = {"ArcFace": [_run(0.40, 0.70, 0.71, 0.80, 0.0), _run(0.45, 0.72, 0.72, 0.82, 0.0)],
            "MagFace": [_run(0.55, 0.69, 0.75, 0.81, 0.01), _run(0.60, 0.74, 0.76, 0.80, 0.02, 0.06)]}
    text = report.table_markdown(report.QUALITY_ROWS[:1], runs)
    assert text.splitlines()[2] == (f"| Spearman(\\|f\\|, q), verification images | "
                                    f"{statistics.mean([0.40, 0.45]):.3f} ± {statistics.stdev([0.40, 0.45]):.3f} | "
                                    f"{statistics.mean([0.55, 0.60]):.3f} ± {statistics.stdev([0.55, 0.60]):.3f} |")
    bound_rows = [r for r in report.QUALITY_ROWS if r[0] in report.MAGFACE_ONLY_ROWS]
    lines = report.table_markdown(bound_rows, runs).splitlines()[2:]
    assert [ln.split(" | ")[1:] for ln in lines] == [["n/a", "0.015 ± 0.007 |"], ["n/a", "0.030 ± 0.042 |"]]
    by = {c["claim"]: c for c in report.claims(runs)}
    spear = by["The magnitude ranks images by quality better (Spearman with the known q, verification images)"]
    assert spear["verdict"] == "held" and spear["diff"] == pytest.approx(0.15)
    tar = by["Recognition is not worse: TAR@FAR=1e-4 on the IJB-style set"]
    assert tar["verdict"] == "mixed" and tar["wins"] == 1 and tar["diff"] == pytest.approx(0.005)
    plus = by["Quality-aware templates help (TAR@FAR=1e-4)"]  # MagFace+ vs plain, the MagFace model
    assert plus["verdict"] == "held" and plus["diff"] == pytest.approx(((0.75 - 0.69) + (0.76 - 0.74)) / 2)
    km = by["Clustering is better (K-means, BCubed F)"]
    assert km["verdict"] == "did not hold" and km["diff"] == pytest.approx(-0.005)
    bounds = by["MagFace's magnitudes spread inside [l_a, u_a] (at most 5% at either bound, every seed)"]
    assert bounds["verdict"] == "did not hold" and bounds["wins"] == 1 and bounds["diff"] == pytest.approx(0.06)
    assert by["Clustering is better (DBSCAN, BCubed F)"]["verdict"] == "not measured"
