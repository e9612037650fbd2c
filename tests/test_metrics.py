"""TAR@FAR and ROC points against the published sklearn procedure, on random inputs with heavy ties."""

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from magface.evaluation import roc_points, tar_at_far

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def reference_nearest(scores, labels, fars):
    """insightface IJB_11.py / MagFace eval_ijb.py, verbatim in spirit: flip, then min over (|fpr - far|, index)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = {}
    for far in fars:
        _, i = min(zip(abs(fpr - far), range(len(fpr))))
        out[far] = float(tpr[i])
    return out


def reference_strict(scores, labels, fars):
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {far: float(tpr[fpr <= far].max()) for far in fars}


def random_case(rng, n_neg, n_pos, kind, dtype):
    if kind == "continuous":
        neg, pos = rng.normal(0, 1, n_neg), rng.normal(2.5, 1, n_pos)
    elif kind == "ties":  # few distinct values: long runs of equal scores in both classes
        levels = rng.integers(3, 40)
        neg, pos = rng.integers(0, levels, n_neg), rng.integers(levels // 3, levels, n_pos)
    elif kind == "separated":  # every genuine above every impostor: flat ROC tail, drop_intermediate drops it
        neg, pos = rng.normal(0, 1, n_neg), rng.normal(10, 1, n_pos)
    else:  # "rounded": continuous but quantised, mixing ties with distinct values
        neg, pos = np.round(rng.normal(0, 1, n_neg), 2), np.round(rng.normal(1.5, 1, n_pos), 2)
    scores = np.concatenate([neg, pos]).astype(dtype)
    labels = np.r_[np.zeros(n_neg, int), np.ones(n_pos, int)]
    perm = rng.permutation(scores.size)
    return scores[perm], labels[perm]


@pytest.mark.parametrize("kind", ["continuous", "ties", "separated", "rounded"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tar_at_far_identical_to_sklearn_procedure(kind, dtype):
    rng = np.random.default_rng([["continuous", "ties", "separated", "rounded"].index(kind), np.dtype(dtype).itemsize])
    for trial in range(25):
        n_neg = int(rng.choice([1, 2, 3, 7, 50, 999, 1000, 20000]))
        n_pos = int(rng.choice([1, 2, 5, 100, 3000]))
        scores, labels = random_case(rng, n_neg, n_pos, kind, dtype)
        # targets on exact grid points and half-way between them, to hit distance ties
        fars = FARS + (1 / n_neg, min(2.5 / n_neg, 1.0), 0.5, 1.0, 0.0)
        got = tar_at_far(scores, labels, fars)
        assert got == reference_nearest(scores, labels, fars), (kind, dtype, n_neg, n_pos, trial)
        got = tar_at_far(scores, labels.astype(bool), fars, convention="strict")
        assert got == reference_strict(scores, labels, fars), (kind, dtype, n_neg, n_pos, trial)


def test_tar_at_far_large_scale_matches_sklearn():
    rng = np.random.default_rng(7)
    scores, labels = random_case(rng, 2_000_000, 5000, "continuous", np.float32)
    scores[:1000] = scores[1000]  # a block of ties in the middle
    assert tar_at_far(scores, labels) == reference_nearest(scores, labels, FARS)


def test_tar_at_far_ties_pick_largest_tpr():
    # ROC points (after drop_intermediate): (0,0), (0,.5), (.5,.5), (.5,1), (1,1); target 0.5 sits on a vertical
    # segment, target .25 half-way between fpr 0 and 0.5: the published rule takes the upper point both times.
    scores, labels = np.array([0.8, 0.4, 0.35, 0.1]), np.array([1, 0, 1, 0])
    assert tar_at_far(scores, labels, (0.5, 0.25, 0.2)) == {0.5: 1.0, 0.25: 1.0, 0.2: 0.5}
    assert tar_at_far(scores, labels, (0.5, 0.25), convention="strict") == {0.5: 1.0, 0.25: 0.5}


@pytest.mark.parametrize(
    "scores, labels, match",
    [
        ([0.1, 0.2], [1, 1], "both genuine"),
        ([0.1, 0.2], [0, 0], "both genuine"),
        ([0.1, 0.2, 0.3], [0, 1, 2], "index 2"),
        ([0.1, np.nan, 0.3], [0, 1, 1], "index 1"),
        ([0.1, 0.2], [0, 1, 1], "equal length"),
    ],
)
def test_tar_at_far_bad_input(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        tar_at_far(scores, labels)


def test_tar_at_far_convention_checked():
    with pytest.raises(ValueError, match="convention"):
        tar_at_far([0.1, 0.2], [0, 1], convention="interpolate")


def test_roc_points_equal_sklearn_and_thin_out():
    rng = np.random.default_rng(3)
    scores, labels = random_case(rng, 30000, 2000, "rounded", np.float32)
    fpr, tpr, thr = roc_points(scores, labels, max_points=None)
    rf, rt, rth = roc_curve(labels, scores)
    np.testing.assert_array_equal(fpr, rf)
    np.testing.assert_array_equal(tpr, rt)
    np.testing.assert_array_equal(thr, rth)
    f2, t2, _ = roc_points(scores, labels, max_points=100)
    assert len(f2) <= 102 and f2[0] == 0 and f2[-1] == 1 and t2[-1] == 1
    assert np.all(np.diff(f2) >= 0) and np.all(np.isin(f2, rf))


# ------------------------------------------------------------------ IJB templates and pair scores
from magface.evaluation import UnknownTemplateError, aggregate_templates, score_pairs  # noqa: E402


def loop_templates(feats, mags, templates, medias, mode):
    """The scripts' image2template_feature as loops (float64): insightface sums media, MagFace averages."""
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    x = unit * mags[:, None]
    out = []
    for t in np.unique(templates):
        rows = np.where(templates == t)[0]
        media = np.array([x[rows][medias[rows] == m].mean(0) for m in np.unique(medias[rows])])
        if mode == "magface":
            media /= np.linalg.norm(media, axis=1, keepdims=True)
        tf = media.sum(0) if mode == "insightface" else media.mean(0)
        out.append(tf / np.linalg.norm(tf))
    return np.unique(templates), np.array(out)


@pytest.mark.parametrize("mode", ["insightface", "magface", "magface_plus"])
def test_aggregate_templates_and_scores_match_reference_loops(mode):
    rng = np.random.default_rng(11)
    n_img, n_tpl = 3000, 300
    tids = 1000 + 7 * np.r_[np.arange(n_tpl), rng.integers(0, n_tpl, n_img - n_tpl)]
    mids = rng.integers(0, 4, n_img) + 10 * (tids % 5)  # media ids shared across templates, as in IJB files
    feats = rng.normal(size=(n_img, 16)).astype(np.float32)
    mags = rng.uniform(10, 40, n_img).astype(np.float32)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    ids, tf = aggregate_templates(unit, mags, tids, mids,
                                  mode=mode, chunk_rows=257)  # chunking must not split a media
    r_ids, r_tf = loop_templates(feats.astype(np.float64), mags.astype(np.float64), tids, mids, mode)
    np.testing.assert_array_equal(ids, r_ids)
    np.testing.assert_allclose(tf, r_tf, atol=2e-6)
    if mode == "magface":  # raw features without magnitudes give the same thing
        np.testing.assert_allclose(aggregate_templates(unit * mags[:, None], None, tids, mids, mode=mode)[1], tf,
                                   atol=2e-6)
    # dense stripes (many pairs per block) and sparse ones (few) both score exactly the row dot product
    p1 = rng.choice(ids, 60000)
    p2 = rng.choice(ids, 60000)
    p1[:5], p2[:5] = ids[-1], ids[-1]
    for block in (64, 100000):
        s = score_pairs(tf, ids, p1, p2, block=block)
        ref = np.sum(r_tf[np.searchsorted(r_ids, p1)] * r_tf[np.searchsorted(r_ids, p2)], axis=1)
        np.testing.assert_allclose(s, ref, atol=3e-6)
    sparse = score_pairs(tf, {int(t): i for i, t in enumerate(ids)}, np.stack([p1[:50], p2[:50]], 1), block=64)
    np.testing.assert_allclose(sparse, s[:50], atol=1e-6)


def test_score_pairs_unknown_template_names_the_pair():
    ids = np.array([3, 5, 9])
    tf = np.eye(3, dtype=np.float32)
    with pytest.raises(UnknownTemplateError, match="pair 2 \\(p2\\) names template 4"):
        score_pairs(tf, ids, [3, 5, 9, 3], [5, 9, 4, 4])
    with pytest.raises(ValueError, match="mode"):
        aggregate_templates(tf, None, ids, ids, mode="mean")
