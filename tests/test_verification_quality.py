"""10-fold verification accuracy vs insightface's loop (sklearn KFold), ERC vs MagFace's script logic."""

import math

import numpy as np
import pytest
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from magface.evaluation import error_versus_reject, verification_accuracy


def insightface_accuracy(e1, e2, issame, n_folds=10):
    """insightface's calculate_roc/calculate_accuracy, written as its loops."""
    thresholds = np.arange(0, 4, 0.01)
    dist = np.sum(np.square(normalize(e1) - normalize(e2)), 1)
    acc, best = [], []
    for train, test in KFold(n_splits=n_folds, shuffle=False).split(np.arange(len(issame))):
        def accuracy(t, idx):
            pred = np.less(dist[idx], t)
            tp = np.sum(pred & issame[idx])
            tn = np.sum(~pred & ~issame[idx])
            return float(tp + tn) / dist[idx].size

        train_acc = [accuracy(t, train) for t in thresholds]
        i = int(np.argmax(train_acc))
        best.append(thresholds[i])
        acc.append(accuracy(thresholds[i], test))
    return np.mean(acc), np.std(acc), np.array(best), np.array(acc)


@pytest.mark.parametrize("n_pairs, dtype", [(600, np.float32), (1003, np.float64), (57, np.float32)])
def test_verification_accuracy_matches_insightface(n_pairs, dtype):
    rng = np.random.default_rng(n_pairs)
    issame = rng.random(n_pairs) < 0.5
    e1 = rng.normal(size=(n_pairs, 64))
    noise = rng.normal(size=(n_pairs, 64)) * np.where(issame, 3.0, 1.0)[:, None]
    e2 = np.where(issame[:, None], e1 + noise, rng.normal(size=(n_pairs, 64)))
    e1, e2 = e1.astype(dtype), e2.astype(dtype)
    mean, std, details = verification_accuracy(e1, e2, issame)
    r_mean, r_std, r_best, r_acc = insightface_accuracy(e1, e2, issame)
    assert (mean, std) == (r_mean, r_std)
    np.testing.assert_array_equal(details["best_threshold"], r_best)
    np.testing.assert_array_equal(details["fold_accuracy"], r_acc)
    assert 0.6 < mean < 1.0  # a learnable problem, not a degenerate one


def test_verification_accuracy_bad_shapes():
    with pytest.raises(ValueError, match="embeddings"):
        verification_accuracy(np.zeros((10, 4)), np.zeros((9, 4)), np.zeros(10, bool))


def magface_erc(scores, labels, pair_q, fractions):
    """MagFace's eval_quality.py loop: arccos distances, sorted lists, idx //= 10 down to FMR 1e-3."""
    dist = np.arccos(np.clip(scores.astype(np.float64), -1, 1)) / math.pi
    order = np.argsort(pair_q, kind="stable")
    out = []
    for r in fractions:
        keep = order[int(r * len(scores)):]
        pos = np.sort(dist[keep][labels[keep] == 1])
        neg = np.sort(dist[keep][labels[keep] == 0])
        idx, fmr = len(neg) - 1, 1.0
        while True:
            if abs(fmr - 1e-3) < 1e-12:
                out.append((len(pos) - np.sum(pos < neg[idx])) / len(pos))
                break
            idx, fmr = int(idx / 10), fmr / 10
    return np.array(out)


def erc_case(seed, n=40000):
    rng = np.random.default_rng(seed)
    q1, q2 = rng.random(n), rng.random(n)
    labels = (rng.random(n) < 0.3).astype(int)
    pq = np.minimum(q1, q2)
    # low quality pairs: genuine scores drop toward impostors
    scores = np.where(labels == 1, 0.2 + 0.6 * pq, 0.0) + rng.normal(0, 0.12, n)
    return np.clip(scores, -1, 1).astype(np.float32), labels, q1, q2


def test_erc_recompute_matches_magface_script():
    scores, labels, q1, q2 = erc_case(0)
    fractions = np.arange(0, 0.96, 0.05)
    erc = error_versus_reject(scores, labels, q1, q2)
    ref = magface_erc(scores, labels, np.minimum(q1, q2), fractions)
    np.testing.assert_array_equal(erc["fractions"], fractions)
    np.testing.assert_allclose(erc["fnmr"], ref, rtol=0, atol=0)
    assert erc["auc"] == pytest.approx(np.sum((ref[1:] + ref[:-1]) / 2 * np.diff(fractions)), rel=1e-12)
    assert erc["fnmr"][-1] < erc["fnmr"][0] / 2  # rejecting low quality helps, as constructed
    # pair quality given directly gives the same curve
    np.testing.assert_array_equal(error_versus_reject(scores, labels, np.minimum(q1, q2))["fnmr"], erc["fnmr"])


def test_erc_fixed_threshold_is_one_threshold():
    scores, labels, q1, q2 = erc_case(1)
    erc = error_versus_reject(scores, labels, q1, q2, threshold="fixed", reject_fractions=[0, 0.5, 0.9])
    neg = np.sort(scores[labels == 0])[::-1]
    t = neg[int(math.floor((neg.size - 1) * 1e-3))]
    order = np.argsort(np.minimum(q1, q2), kind="stable")
    for r, f in zip([0, 0.5, 0.9], erc["fnmr"]):
        keep = order[int(r * scores.size):]
        g = scores[keep][labels[keep] == 1]
        assert f == np.count_nonzero(g <= t) / g.size
    assert np.all(erc["thresholds"] == t)
    # at 0 rejection both modes agree
    assert erc["fnmr"][0] == error_versus_reject(scores, labels, q1, q2, reject_fractions=[0])["fnmr"][0]


def test_erc_errors():
    scores, labels, q1, q2 = erc_case(2, n=200)
    with pytest.raises(ValueError, match="leaves"):
        error_versus_reject(scores, labels, q1, q2, reject_fractions=[0.999])
    with pytest.raises(ValueError, match="threshold"):
        error_versus_reject(scores, labels, q1, q2, threshold="iso")
    with pytest.raises(ValueError, match="quality"):
        error_versus_reject(scores, labels, q1[:-1])
