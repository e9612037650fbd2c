"""Feature extraction as a Ray Data pipeline: load + align (CPU tasks) -> embed (actor pool) -> driver.

The actor pool holds one `Embedder` per actor (one GPU each when the cluster has GPUs, else CPU actors).
Rows carry a global `index`; results arrive in any order and are scattered into preallocated arrays, so the
caller gets features ordered by image index. Images that fail to load are reported, not embedded: with
on_bad_image="raise" the first failure stops the run with its file and line; with "skip" they are counted
and flagged invalid.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Extracted:
    features: np.ndarray  # (N, D) float32 unit features of the image as given (F1)
    magnitudes: np.ndarray  # (N,) float32 |F1|: the quality score
    valid: np.ndarray  # (N,) bool
    failures: dict[int, str] = field(default_factory=dict)  # image index -> message, for skipped images
    # with flip: unit (F1 + F2) and |F1 + F2|, F2 the feature of the mirrored image (insightface's fusion)
    flip_features: np.ndarray | None = None
    flip_magnitudes: np.ndarray | None = None
    landmarks_outside: np.ndarray | None = None  # (N,) bool: aligned from landmarks outside the image

    def slice(self, start: int, stop: int) -> "Extracted":
        """Rows start..stop (one source of a concatenated table), failures re-indexed."""
        fails = {i - start: m for i, m in self.failures.items() if start <= i < stop}

        def cut(a):
            return None if a is None else a[start:stop]

        return Extracted(self.features[start:stop], self.magnitudes[start:stop], self.valid[start:stop], fails,
                         cut(self.flip_features), cut(self.flip_magnitudes), cut(self.landmarks_outside))

    def fused(self, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        """(unit features, magnitudes): F1 + F2 with flip (which must have been extracted), else F1."""
        if not flip:
            return self.features, self.magnitudes
        if self.flip_features is None:
            raise ValueError("flip fusion needs the mirrored images' features: extract with flip=True")
        return self.flip_features, self.flip_magnitudes


def image_table(*, paths=None, data=None, landmarks=None, where=None):
    """A pyarrow table of images to embed. Give `paths` (files) or `data` (encoded bytes); `landmarks`
    (N, 10) aligns with the 5-point transform, else images are used as they are (resized if needed);
    `where` names each image in error messages."""
    import pyarrow as pa

    n = len(paths) if paths is not None else len(data)
    lm = np.full((n, 10), np.nan, np.float32) if landmarks is None else np.asarray(landmarks, np.float32)
    cols = {
        "index": pa.array(np.arange(n, dtype=np.int64)),
        "path": pa.array(list(paths) if paths is not None else [""] * n, pa.string()),
        "data": pa.array(list(data) if data is not None else [b""] * n, pa.binary()),
        "landmarks": pa.FixedSizeListArray.from_arrays(pa.array(lm.reshape(-1)), 10),
        "where": pa.array(list(where) if where is not None else [f"image {i}" for i in range(n)], pa.string()),
    }
    return pa.table(cols)


def concat_tables(tables):
    """One table from several, with `index` renumbered globally; returns (table, offsets)."""
    import pyarrow as pa

    offsets, out, start = [], [], 0
    for t in tables:
        offsets.append(start)
        out.append(t.set_column(0, "index", pa.array(np.arange(start, start + len(t), dtype=np.int64))))
        start += len(t)
    offsets.append(start)
    return pa.concat_tables(out), offsets


def load_batch(batch: dict, size: int) -> dict:
    """Ray Data map_batches UDF: rows of image_table -> index, image (uint8 N x size x size x 3), error."""
    from magface.evaluation.ijb import BadImageError, load_face

    n = len(batch["index"])
    images = np.zeros((n, size, size, 3), np.uint8)
    errors = [""] * n
    outside = np.zeros(n, bool)
    for i in range(n):
        lm = np.asarray(batch["landmarks"][i], np.float32)
        data = batch["data"][i]
        info: dict = {}
        try:
            images[i] = load_face(bytes(data) if len(data) else None, str(batch["path"][i]),
                                  None if np.isnan(lm).all() else lm.reshape(5, 2), size, str(batch["where"][i]),
                                  info)
        except BadImageError as e:
            errors[i] = str(e)
        outside[i] = info.get("landmarks_outside", False)
    return {"index": batch["index"], "image": images, "error": np.array(errors, dtype=object),
            "outside": outside}


class EmbedBatch:
    """Callable class for map_batches: one Embedder per actor, built once from the checkpoint."""

    def __init__(self, checkpoint: str, flip: bool = False, threads: int = 1):
        import torch

        from magface.embedder import Embedder

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        self.embedder = Embedder.from_checkpoint(checkpoint)
        self.flip = flip

    def __call__(self, batch: dict) -> dict:
        import torch

        ok = np.array([not e for e in batch["error"]], bool)
        images = np.asarray(batch["image"])
        n = len(ok)
        out = {k: v for k, v in batch.items() if k != "image"}  # index, error, outside and any id columns
        names = ("feature", "magnitude") + (("flip_feature", "flip_magnitude") if self.flip else ())
        if not ok.any():  # feature width fixed up on the driver
            return {**out, **{k: np.zeros((n, 1) if "feature" in k else n, np.float32) for k in names}}
        x = torch.as_tensor(images[ok])
        f1 = self.embedder.raw_features(x)  # one forward per orientation: F1 for MagFace, F1 + F2 for flip
        parts = [f1] + ([f1 + self.embedder.raw_features(x.flip(2))] if self.flip else [])
        for (kf, km), f in zip((names[:2], names[2:]), parts):
            norm = f.norm(dim=1)
            feats = np.zeros((n, f.shape[1]), np.float32)
            mags = np.zeros(n, np.float32)
            feats[ok] = torch.nn.functional.normalize(f, dim=1).numpy()
            mags[ok] = norm.numpy()
            out[kf], out[km] = feats, mags
        return out


def default_pool(num_gpus: float, num_cpus: float) -> tuple[int, bool]:
    """(pool size, use GPUs): one actor per GPU; else a quarter of the CPUs (loading needs the rest)."""
    if num_gpus >= 1:
        return int(num_gpus), True
    return max(1, int(num_cpus) // 4), False


def input_size(checkpoint: str) -> int:
    """The square input size the checkpoint's backbone expects (the Embedder's rule, without building it)."""
    from magface.checkpoint import load_model_file

    return int(load_model_file(checkpoint)["backbone_kwargs"].get("input_size", 112))


def extract_features(table, checkpoint: str, *, image_size: int, batch_size: int = 128,
                     pool_size: int | None = None, use_gpu: bool | None = None, flip: bool = False,
                     on_bad_image: str = "raise", cpus_per_actor: int = 1) -> Extracted:
    """Embed every row of `table` (see image_table) with an actor pool; features ordered by `index`."""
    import ray

    from magface.evaluation.ijb import BadImageError

    if on_bad_image not in ("raise", "skip"):
        raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(table)
    res = ray.cluster_resources()
    auto_pool, auto_gpu = default_pool(res.get("GPU", 0), res.get("CPU", 1))
    use_gpu = auto_gpu if use_gpu is None else use_gpu
    pool_size = pool_size or auto_pool
    # blocks of a few batches: enough tasks to keep loaders busy, small enough to stream
    rows_per_block = max(batch_size, min(4 * batch_size, math.ceil(n / max(1, 4 * pool_size))))
    blocks = [table.slice(i, rows_per_block) for i in range(0, n, rows_per_block)] or [table]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(load_batch, fn_kwargs={"size": image_size}, batch_size=batch_size,
                        batch_format="numpy", num_cpus=1)
    ds = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"checkpoint": str(checkpoint), "flip": flip,
                                                           "threads": cpus_per_actor},
                        batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=pool_size),
                        num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else cpus_per_actor)
    features = flip_features = None
    magnitudes = np.zeros(n, np.float32)
    flip_magnitudes = np.zeros(n, np.float32) if flip else None
    valid = np.zeros(n, bool)
    outside = np.zeros(n, bool)
    seen = np.zeros(n, bool)
    failures: dict[int, str] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        idx = np.asarray(batch["index"], np.int64)
        err = batch["error"]
        ok = np.array([not e for e in err], bool)
        if not ok.all():
            bad = {int(i): str(e) for i, e in zip(idx, err) if e}
            if on_bad_image == "raise":
                raise BadImageError(f"{next(iter(bad.values()))} (on_bad_image='raise'; pass on_bad_image="
                                    f"'skip' / --on-bad-image skip to count and skip bad images)")
            failures.update(bad)
        f = np.asarray(batch["feature"], np.float32)
        if ok.any():
            if features is None:
                features = np.zeros((n, f.shape[1]), np.float32)
                flip_features = np.zeros_like(features) if flip else None
            features[idx[ok]] = f[ok]
            if flip:
                flip_features[idx[ok]] = np.asarray(batch["flip_feature"], np.float32)[ok]
        magnitudes[idx] = batch["magnitude"]
        if flip:
            flip_magnitudes[idx] = batch["flip_magnitude"]
        valid[idx] = ok
        outside[idx] = batch["outside"]
        seen[idx] = True
    if not seen.all():
        raise RuntimeError(f"feature extraction lost {int((~seen).sum())} of {n} images")
    if features is None:
        features = np.zeros((n, 1), np.float32)
        flip_features = features.copy() if flip else None
    if failures:
        log.warning("%d of %d images could not be used and were skipped; first: %s", len(failures), n,
                    next(iter(failures.values())))
    if outside.any():
        log.warning("%d of %d faces have landmarks outside their image; aligned as OpenCV would (partly black "
                    "crops), as the reference scripts do", int(outside.sum()), n)
    return Extracted(features, magnitudes, valid, failures, flip_features, flip_magnitudes, outside)


def ray_init_if_needed(address: str | None = None) -> None:
    """Join the cluster at `address` / RAY_ADDRESS (ray job submit), else start a private local Ray: the
    connection rule of every pipeline (magface.cluster.connect)."""
    from magface.cluster import connect

    connect(address=address, dashboard=False)
