"""IJB template features and pair scores, vectorised: the library side of IJB-B/IJB-C 1:1 verification.

Aggregation follows the reference scripts' `image2template_feature` (images -> media -> template; the named
conventions are in `aggregate_templates` and docs/conventions.md), done with one lexsort of the ids and a
scatter-add of each image row into its media (`torch.index_add_`, float32 as the references' np.mean / torch;
`np.add.reduceat` along rows is ~10x slower) instead of a Python loop over templates with
`np.where(templates == t)` (O(templates x images)). The input is read in contiguous chunks, never copied whole;
memory beyond it is one chunk plus the media and template features.

Scoring: gathering two 512-d rows per pair (the reference's way) is memory-bound, ~4 KB of traffic per pair.
IJB-C's 15.7M pairs cover ~6% of the 23k x 23k upper triangle, so a BLAS product of each stripe of templates
with the columns its pairs reach, and a 4-byte pick per pair from it, costs less; sparse stripes (few pairs)
still gather, through reusable buffers. See `benchmarks/ijb_scoring.py` for the measured ratio.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

MODES = ("insightface", "magface", "magface_plus")


class UnknownTemplateError(KeyError):
    """A pair names a template with no images. `pair_index` is 0-based (line = pair_index + 1 in the pair file)."""

    def __init__(self, pair_index: int, template_id: int, column: str):
        self.pair_index, self.template_id, self.column = pair_index, template_id, column
        super().__init__(f"pair {pair_index} ({column}) names template {template_id}, which has no images")

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.args[0]


def _groups(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group number of each element, start of each group) for runs of equal key tuples in sorted key arrays."""
    change = np.zeros(keys[0].size, dtype=bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    return np.cumsum(change) - 1, np.flatnonzero(change)


def _normalise_(x: np.ndarray) -> np.ndarray:
    """Rows of x to unit length, in place (a zero row stays zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    x /= np.maximum(norms, np.finfo(x.dtype).tiny)[:, None]
    return x


def aggregate_templates(
    features,
    magnitudes=None,
    template_ids=None,
    media_ids=None,
    mode: str = "magface_plus",
    weights=None,
    chunk_rows: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Template features for IJB 1:1 verification: (template_ids_sorted, template_features).

    features: (n_images, d). With `magnitudes` each row is scaled to that length (unit features times their
    magnitude = the raw network output); without, rows are used as given. template_ids, media_ids: (n_images,)
    integers from `<name>_face_tid_mid.txt`. weights: optional (n_images,) factors on the image rows
    (insightface's detector score).
    mode (docs/conventions.md):
      - "insightface": arcface_torch's `eval_ijbc.py`: media = mean of its image rows (not normalised),
        template = SUM of its media, normalised at the end. Which rows go in (F1 or F1+F2, with or without
        their norm, times the faceness) is the caller's choice: `magface.evaluation.ijb.ijb_verification`.
      - "magface": MagFace's `eval_ijb.py` with `qlt=0`: media mean -> normalise -> template mean.
      - "magface_plus": `qlt=1` (MagFace+): media mean -> template mean, never normalised in between.
    Returns template ids ascending (np.unique order, as both scripts) and unit rows, one per template (float64
    for "insightface", whose script scores in float64; float32 for the MagFace rules, whose script uses
    float32 torch tensors): a dot product of two rows is the cosine score. Feed both to `score_pairs`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    f = np.asarray(features)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (n_images, d) array, got shape {f.shape}")
    n = f.shape[0]
    tids = np.asarray(template_ids)
    mids = np.asarray(media_ids)
    if tids.shape != (n,) or mids.shape != (n,):
        raise ValueError(f"template_ids and media_ids must have shape ({n},), got {tids.shape} and {mids.shape}")
    mags = None if magnitudes is None else np.asarray(magnitudes, dtype=np.float64).reshape(-1)
    if mags is not None and mags.shape != (n,):
        raise ValueError(f"magnitudes must have shape ({n},), got {mags.shape}")
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w is not None and w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")

    order = np.lexsort((mids, tids))
    st, sm = tids[order], mids[order]
    media_of_sorted, media_starts = _groups(st, sm)
    media_of_row = np.empty(n, dtype=np.int64)
    media_of_row[order] = media_of_sorted
    media_count = np.diff(np.r_[media_starts, n])
    media_sum = torch.zeros((media_starts.size, f.shape[1]), dtype=torch.float32)
    index = torch.from_numpy(media_of_row)
    buf = np.empty((min(chunk_rows, n), f.shape[1]), dtype=np.float32)
    for a in range(0, n, chunk_rows):  # contiguous slices of the input: no gather, no sort of the features
        b = min(a + chunk_rows, n)
        x = np.asarray(f[a:b], dtype=np.float32)
        scale = None  # per-row factor: to the given magnitude, times the weight
        if mags is not None:
            norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
            scale = mags[a:b] / np.maximum(norms, np.finfo(np.float64).tiny)
        if w is not None:
            scale = w[a:b] if scale is None else scale * w[a:b]
        if scale is not None:
            x = np.multiply(x, scale[:, None].astype(np.float32), out=buf[: b - a])
        media_sum.index_add_(0, index[a:b], torch.from_numpy(np.ascontiguousarray(x)))
    media_feats = media_sum.numpy().astype(np.float64)  # the one float64 copy; the rest is in place
    del media_sum
    media_feats /= media_count[:, None]
    if mode == "magface":
        _normalise_(media_feats)
    media_tid = st[media_starts]
    template_of_media, tstarts = _groups(media_tid)
    template_feats = torch.zeros((tstarts.size, f.shape[1]), dtype=torch.float64)
    template_feats = template_feats.index_add_(0, torch.from_numpy(template_of_media),
                                               torch.from_numpy(media_feats)).numpy()
    del media_feats
    if mode != "insightface":  # a mean of media; a sum (insightface) differs by a factor normalising removes
        template_feats /= np.diff(np.r_[tstarts, media_tid.size])[:, None]
    _normalise_(template_feats)
    return media_tid[tstarts], (template_feats if mode == "insightface" else template_feats.astype(np.float32))


def template_rows(index_of_tid, tids, column: str = "p1") -> np.ndarray:
    """Row of each template id in the template features. `index_of_tid`: the ascending template ids from
    `aggregate_templates` (row i is template index_of_tid[i]) or a mapping {template_id: row}.
    Raises UnknownTemplateError naming the first pair whose template has no row."""
    tids = np.asarray(tids).reshape(-1)
    if isinstance(index_of_tid, Mapping):
        keys = np.fromiter(index_of_tid.keys(), dtype=np.int64, count=len(index_of_tid))
        vals = np.fromiter(index_of_tid.values(), dtype=np.int64, count=len(index_of_tid))
        o = np.argsort(keys)
        keys, vals = keys[o], vals[o]
    else:
        keys = np.asarray(index_of_tid).reshape(-1)
        vals = None
        if keys.size > 1 and np.any(keys[1:] <= keys[:-1]):
            raise ValueError("index_of_tid must be strictly ascending template ids (as aggregate_templates returns)")
    if keys.size == 0:
        if tids.size:
            raise UnknownTemplateError(0, int(tids[0]), column)
        return np.zeros(0, dtype=np.int64)
    lo, hi = int(keys[0]), int(keys[-1])
    if lo >= 0 and hi < max(1 << 22, 8 * keys.size):
        # a dense id -> row table (IJB ids are small integers): one gather, ~2x faster than searchsorted
        table = np.full(hi + 2, -1, dtype=np.int64)  # the last slot catches every id outside [0, hi]
        table[keys] = np.arange(keys.size) if vals is None else vals
        rows = table[np.where((tids >= 0) & (tids <= hi), tids, hi + 1)]
        missing = rows < 0
        if missing.any():
            i = int(np.flatnonzero(missing)[0])
            raise UnknownTemplateError(i, int(tids[i]), column)
        return rows
    pos = np.minimum(np.searchsorted(keys, tids), keys.size - 1)
    missing = keys[pos] != tids
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise UnknownTemplateError(i, int(tids[i]), column)
    return pos if vals is None else vals[pos]


def _dot_rows(t: np.ndarray, ra: np.ndarray, rb: np.ndarray, chunk: int) -> np.ndarray:
    """Row-wise dot products t[ra[i]] . t[rb[i]], gathering through two reusable (chunk, d) buffers."""
    out = np.empty(ra.size, dtype=t.dtype)
    buf1 = np.empty((min(chunk, ra.size), t.shape[1]), dtype=t.dtype)
    buf2 = np.empty_like(buf1)
    for s in range(0, ra.size, chunk):
        e = min(s + chunk, ra.size)
        a, b = buf1[: e - s], buf2[: e - s]
        np.take(t, ra[s:e], axis=0, out=a)
        np.take(t, rb[s:e], axis=0, out=b)
        np.einsum("ij,ij->i", a, b, out=out[s:e])
    return out


# Gathering a pair's two rows (2 x d floats from anywhere in the template matrix) costs about as much memory
# traffic as computing this many entries of a dense block product with BLAS (measured on a 2-core VM, d=512):
# a stripe of templates with more pairs than entries/64 is scored by one matrix product instead.
_PAIR_COST_IN_ENTRIES = 64


def score_pairs(template_feats, index_of_tid, p1, p2=None, chunk: int = 8192, block: int = 1024) -> np.ndarray:
    """Cosine score of every pair (p1[i], p2[i]) of template ids, (n_pairs,) in the templates' precision
    (float64 rows give float64 scores, as insightface's script; anything else float32).

    template_feats: unit rows from `aggregate_templates`; index_of_tid: its ascending template ids (or a
    {template_id: row} mapping). p2=None: p1 is an (n_pairs, 2) array of (tid1, tid2). A template id with no
    row raises UnknownTemplateError with the 0-based pair index.

    Pairs are grouped by stripes of `block` template rows (by the smaller row of the pair, the score being
    symmetric). A dense stripe (IJB-C: 15.7M pairs over 23k templates) is one BLAS product of its rows with the
    columns its pairs reach, and its scores are picked from that block; a sparse one gathers the two rows of
    each pair in `chunk`-sized buffers. Memory: the scores, the pair indices and one (block, n_templates) block.

        tids, feats = aggregate_templates(features, magnitudes, template_ids, media_ids, mode="magface_plus")
        scores = score_pairs(feats, tids, p1, p2)
    """
    if p2 is None:
        pairs = np.asarray(p1)
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise ValueError(f"score_pairs: without p2, p1 must be an (n_pairs, 2) array, got shape {pairs.shape}")
        p1, p2 = pairs[:, 0], pairs[:, 1]
    t = np.asarray(template_feats)
    t = t.astype(np.float64 if t.dtype == np.float64 else np.float32, copy=False)
    if t.ndim != 2:
        raise ValueError(f"score_pairs: template_feats must be (n_templates, d), got shape {t.shape} "
                         "(arguments are template_feats, index_of_tid, p1, p2)")
    t = np.ascontiguousarray(t)
    r1 = template_rows(index_of_tid, p1, "p1")
    r2 = template_rows(index_of_tid, p2, "p2")
    if r1.size != r2.size:
        raise ValueError(f"p1 and p2 must have equal length, got {r1.size} and {r2.size}")
    lo, hi = np.minimum(r1, r2), np.maximum(r1, r2)
    del r1, r2
    n_stripes = -(-t.shape[0] // block)
    key = (lo // block).astype(np.uint16 if n_stripes <= 1 << 16 else np.int64)
    out = np.empty(lo.size, dtype=t.dtype)
    for k in range(n_stripes):
        idx = np.flatnonzero(key == k)  # one cheap pass per stripe beats sorting 15M pair indices
        if idx.size == 0:
            continue
        a0, a1 = k * block, min((k + 1) * block, t.shape[0])
        l, h = lo[idx], hi[idx]
        c0, c1 = a0, int(h.max()) + 1  # hi >= lo >= a0
        if idx.size * _PAIR_COST_IN_ENTRIES >= (a1 - a0) * (c1 - c0):
            dense = t[a0:a1] @ t[c0:c1].T
            out[idx] = dense[l - a0, h - c0]
        else:
            out[idx] = _dot_rows(t, l, h, chunk)
    return out
