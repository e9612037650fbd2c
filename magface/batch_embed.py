"""Batch embedding and quality job: images -> Parquet rows of unit embedding + magnitude (MagFace's quality).

One Ray Data pipeline: list the input (an image folder or RecordIO shards, local or s3://) -> read + decode
(CPU tasks; images must be the model's input size, or `resize`) -> embed (actor pool, one `Embedder` per
actor, one GPU each when the cluster has GPUs) -> each batch written as one Parquet part by the task that
embedded it, under the output folder or s3:// prefix. Only the magnitudes travel back to the driver, for the
progress bar and the summary (quality histogram, percentiles, optional threshold report).

Parquet rows: `path` (folder input) or `shard` + `key` (RecordIO input); `label` (the identity folder name,
or the record's label; null when there is none); `embedding` (list<float32>, unit length); `magnitude`
(float32, |f|: the quality score the loss trained; NaN for an image that could not be used); `error`
("" when fine). `embedding * magnitude` is the raw feature.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
PART_PREFIX = "part-"


class EmbedInputError(ValueError):
    """The input or output cannot be used (nothing to embed, output not empty); the message says what to do."""


@dataclass
class EmbedResult:
    output: str
    rows: int
    failed: int
    seconds: float
    cpus: float  # the cluster's CPUs (throughput per CPU is per CPU of the whole cluster)
    summary: dict = field(default_factory=dict)

    @property
    def images_per_s_per_cpu(self) -> float:
        return self.rows / max(self.seconds, 1e-9) / max(self.cpus, 1.0)


# ------------------------------------------------------------------------------------------ inputs
def list_input(source: str) -> tuple[str, list[str]]:
    """("recordio", [.rec files]) when the input is (or holds) .rec shards, else ("folder", [image files])."""
    from magface.data import storage

    source = str(source)
    if source.endswith(".rec"):
        return "recordio", [source]
    try:
        files = storage.list_files(source)
    except storage.StorageError as exc:
        raise EmbedInputError(f"--input {source}: {exc}") from None
    recs = [f for f in files if f.endswith(".rec")]
    if recs:
        return "recordio", recs
    images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise EmbedInputError(f"--input {source}: no .rec shards and no images ({', '.join(IMAGE_SUFFIXES)}) there")
    return "folder", images


def _folder_rows(batch: dict, root: str) -> dict:
    """index, path -> + label (the identity folder, None at the root), data (file bytes)."""
    from magface.data import storage

    paths = [str(p) for p in batch["path"]]
    base = root.rstrip("/") + "/"
    labels = []
    for p in paths:
        rel = p[len(base):] if p.startswith(base) else os.path.relpath(p, root)
        parts = rel.replace(os.sep, "/").split("/")
        labels.append(parts[-2] if len(parts) > 1 else None)
    return {"index": batch["index"], "path": np.array(paths, dtype=object), "label": np.array(labels, dtype=object),
            "data": np.array([storage.read_bytes(p) for p in paths], dtype=object)}


def _decode(batch: dict, size: int, resize: bool) -> dict:
    """data -> image (uint8 size x size x 3), error ("" when fine), outside (unused, for EmbedBatch)."""
    from magface.data.codec import MAX_PIXELS, ImageDecodeError, decode_jpeg
    from magface.data.transforms import _resize

    n = len(batch["data"])
    images = np.zeros((n, size, size, 3), np.uint8)
    errors = [""] * n
    limits = {"max_pixels": MAX_PIXELS} if resize else {"size": (size, size)}
    for i, data in enumerate(batch["data"]):
        try:
            img = decode_jpeg(bytes(data), **limits)
            images[i] = img if img.shape[:2] == (size, size) else _resize(img, size, size)
        except ImageDecodeError as exc:
            hint = f" (the model takes {size}x{size}; pass --resize)" if str(exc).startswith("image is") else ""
            errors[i] = f"{_where(batch, i)}: {exc}{hint}"
    out = {k: v for k, v in batch.items() if k != "data"}
    return {**out, "image": images, "error": np.array(errors, dtype=object), "outside": np.zeros(n, bool)}


def _where(batch: dict, i: int) -> str:
    if "key" in batch:
        return f"{batch['shard'][i]} record key {int(batch['key'][i])}"
    return str(batch["path"][i])


def write_part(batch: dict, output: str, threshold: float | None) -> dict:
    """Write one embedded batch as one Parquet part; pass only magnitudes, errors and the names below the
    threshold back. The part is named after the batch's first row, so a rerun replaces rather than duplicates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from magface.data import storage

    ok = np.array([not e for e in batch["error"]], bool)
    mags = np.where(ok, np.asarray(batch["magnitude"], np.float32), np.float32("nan"))
    feats = np.asarray(batch["feature"], np.float32)
    cols = {}
    if "key" in batch:
        cols["shard"] = pa.array([str(s) for s in batch["shard"]], pa.string())
        cols["key"] = pa.array(np.asarray(batch["key"], np.int64))
        cols["label"] = pa.array(np.asarray(batch["label"], np.int64))
        name = f"{Path(str(batch['shard'][0])).stem}-{int(batch['key'][0]):010d}"
        ids = [f"{s} key {int(k)}" for s, k in zip(batch["shard"], batch["key"])]
    else:
        cols["path"] = pa.array([str(p) for p in batch["path"]], pa.string())
        cols["label"] = pa.array([None if v is None else str(v) for v in batch["label"]], pa.string())
        name = f"{int(batch['index'][0]):010d}"
        ids = cols["path"].to_pylist()
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1]) \
        .cast(pa.list_(pa.float32()))
    cols["magnitude"] = pa.array(mags)
    cols["error"] = pa.array([str(e) for e in batch["error"]], pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    with storage.atomic_write(storage.join(output, f"{PART_PREFIX}{name}.parquet")) as f:
        f.write(buf.getvalue())
    below = [] if threshold is None else [ids[i] for i in np.flatnonzero(ok & (mags < threshold))]
    return {"magnitude": mags, "error": np.array([str(e) for e in batch["error"]], dtype=object),
            "below": np.array(below + [""] * (len(ok) - len(below)), dtype=object)}


# ------------------------------------------------------------------------------------------ the job
def default_actors(num_gpus: float, num_cpus: float) -> tuple[int, bool]:
    """(actors, use GPUs): one actor per GPU; else all CPUs but one (reading and decoding take that one)."""
    if num_gpus >= 1:
        return int(num_gpus), True
    return max(1, int(num_cpus) - 1), False


def _check_output(output: str, overwrite: bool) -> None:
    from magface.data import storage

    try:
        old = [f for f in storage.list_files(output) if f.rsplit("/", 1)[-1].startswith(PART_PREFIX)]
    except storage.StorageError:
        old = []  # not there yet
    if old and not overwrite:
        raise EmbedInputError(f"--output {output} already holds {len(old)} Parquet part(s) of an earlier run; "
                              "choose an empty folder or pass --overwrite (replaces them)")
    for f in old:
        if storage.is_s3(f):
            bucket, key = storage.split_s3(f)
            storage._client().delete_object(Bucket=bucket, Key=key)
        else:
            os.unlink(f)


def embed(checkpoint: str, source: str, output: str, *, batch_size: int = 64, actors: int | None = None,
          use_gpu: bool | None = None, cpus_per_actor: int = 1, resize: bool = False, on_bad_image: str = "skip",
          threshold: float | None = None, overwrite: bool = False, progress: bool = True) -> EmbedResult:
    """Embed every image of `source` with the checkpoint's model; write Parquet parts + summary to `output`."""
    import ray
    from tqdm import tqdm

    from magface.checkpoint import load_model_file, model_summary
    from magface.data.datasource import _aws_runtime_env, read_recordio
    from magface.evaluation.features import EmbedBatch

    if on_bad_image not in ("skip", "raise"):
        raise ValueError(f"on_bad_image must be 'skip' or 'raise', got {on_bad_image!r}")
    model = model_summary(load_model_file(checkpoint))  # also fails early on a bad checkpoint
    size = int(model["input_size"])
    kind, files = list_input(source)
    _check_output(output, overwrite)
    res = ray.cluster_resources()
    auto_actors, auto_gpu = default_actors(res.get("GPU", 0), res.get("CPU", 1))
    use_gpu = auto_gpu if use_gpu is None else use_gpu
    actors = actors or auto_actors
    remote = _aws_runtime_env(files + [output])
    if kind == "folder":
        import pyarrow as pa

        root = source.rstrip("/")
        table = pa.table({"index": pa.array(np.arange(len(files), dtype=np.int64)), "path": pa.array(files)})
        per_block = max(batch_size, math.ceil(len(files) / max(1, 4 * actors)))
        ds = ray.data.from_arrow([table.slice(i, per_block) for i in range(0, len(files), per_block)])
        ds = ds.map_batches(_folder_rows, fn_kwargs={"root": root}, batch_format="numpy", batch_size=batch_size,
                            **remote)
        total = len(files)
    else:
        ds = read_recordio(files, include_paths=True).rename_columns({"image": "data", "path": "shard"})
        total = None
    ds = ds.map_batches(_decode, fn_kwargs={"size": size, "resize": resize}, batch_format="numpy",
                        batch_size=batch_size, **remote)
    ds = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"checkpoint": str(checkpoint), "threads": cpus_per_actor},
                        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else cpus_per_actor)
    ds = ds.map_batches(write_part, fn_kwargs={"output": output, "threshold": threshold}, batch_size=None,
                        batch_format="numpy", num_cpus=0.25, **remote)

    t0 = time.perf_counter()
    mags, errors, below = [], [], []
    with tqdm(total=total, unit="img", desc="embed", disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            err = [e for e in batch["error"] if e]
            if err and on_bad_image == "raise":
                raise EmbedInputError(f"{err[0]} (pass --on-bad-image skip to write such rows with their error "
                                      "and go on)")
            mags.append(np.asarray(batch["magnitude"], np.float32))
            errors += err
            below += [b for b in batch["below"] if b]
            bar.update(len(batch["magnitude"]))
    seconds = time.perf_counter() - t0
    m = np.concatenate(mags) if mags else np.zeros(0, np.float32)
    summary = quality_summary(m, threshold, below, errors, model)
    write_summary(output, summary, m, model)
    return EmbedResult(output, int(m.size), len(errors), seconds, float(res.get("CPU", 1)), summary)


def quality_summary(mags: np.ndarray, threshold: float | None, below: list[str], errors: list[str],
                    model: dict) -> dict:
    ok = mags[np.isfinite(mags)]
    s = {"images": int(mags.size), "embedded": int(ok.size), "failed": len(errors), "first_errors": errors[:5],
         "model": {k: model[k] for k in ("loss", "backbone", "epoch", "step", "convention", "input_size")}}
    if ok.size:
        pct = np.percentile(ok, [1, 5, 25, 50, 75, 95, 99])
        s["magnitude"] = {"mean": float(ok.mean()), "std": float(ok.std()), "min": float(ok.min()),
                          "max": float(ok.max()),
                          **{f"p{q}": float(v) for q, v in zip((1, 5, 25, 50, 75, 95, 99), pct)}}
    if threshold is not None:
        n = int((ok < threshold).sum())
        s["threshold"] = {"value": threshold, "below": n, "fraction_below": n / max(ok.size, 1),
                          "examples_below": sorted(below)[:20]}
    return s


def write_summary(output: str, summary: dict, mags: np.ndarray, model: dict) -> None:
    """_summary.json and _quality_histogram.png beside the parts (the leading _ keeps Parquet readers off them)."""
    from magface.data import storage
    from magface.evaluation.plots import magnitude_histogram

    with storage.atomic_write(storage.join(output, "_summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode())
    ok = mags[np.isfinite(mags)]
    if ok.size:
        bounds = {"l_a": model["magnitude_range"][0], "u_a": model["magnitude_range"][1]} \
            if None not in model.get("magnitude_range", [None]) else {}
        if summary.get("threshold"):
            bounds["threshold"] = summary["threshold"]["value"]
        fig = magnitude_histogram(ok, bins=60, bounds=bounds or None,
                                  title=f"Quality (magnitude) of {ok.size} images, {model['loss']} "
                                        f"{model['backbone']} ({model['convention']})")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        with storage.atomic_write(storage.join(output, "_quality_histogram.png")) as f:
            f.write(buf.getvalue())


def format_summary(result: EmbedResult) -> str:
    s = result.summary
    lines = [f"[embed] {s['embedded']} of {s['images']} images embedded in {result.seconds:.1f} s "
             f"({result.rows / max(result.seconds, 1e-9):.1f} images/s, {result.images_per_s_per_cpu:.1f} per CPU)"]
    if s["failed"]:
        lines.append(f"[embed] {s['failed']} image(s) could not be used (rows kept with their error), first: "
                     f"{s['first_errors'][0]}")
    if "magnitude" in s:
        m = s["magnitude"]
        lines.append(f"[embed] quality |f|: median {m['p50']:.2f}, 5-95% {m['p5']:.2f}-{m['p95']:.2f}, "
                     f"min {m['min']:.2f}, max {m['max']:.2f} (higher = better face image)")
    if "threshold" in s:
        t = s["threshold"]
        lines.append(f"[embed] {t['below']} image(s) ({100 * t['fraction_below']:.1f}%) below |f| = {t['value']:g}"
                     + (f", e.g. {t['examples_below'][0]}" if t["examples_below"] else ""))
    lines.append(f"[embed] wrote {result.output}: {PART_PREFIX}*.parquet (path/key, label, embedding, magnitude, "
                 "error), _summary.json, _quality_histogram.png")
    return "\n".join(lines)
