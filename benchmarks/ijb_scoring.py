"""IJB-C-scale template aggregation + pair scoring + TAR@FAR: the library against the reference scripts' procedures.

Synthetic features at IJB-C's size (469,375 images, 23,124 templates of 3,531 subjects, 15,658,489 pairs of
which 19,557 genuine, 512-d), for the two default conventions (docs/conventions.md):
- `insightface`: an independent implementation, written here, of arcface_torch `eval_ijbc.py` with its
  defaults (image feature F1 + F2 with its norm, times the faceness score; `image2template_feature`'s loop with
  np.where per template and per media, a one-image media taken as is, else the mean; template = sum of media,
  sklearn-normalised; `verification()` in batches of 100k pairs through a dense template-id table,
  np.sum(f1 * f2, -1) in float64; sklearn `roc_curve`, flipped, `min(zip(|fpr - far|, index))`).
- `magface_plus`: MagFace `eval_ijb.py` with qlt=1 (media mean, template mean, no normalisation in between),
  the same loop structure.
Library: `aggregate_templates`, `score_pairs`, `tar_at_far` (labels converted to bool once, as
`ijb_verification` does). TARs must be identical; the speed ratio is printed last.

    python benchmarks/ijb_scoring.py                 # full IJB-C scale (needs ~5 GB RAM)
    python benchmarks/ijb_scoring.py --scale 0.1     # 10% of images, templates and pairs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve
from sklearn.preprocessing import normalize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magface.evaluation import aggregate_templates, score_pairs, tar_at_far  # noqa: E402

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IJBC = {"images": 469_375, "templates": 23_124, "subjects": 3_531, "pairs": 15_658_489, "genuine": 19_557}


def synthesize(n_img, n_tpl, n_sub, n_pairs, n_gen, dim, seed):
    """Unit features + magnitudes with a quality that degrades identity (so MagFace+ matters), IJB ids, pairs."""
    rng = np.random.default_rng(seed)
    subj_of_tpl = np.r_[np.arange(n_sub), rng.integers(0, n_sub, n_tpl - n_sub)]
    tids = np.r_[np.arange(n_tpl), rng.integers(0, n_tpl, n_img - n_tpl)]  # every template has an image
    rng.shuffle(tids)
    media_per_tpl = 1 + rng.poisson(4, n_tpl)
    mids = tids * 64 + rng.integers(0, media_per_tpl[tids])
    centres = rng.standard_normal((n_sub, dim), dtype=np.float32)
    tpl_noise = rng.uniform(0.8, 2.0, n_tpl).astype(np.float32)  # some templates are just hard
    q = rng.uniform(0, 1, n_img).astype(np.float32)
    feats = np.empty((n_img, dim), dtype=np.float32)
    tpl_offset = rng.standard_normal((n_tpl, dim), dtype=np.float32) * tpl_noise[:, None]
    for s in range(0, n_img, 65536):
        e = min(s + 65536, n_img)
        x = centres[subj_of_tpl[tids[s:e]]] + tpl_offset[tids[s:e]]
        x += rng.standard_normal((e - s, dim), dtype=np.float32) * (0.5 + 4.0 * (1 - q[s:e]))[:, None]
        feats[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    mags = (10 + 30 * q + rng.normal(0, 2, n_img)).astype(np.float32)
    faceness = np.clip(0.5 + 0.5 * q + rng.normal(0, 0.1, n_img), 0.01, 1.0).astype(np.float32)

    tpl_by_subj = np.argsort(subj_of_tpl, kind="stable")
    start = np.searchsorted(subj_of_tpl[tpl_by_subj], np.arange(n_sub + 1))
    multi = np.flatnonzero(np.diff(start) >= 2)
    g_sub = rng.choice(multi, n_gen)
    size = start[g_sub + 1] - start[g_sub]
    a = rng.integers(0, size)
    b = (a + rng.integers(1, size)) % size
    g1, g2 = tpl_by_subj[start[g_sub] + a], tpl_by_subj[start[g_sub] + b]
    i1 = rng.integers(0, n_tpl, n_pairs - n_gen)
    i2 = rng.integers(0, n_tpl, n_pairs - n_gen)
    same = subj_of_tpl[i1] == subj_of_tpl[i2]
    i2[same] = (i2[same] + 1) % n_tpl
    while np.any(same := subj_of_tpl[i1] == subj_of_tpl[i2]):
        i2[same] = (i2[same] + 1) % n_tpl
    p1, p2 = np.r_[g1, i1], np.r_[g2, i2]
    labels = np.r_[np.ones(n_gen, np.int64), np.zeros(n_pairs - n_gen, np.int64)]
    perm = rng.permutation(n_pairs)
    tid_names = 1 + 3 * np.arange(n_tpl)  # template ids are not row numbers in real protocol files
    return feats, mags, faceness, tid_names[tids], mids, tid_names[p1[perm]], tid_names[p2[perm]], labels[perm]


# ------------------------------------------------------------------ the reference scripts' procedures
def insightface_templates(img_feats, templates, medias):
    """eval_ijbc.py's image2template_feature: media = the image or the mean, template = sum, sklearn normalize."""
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        media_feats = []
        for u, ct in zip(*np.unique(face_medias, return_counts=True)):
            (ind_m,) = np.where(face_medias == u)
            media_feats.append(face_feats[ind_m] if ct == 1 else np.mean(face_feats[ind_m], 0, keepdims=True))
        template_feats[count] = np.sum(np.array(media_feats), 0)
    return normalize(template_feats), unique_templates


def magface_plus_templates(img_feats, templates, medias):
    """MagFace eval_ijb.py, qlt=1: media means, template mean, never normalised in between (unit at the end:
    their cosine similarity normalises)."""
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]), dtype=np.float32)
    for count, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        media_feats = [np.mean(face_feats[np.where(face_medias == u)[0]], 0) for u in np.unique(face_medias)]
        template_feats[count] = np.mean(np.array(media_feats), 0)
    template_feats /= np.sqrt(np.sum(template_feats**2, -1, keepdims=True))
    return template_feats, unique_templates


def reference_scores(template_feats, unique_templates, p1, p2, batchsize=100_000):
    """The scripts' verification(): batches of 100k pairs, a dense template-id table, gathered rows."""
    template2id = np.zeros(max(unique_templates) + 1, dtype=int)
    for count, uqt in enumerate(unique_templates):
        template2id[uqt] = count
    score = np.zeros(len(p1))
    for s in range(0, len(p1), batchsize):
        feat1 = template_feats[template2id[p1[s : s + batchsize]]]
        feat2 = template_feats[template2id[p2[s : s + batchsize]]]
        score[s : s + batchsize] = np.sum(feat1 * feat2, -1)
    return score


def reference_tar(labels, scores):
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return {far: float(tpr[min(zip(abs(fpr - far), range(len(fpr))))[1]]) for far in FARS}


def library(feats, mags, faceness, tids, mids, p1, p2, labels, mode):
    genuine = labels == 1  # once, as ijb_verification does
    t_ids, t_feats = aggregate_templates(feats, mags, tids, mids, mode=mode,
                                         weights=faceness if mode == "insightface" else None)
    scores = score_pairs(t_feats, t_ids, p1, p2)
    return t_feats, scores, tar_at_far(scores, genuine, FARS)


LOAD_AT_START = None
CPU_S = {"fast": 0.0, "reference": 0.0}  # process CPU seconds (all threads): less sensitive to a shared machine


def timed(fn, *args, who, **kw):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    CPU_S[who] += time.process_time() - c0
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C's images, templates, subjects, pairs")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ijb_scoring.json"))
    args = ap.parse_args()
    n = {k: max(2, int(round(v * args.scale))) for k, v in IJBC.items()}

    global LOAD_AT_START
    LOAD_AT_START = os.getloadavg()[0]
    t0 = time.perf_counter()
    feats, mags, faceness, tids, mids, p1, p2, labels = synthesize(
        n["images"], n["templates"], n["subjects"], n["pairs"], n["genuine"], args.dim, args.seed
    )
    print(f"synthetic data {n} in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = {}
    for mode in ("insightface", "magface_plus"):
        (t_feats, fast_scores, fast_tar), ft = timed(library, feats, mags, faceness, tids, mids, p1, p2, labels,
                                                     mode, who="fast")
        # the scripts' input: raw image features (F1 + F2 for insightface), times faceness for insightface
        img = feats * (mags * faceness if mode == "insightface" else mags)[:, None]
        ref_templates = insightface_templates if mode == "insightface" else magface_plus_templates
        (r_feats, r_ids), ra = timed(ref_templates, img, tids, mids, who="reference")
        del img
        ref_scores, rs = timed(reference_scores, r_feats, r_ids, p1, p2, who="reference")
        ref_tar, rt = timed(reference_tar, labels, ref_scores, who="reference")
        rows[mode] = {
            "fast_s": {"total": ft},
            "reference_s": {"aggregate": ra, "score": rs, "roc_tar": rt, "total": ra + rs + rt},
            "tar_fast": {str(k): v for k, v in fast_tar.items()},
            "tar_reference": {str(k): v for k, v in ref_tar.items()},
            "tar_identical": fast_tar == ref_tar,
            # the exactness claim proper: the library's TAR@FAR on the reference's own scores
            "tar_at_far_on_reference_scores_identical": tar_at_far(ref_scores, labels, FARS) == ref_tar,
            "max_abs_score_diff": float(np.max(np.abs(fast_scores - ref_scores))),
            "max_abs_template_diff": float(np.max(np.abs(t_feats - r_feats))),
        }
        r = rows[mode]
        print(f"{mode:13s} library {ft:7.2f}s  reference {r['reference_s']['total']:7.2f}s (agg {ra:.2f}, "
              f"score {rs:.2f}, roc+tar {rt:.2f})  ratio {r['reference_s']['total'] / ft:.1f}x  "
              f"TARs identical: {r['tar_identical']}  max|score diff| {r['max_abs_score_diff']:.2e}", flush=True)
        print("   TAR@FAR " + "  ".join(f"{far:g}: {fast_tar[far]:.4f}" for far in FARS), flush=True)
        del fast_scores, ref_scores

    fast_total = sum(r["fast_s"]["total"] for r in rows.values())
    ref_total = sum(r["reference_s"]["total"] for r in rows.values())
    result = {
        "sizes": n,
        "dim": args.dim,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at end",
        "load_average_at_start": LOAD_AT_START,
        "modes": rows,
        "fast_total_s": fast_total,
        "reference_total_s": ref_total,
        "ratio": ref_total / fast_total,
        "cpu_s": dict(CPU_S),
        "cpu_ratio": CPU_S["reference"] / CPU_S["fast"],
        "all_tars_identical": all(r["tar_identical"] for r in rows.values()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"TARs identical in every mode: {result['all_tars_identical']}; JSON in {out}")
    print(f"CPU seconds: reference {CPU_S['reference']:.1f}, library {CPU_S['fast']:.1f} "
          f"(ratio {result['cpu_ratio']:.1f}x; wall clock is what the line below compares)")
    print(f"speed-up (reference procedures / library, aggregation + scoring + TAR@FAR, both conventions): "
          f"{result['ratio']:.1f}x")


if __name__ == "__main__":
    main()
