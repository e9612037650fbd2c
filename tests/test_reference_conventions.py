"""Each named evaluation convention equals an independent re-implementation of its reference script on the
same image features: templates, scores and TAR at every FAR 1e-6..1e-1 under both tie conventions.

References, written from the scripts' published behaviour (docs/conventions.md):
- insightface `recognition/arcface_torch/eval_ijbc.py`: F1 (+ F2 with flip), unit only without norm score,
  times faceness with detector score; a media with one image is that image, else the float32 mean; the
  template is the sum of its media, sklearn-normalised; pairs scored in batches of 100k through a dense
  template-id table; TAR from sklearn roc_curve, flipped, nearest FPR by Python's min over (|d|, index).
- MagFace `eval/eval_recognition/eval_ijb.py`: raw F1, float32 media means, torch F.normalize (qlt=0 only),
  torch mean over media; score 1 - acos(cos)/pi with CosineSimilarity(eps=0); TAR as above.
- insightface `eval/verification.py`: normalise(F1 + F2), squared L2, 10 folds.
- EDC (ISO/IEC 29794-1, Schlett et al.): genuine comparisons sorted by pair quality, runs of equal quality
  discarded together, threshold from all impostors, stepwise pAUC.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_curve
from sklearn.preprocessing import normalize

from magface.evaluation.ijb import Convention, IJBProtocol, ijb_verification
from magface.evaluation.templates import aggregate_templates

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


# ------------------------------------------------------------------------------------------ the references
def ref_tars(labels, scores):
    """{"nearest": ..., "strict": ...} TAR per FAR: the published pick (tests/test_metrics.py's reference), and
    the best point with FPR <= FAR."""
    from tests.test_metrics import reference_nearest

    nearest = reference_nearest(scores, labels, FARS)
    fa, ta, _ = roc_curve(labels, scores, drop_intermediate=False)
    strict = {far: float(ta[fa <= far].max()) for far in FARS}
    return {"nearest": nearest, "strict": strict}


def ref_dense_scores(tfeat, utids, p1, p2, score_fn):
    t2id = np.zeros(max(utids) + 1, dtype=int)
    for i, t in enumerate(utids):
        t2id[t] = i
    out = np.zeros(len(p1))
    idx = np.arange(len(p1))
    for s in [idx[i:i + 100000] for i in range(0, len(p1), 100000)]:
        out[s] = score_fn(tfeat[t2id[p1[s]]], tfeat[t2id[p2[s]]])
    return out


def ref_insightface(f1, f2, faceness, templates, medias, p1, p2, norm_score, detector_score, flip):
    x = f1 + f2 if flip else f1
    if not norm_score:
        x = x / np.sqrt(np.sum(x ** 2, -1, keepdims=True))
    if detector_score:
        x = x * faceness[:, np.newaxis]
    utids = np.unique(templates)
    tfeat = np.zeros((len(utids), x.shape[1]))
    for k, t in enumerate(utids):
        rows = np.where(templates == t)[0]
        fx, fm = x[rows], medias[rows]
        media = []
        for m, count in zip(*np.unique(fm, return_counts=True)):
            sel = np.where(fm == m)[0]
            media.append(fx[sel] if count == 1 else np.mean(fx[sel], axis=0, keepdims=True))
        tfeat[k] = np.sum(np.array(media), axis=0)
    tfeat = normalize(tfeat)
    return utids, tfeat, ref_dense_scores(tfeat, utids, p1, p2, lambda a, b: np.sum(a * b, -1))


def ref_magface(f1, templates, medias, p1, p2, qlt):
    utids = np.unique(templates)
    tfeat = torch.zeros((len(utids), f1.shape[1]))
    for k, t in enumerate(utids):
        rows = np.where(templates == t)[0]
        fx, fm = f1[rows], medias[rows]
        media = torch.tensor(np.array([np.mean(fx[np.where(fm == m)[0]], 0) for m in np.unique(fm)]))
        if qlt != 1:
            media = F.normalize(media)
        tfeat[k] = torch.mean(media, 0)

    def score(a, b):
        cos = torch.clamp(torch.nn.CosineSimilarity(dim=1, eps=0)(a, b), -1, 1)
        return 1 - (torch.acos(cos) / math.pi).numpy()

    return utids, tfeat.numpy(), ref_dense_scores(tfeat, utids, p1, p2, score)


# ------------------------------------------------------------------------------------------ the data
@pytest.fixture(scope="module")
def ijb_case():
    """2,000 images in 400 templates of 100 subjects, 20,000 pairs (a fifth genuine), media of 1-4 images;
    raw features F1, F2 (the mirrored image's) of varying norms, faceness in (0.05, 1)."""
    rng = np.random.default_rng(7)
    n_sub, tpl_per_sub, n_img, d = 100, 4, 2000, 64
    centre = rng.normal(size=(n_sub, d))
    templates = 10 + 3 * np.r_[np.arange(n_sub * tpl_per_sub), rng.integers(0, n_sub * tpl_per_sub, n_img - 400)]
    subject = ((templates - 10) // 3) // tpl_per_sub
    medias = 5000 + rng.integers(0, 3, n_img) + 7 * ((templates - 10) // 3)
    noise = rng.normal(size=(n_img, d)) * rng.uniform(0.5, 3.0, (n_img, 1))
    f1 = ((centre[subject] + noise) * rng.uniform(5, 40, (n_img, 1))).astype(np.float32)
    f2 = (f1 + rng.normal(size=(n_img, d)).astype(np.float32) * 4).astype(np.float32)
    faceness = rng.uniform(0.05, 1.0, n_img).astype(np.float32)
    uniq = np.unique(templates)
    t_subject = ((uniq - 10) // 3) // tpl_per_sub
    a = rng.choice(uniq, 20000)
    b = rng.choice(uniq, 20000)
    same = rng.random(20000) < 0.2  # make a fifth genuine: a partner template of the same subject
    for i in np.flatnonzero(same):
        cands = uniq[t_subject == ((a[i] - 10) // 3) // tpl_per_sub]
        b[i] = cands[rng.integers(0, cands.size)]
    labels = (((a - 10) // 3) // tpl_per_sub == ((b - 10) // 3) // tpl_per_sub).astype(np.int8)
    proto = IJBProtocol(name="case", set_dir=None, images=[f"{i}.jpg" for i in range(n_img)],
                        template_ids=templates.astype(np.int64), media_ids=medias.astype(np.int64),
                        landmarks=np.zeros((n_img, 5, 2), np.float32), faceness=faceness,
                        pairs=np.stack([a, b], 1).astype(np.int64), labels=labels)

    def unit_and_norm(raw):  # what the embedding actors hand over: unit rows (torch) and float32 norms
        t = torch.from_numpy(raw)
        return F.normalize(t, dim=1).numpy(), t.norm(dim=1).numpy()

    u1, m1 = unit_and_norm(f1)
    u12, m12 = unit_and_norm(f1 + f2)
    return {"proto": proto, "f1": f1, "f2": f2, "u1": u1, "m1": m1, "u12": u12, "m12": m12}


SWITCHES = [(n, d, f) for n in (True, False) for d in (True, False) for f in (True, False)]


@pytest.mark.parametrize("norm_score,detector_score,flip", SWITCHES)
def test_insightface_convention_equals_eval_ijbc(ijb_case, norm_score, detector_score, flip):
    c, p = ijb_case, ijb_case["proto"]
    conv = Convention("insightface", norm_score, detector_score, flip)
    res = ijb_verification(p, c["u1"], c["m1"], flip_features=c["u12"], flip_magnitudes=c["m12"],
                           conventions=[conv])
    utids, rt, rs = ref_insightface(c["f1"], c["f2"], p.faceness, p.template_ids, p.media_ids, p.pairs[:, 0],
                                    p.pairs[:, 1], norm_score, detector_score, flip)
    # templates through the library function, with what ijb_verification feeds it
    f, m = (c["u12"], c["m12"]) if flip else (c["u1"], c["m1"])
    ids, tf = aggregate_templates(f, m if norm_score else None, p.template_ids, p.media_ids, mode="insightface",
                                  weights=p.faceness if detector_score else None)
    np.testing.assert_array_equal(ids, utids)
    np.testing.assert_allclose(tf, rt, atol=1e-6)
    scores = res["scores"][conv.name]
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, rs, atol=2e-6)
    assert res["tar_at_far"][conv.name] == ref_tars(p.labels, rs)
    assert conv.name == ("insightface" if (norm_score and detector_score and flip)
                         else f"insightface_N{int(norm_score)}D{int(detector_score)}F{int(flip)}")


@pytest.mark.parametrize("rule,qlt", [("magface", 0), ("magface_plus", 1)])
def test_magface_conventions_equal_eval_ijb(ijb_case, rule, qlt):
    c, p = ijb_case, ijb_case["proto"]
    res = ijb_verification(p, c["u1"], c["m1"], conventions=[rule])  # no flip features needed
    utids, rt, rs = ref_magface(c["f1"], p.template_ids, p.media_ids, p.pairs[:, 0], p.pairs[:, 1], qlt)
    ids, tf = aggregate_templates(c["u1"], c["m1"], p.template_ids, p.media_ids, mode=rule)
    np.testing.assert_array_equal(ids, utids)
    np.testing.assert_allclose(tf, rt / np.linalg.norm(rt, axis=1, keepdims=True), atol=3e-7)
    # their score is 1 - acos(cos)/pi, the same ranking as the cosine we report (compared as cosines: float32
    # acos is coarse near cos = 1, where self-pairs sit)
    np.testing.assert_allclose(res["scores"][rule], np.cos(np.pi * (1 - rs)), atol=2e-6)
    assert res["tar_at_far"][rule] == ref_tars(p.labels, rs)


def test_conventions_differ_and_flip_needs_mirrored_features(ijb_case):
    c, p = ijb_case, ijb_case["proto"]
    res = ijb_verification(p, c["u1"], c["m1"], flip_features=c["u12"], flip_magnitudes=c["m12"],
                           conventions=["insightface", "magface", "magface_plus"])
    s = res["scores"]
    assert not np.allclose(s["insightface"], s["magface_plus"], atol=1e-4)
    assert not np.allclose(s["magface"], s["magface_plus"], atol=1e-4)
    with pytest.raises(ValueError, match="flip needs the mirrored images' features"):
        ijb_verification(p, c["u1"], c["m1"], conventions=["insightface"])
    with pytest.raises(ValueError, match="unknown IJB convention 'plain'"):
        Convention("plain")


# ------------------------------------------------------------------------------------------ .bin with flip
def test_bin_verification_uses_the_mirrored_image_as_insightface(ijb_case):
    from magface.evaluation.features import Extracted
    from magface.evaluation.runner import _verification_task
    from magface.evaluation.verification import verification_accuracy

    c = ijb_case
    n = 1200  # 600 pairs: consecutive images, genuine when the same subject
    issame = (c["proto"].template_ids[0:n:2] - 10) // 3 // 4 == (c["proto"].template_ids[1:n:2] - 10) // 3 // 4
    ext = Extracted(c["u1"][:n], c["m1"][:n], np.ones(n, bool), {}, c["u12"][:n], c["m12"][:n])
    got = _verification_task("toy", ext, issame, flip=True)
    emb = normalize(c["f1"][:n].astype(np.float64) + c["f2"][:n])
    ref_mean, ref_std, _ = verification_accuracy(emb[0::2], emb[1::2], issame)
    assert got["metrics"]["toy.accuracy"] == pytest.approx(ref_mean, abs=1e-12)
    no_flip = _verification_task("toy", ext, issame, flip=False)["metrics"]["toy.accuracy"]
    assert no_flip == pytest.approx(verification_accuracy(c["f1"][:n][0::2], c["f1"][:n][1::2], issame)[0], abs=1e-12)


# ------------------------------------------------------------------------------------------ EDC
def ref_edc(scores, labels, q, fmr):
    imp = np.sort(scores[labels == 0])
    thr = np.quantile(imp, 1 - fmr)
    g = np.flatnonzero(labels == 1)
    g = g[np.argsort(q[g], kind="stable")]
    gq, gs = q[g], scores[g]
    xs, ys = [], []
    n = g.size
    for k in range(n):
        if k == 0 or gq[k] != gq[k - 1]:
            xs.append(k / n)
            ys.append(np.mean(gs[k:] < thr))
    xs.append(1.0)
    ys.append(0.0)
    return np.array(xs), np.array(ys), thr


def ref_pauc(xs, ys, limit):
    area = 0.0
    for i in range(len(xs)):
        if i == len(xs) - 1 or xs[i + 1] >= limit:
            return area + ys[i] * (limit - xs[i])
        area += ys[i] * (xs[i + 1] - xs[i])
    return area


@pytest.mark.parametrize("fmr", [1e-3, 1e-4])
def test_edc_equals_the_iso_procedure(fmr):
    from magface.evaluation.quality import edc_curve, edc_pauc

    rng = np.random.default_rng(5)
    n = 30000
    labels = (rng.random(n) < 0.3).astype(int)
    q1 = np.round(rng.uniform(0, 30, n), 1)  # rounded: many ties, which must leave together
    q2 = np.round(rng.uniform(0, 30, n), 1)
    scores = rng.normal(size=n) + labels * (0.5 + np.minimum(q1, q2) / 10)
    curve = edc_curve(scores, labels, q1, q2, fmr=fmr)
    xs, ys, thr = ref_edc(scores, labels, np.minimum(q1, q2), fmr)
    assert curve["threshold"] == thr
    np.testing.assert_array_equal(curve["discard_fractions"], xs)
    np.testing.assert_allclose(curve["fnmr"], ys, rtol=0, atol=1e-15)
    for limit in (0.2, 0.3):
        assert edc_pauc(curve, limit) == pytest.approx(ref_pauc(xs, ys, limit), abs=1e-12)
    assert edc_pauc(curve, 0.3) > edc_pauc(curve, 0.2) > 0


def test_ijb_edc_ranks_template_pairs_by_mean_image_magnitude(ijb_case):
    from magface.evaluation.features import Extracted
    from magface.evaluation.runner import _ijb_task

    c, p = ijb_case, ijb_case["proto"]
    n = len(p.images)
    ext = Extracted(c["u1"], c["m1"], np.ones(n, bool), {}, c["u12"], c["m12"], np.zeros(n, bool))
    res = _ijb_task("case", p, ext, ["insightface", "magface_plus"])
    tq = {t: float(np.mean(c["m1"][p.template_ids == t])) for t in np.unique(p.template_ids)}
    pq = np.array([min(tq[a], tq[b]) for a, b in p.pairs])
    for conv in ("insightface", "magface_plus"):
        s = ijb_verification(p, c["u1"], c["m1"], flip_features=c["u12"], flip_magnitudes=c["m12"],
                             conventions=[conv])["scores"][conv]
        for fmr in (1e-3, 1e-4):
            xs, ys, _ = ref_edc(s, p.labels, pq, fmr)
            for limit in (0.2, 0.3):
                key = f"case.{conv}.edc_pauc{round(100 * limit)}_fmr_1e{round(np.log10(fmr))}"
                assert res["metrics"][key] == pytest.approx(ref_pauc(xs, ys, limit), abs=1e-9)
    assert res["metrics"]["case.landmarks_outside"] == 0
