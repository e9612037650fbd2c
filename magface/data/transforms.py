"""`decode_images`: JPEG rows -> fixed-shape RGB uint8 (H, W, 3) batches with a reproducible random flip.

The object store carries uint8: normalisation happens on the training worker (`magface.preprocess`).

Per-epoch flips, reproducibly. Ray Data re-executes the whole pipeline each time a dataset (or a
`streaming_split` of it, as Ray Train uses) is iterated again, and counts successful executions in
`DataContext._execution_idx` (the counter Ray's own `RandomSeedConfig(reseed_after_execution=True)` uses for
per-epoch shuffles). The decode step reads that counter inside the task, so epoch e of a run flips exactly
the images that epoch e of any other run with the same seed flips: whether record `key` is flipped is a
pure hash of (seed, epoch_base + execution index, key), independent of batch boundaries, task placement
and row order. `epoch_base` re-aligns the count when training resumes from a checkpoint at epoch e.
(An iteration abandoned midway does not count as an execution, so that epoch's flips repeat.)
"""

from __future__ import annotations

import numpy as np

from magface.data.codec import MAX_PIXELS, ImageDecodeError, decode_jpeg
from magface.data.datasource import BadRecords, report_bad

__all__ = ["decode_batch", "decode_images", "flip_mask"]

_ON_BAD = ("raise", "skip")
_M64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays: a cheap, well-mixed hash."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def flip_mask(keys, seed: int, epoch: int) -> np.ndarray:
    """Which records to flip horizontally: a fair coin per (seed, epoch, key), the same wherever computed."""
    salt = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 + epoch) & _M64], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        h = _mix64(np.asarray(keys).astype(np.uint64) ^ salt)
    return (h >> np.uint64(63)).astype(bool)


def _current_epoch(epoch_base: int) -> int:
    from ray.data import DataContext

    return epoch_base + int(getattr(DataContext.get_current(), "_execution_idx", 0))


def _decode_flipped(data, **limits) -> np.ndarray:
    """Decode and mirror horizontally in one cheap step: a BGR row read backwards byte by byte is the
    mirrored RGB row. (numpy copies `img[:, ::-1]` of 3-byte pixels ~20x slower than a byte reversal.)
    `limits`: decode_jpeg's header checks (size, max_pixels)."""
    bgr = decode_jpeg(data, colorspace="BGR", **limits)
    h, w, _ = bgr.shape
    return bgr.reshape(h, w * 3)[:, ::-1].reshape(h, w, 3)


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR), dtype=np.uint8)


def decode_batch(batch: dict, *, image_size: tuple[int, int] = (112, 112), flip: bool = True, seed: int = 0,
                 epoch: int = 0, resize: bool = False, on_bad_record: str = "raise",
                 bad_records: BadRecords | None = None) -> dict:
    """Decode one numpy batch {key, label, image: encoded bytes[, path]} into {key, label, image: uint8}."""
    height, width = image_size
    keys = np.asarray(batch["key"], dtype=np.int64)
    encoded = batch["image"]
    paths = batch.get("path")
    out = np.empty((len(keys), height, width, 3), dtype=np.uint8)
    flips = flip_mask(keys, seed, epoch) if flip else np.zeros(len(keys), dtype=bool)
    good = np.ones(len(keys), dtype=bool)
    bad = []
    # Header first: without resize only the exact size is decoded; with it, at most MAX_PIXELS.
    limits = {"max_pixels": MAX_PIXELS} if resize else {"size": (height, width)}
    for i, data in enumerate(encoded):
        try:
            img = _decode_flipped(data, **limits) if flips[i] else decode_jpeg(data, **limits)
            if img.shape[:2] != (height, width):
                if not resize:  # a header that lied about the size
                    raise ImageDecodeError(f"image is {img.shape[1]}x{img.shape[0]}, expected {width}x{height}")
                img = _resize(img, height, width)
        except ImageDecodeError as exc:
            where = f"{paths[i]}: " if paths is not None else ""
            msg = f"{where}record key {int(keys[i])}: {exc}"
            if not resize and str(exc).startswith("image is "):
                msg += (f" (data.image_size is {height}; set it to the shards' size, or data.resize=true to "
                        "resize, or convert with --resize/--align: docs/own_faces.md)")
            if on_bad_record == "raise":
                raise ImageDecodeError(msg) from exc
            good[i] = False
            bad.append(msg)
            continue
        out[i] = img
    result = {"key": keys, "label": np.asarray(batch["label"], dtype=np.int64), "image": out}
    if bad:
        report_bad(bad_records, bad)
        result = {k: v[good] for k, v in result.items()}
    return result


def _decode_epoch_batch(batch: dict, *, epoch_base: int, **kwargs) -> dict:
    return decode_batch(batch, epoch=_current_epoch(epoch_base), **kwargs)


def decode_images(ds, *, image_size: tuple[int, int] = (112, 112), flip: bool = True, seed: int | None = None,
                  epoch_base: int = 0, resize: bool = False, on_bad_record: str = "raise",
                  bad_records: BadRecords | None = None, batch_size: int = 256, num_cpus: float = 1,
                  concurrency: int | None = None):
    """JPEG rows -> `key: int64, label: int64, image: uint8 (H, W, 3) RGB`, as a `map_batches` step.

    Args:
        image_size: (height, width) every image must have; a different size is an error naming the record
            key, unless `resize=True` (bilinear).
        flip: random horizontal flip, a fair coin per image that changes every epoch (see module docstring).
        seed: makes the flips reproducible; None draws one now (flips still differ per epoch).
        epoch_base: the epoch number of this dataset's first iteration (for resumed training).
        on_bad_record: "raise" (default) on an undecodable image, or "skip" it: skipped records are logged and
            counted in `bad_records` (a `BadRecords` made on the driver; read its `count()`).
    """
    if on_bad_record not in _ON_BAD:
        raise ValueError(f"on_bad_record must be one of {_ON_BAD}, got {on_bad_record!r}")
    if len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}")
    if seed is None:
        seed = int(np.random.SeedSequence().entropy) & _M64
    kwargs = dict(image_size=tuple(int(v) for v in image_size), flip=flip, seed=int(seed), epoch_base=epoch_base,
                  resize=resize, on_bad_record=on_bad_record, bad_records=bad_records)
    extra = {"concurrency": concurrency} if concurrency is not None else {}
    return ds.map_batches(_decode_epoch_batch, fn_kwargs=kwargs, batch_format="numpy", batch_size=batch_size,
                          zero_copy_batch=True, num_cpus=num_cpus, **extra)
