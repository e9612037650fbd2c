"""Ray Data over MXNet RecordIO shards: `read_recordio(paths) -> Dataset` of `key, label, image (JPEG bytes)`.

A shard is split into read tasks by byte range: the `.idx` gives every record's offset, so a read task is a
contiguous run of image records and reads them with one ranged read per block (one GET on S3), then parses
them with `magface.recordio.iter_records`. A 5.8M-image MS1MV2 `.rec` thus becomes as many tasks as asked.

insightface's layout (MS1MV2 and friends) is understood the way insightface's `MXFaceDataset` reads it:
if record 0's header has flag > 0, its label is (first identity-record key, end), the images are keys
1..label[0]-1 and the identity records after them are skipped; otherwise every record is an image.
A `property` file (`num_classes,h,w`) beside the shard gives the label range.
"""

from __future__ import annotations

import bisect
import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from magface.data import storage
from magface.recordio import RecordIOError, build_index, iter_records, parse_index, read_extent, unpack

__all__ = ["BadRecords", "RecordIODatasource", "ShardInfo", "read_property", "read_recordio", "report_bad", "scan_shard"]

logger = logging.getLogger(__name__)

SCHEMA = pa.schema([("key", pa.int64()), ("label", pa.int64()), ("image", pa.binary())])
SCHEMA_WITH_PATH = SCHEMA.append(pa.field("path", pa.string()))
_BLOCK_BYTES = 64 * 1024 * 1024  # one ranged read and one Arrow block per this many bytes of records
_ON_BAD = ("raise", "skip")


# --------------------------------------------------------------------------- skipped-record accounting


class BadRecords:
    """Counts records skipped under `on_bad_record="skip"`, across every Ray worker of a pipeline.

    Create one on the driver, pass it to `read_recordio` / `decode_images`, and read `count()` /
    `examples()` after (or during) iteration. Backed by a small actor that workers only call when they
    actually skip something, so the healthy path pays nothing.
    """

    def __init__(self, max_examples: int = 100):
        import ray

        self._actor = ray.remote(num_cpus=0)(_BadRecordLog).remote(max_examples)

    def add(self, reasons: list[str]) -> None:
        """Record skipped records (one reason string each: which file, which key, why). Waits for the
        actor, so a count read after the pipeline finished includes every skip."""
        import ray

        ray.get(self._actor.add.remote(list(reasons)))

    def count(self) -> int:
        import ray

        return ray.get(self._actor.count.remote())

    def examples(self) -> list[str]:
        import ray

        return ray.get(self._actor.examples.remote())


def report_bad(bad_records: BadRecords | None, reasons: list[str]) -> None:
    """Log skipped records on the worker and count them in `bad_records` when the caller gave one."""
    if not reasons:
        return
    for r in reasons[:10]:
        logger.warning("skipped bad record: %s", r)
    if bad_records is not None:
        bad_records.add(reasons)


class _BadRecordLog:
    def __init__(self, max_examples: int):
        self._n, self._max, self._examples = 0, max_examples, []

    def add(self, reasons: list[str]) -> None:
        self._n += len(reasons)
        self._examples += reasons[: max(0, self._max - len(self._examples))]

    def count(self) -> int:
        return self._n

    def examples(self) -> list[str]:
        return list(self._examples)


# --------------------------------------------------------------------------- shard metadata


@dataclass(frozen=True)
class ShardInfo:
    """What planning needs about one `.rec`: where its image records are and how labels are bounded."""

    rec: str
    size: int
    keys: np.ndarray  # image-record keys, sorted by offset
    starts: np.ndarray  # byte offset of each image record
    ends: np.ndarray  # offset of the next record in the file (or the file size)
    num_classes: int | None
    offset_to_key: dict  # every record's offset -> key (image or not), to name records while parsing


def read_property(folder) -> tuple[int, int, int] | None:
    """insightface's `property` file in `folder` (local or S3): (num_classes, height, width), or None."""
    path = storage.join(folder, "property")
    if not storage.exists(path):
        return None
    text = storage.read_bytes(path).decode("utf-8").strip()
    try:
        n, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width', got {text!r}") from None
    return n, h, w


def _idx_path(rec: str) -> str:
    return rec[: -len(".rec")] + ".idx" if rec.endswith(".rec") else rec + ".idx"


def _load_index(rec: str, rec_size: int) -> dict:
    idx = _idx_path(rec)
    if storage.exists(idx):
        return parse_index(storage.read_bytes(idx), path=idx, rec_size=rec_size)
    warnings.warn(f"{idx} not found: rebuilding the index by scanning {rec} (keys = record positions, "
                  "as MXNet's sequential writers number them); write an .idx to skip this scan", stacklevel=3)
    if storage.is_s3(rec):
        data = storage.read_bytes(rec)
        return {pos: off for pos, (off, _) in enumerate(iter_records(data, path=rec))}
    return dict(build_index(rec))


def _read_record(rec: str, offsets: list[int], size: int, offset: int) -> bytes:
    """The payload of the single record at `offset` (its extent is up to the next indexed offset)."""
    i = bisect.bisect_right(offsets, offset)
    end = offsets[i] if i < len(offsets) else size
    return read_extent(storage.read_range(rec, offset, end - offset), 0, end - offset, base_offset=offset, path=rec)


def _header_label(rec: str, offsets: list[int], size: int, index: dict, key: int) -> tuple[int, np.ndarray]:
    """(flag, float labels) of record `key`'s IRHeader; errors name the shard, key and offset."""
    try:
        header, _ = unpack(_read_record(rec, offsets, size, index[key]))
    except ValueError as exc:  # RecordIOError included
        raise RecordIOError(rec, index[key], f"record key {key}: {getattr(exc, 'reason', exc)}") from None
    return int(header.flag), np.atleast_1d(np.asarray(header.label, dtype=np.float64))


def _insightface_image_keys(rec: str, offsets: list[int], size: int, index: dict, label: np.ndarray) -> range:
    """Image keys 1..first_id-1 from header record 0's label (first_id, end), cross-checked against the index
    and the identity records (keys first_id..end-1, each labelled with its image-key range), so a damaged
    header cannot silently drop or add images."""
    idx = _idx_path(rec)
    if label.size < 2 or not np.isfinite(label[:2]).all() or not (label[:2] == np.round(label[:2])).all():
        raise RecordIOError(rec, index[0], f"header record 0: label {label.tolist()} is not the (first identity "
                                           "key, end key) pair of insightface's layout")
    first_id, end = int(label[0]), int(label[1])
    if not 2 <= first_id <= end:
        raise RecordIOError(rec, index[0], f"header record 0: image keys 1..{first_id - 1} and identity keys "
                                           f"{first_id}..{end - 1} are not a valid range (need 2 <= {first_id} <= {end})")
    int_keys = [k for k in index if isinstance(k, int)]
    missing = [k for k in range(1, first_id) if k not in index]
    if missing:
        raise RecordIOError(idx, None, f"header record 0 says images are keys 1..{first_id - 1}, but "
                                       f"{len(missing)} of them are not in the index (first: key {missing[0]})")
    beyond = [k for k in int_keys if not 0 <= k < max(end, first_id)]
    if beyond:
        raise RecordIOError(idx, None, f"key {beyond[0]} lies outside the keys 0..{max(end, first_id) - 1} header "
                                       f"record 0 describes ({len(beyond)} such key(s))")
    if end > first_id and first_id in index:  # identity records: the first starts at image 1, the last ends at first_id
        flag, first = _header_label(rec, offsets, size, index, first_id)
        flag_l, last = _header_label(rec, offsets, size, index, end - 1)
        if flag < 2 or flag_l < 2 or first[0] != 1 or last[1] != first_id:
            raise RecordIOError(rec, index[0], f"header record 0 says images are keys 1..{first_id - 1}, but the "
                                               f"identity records disagree (key {first_id}: flag {flag}, label "
                                               f"{first.tolist()}; key {end - 1}: flag {flag_l}, label "
                                               f"{last.tolist()}); the header or the index is damaged")
    return range(1, first_id)


def scan_shard(rec: str, num_classes: int | None = None) -> ShardInfo:
    """Read a shard's `.idx` (rebuilding it if missing), its header record and `property` file."""
    rec = str(rec)
    storage.check_readable(rec)
    size = storage.size(rec)
    index = _load_index(rec, size)
    if not index:
        raise RecordIOError(_idx_path(rec), None, "the index is empty: no records in this shard")
    offsets = sorted(index.values())
    image_keys = list(index)
    if 0 in index:
        flag, label = _header_label(rec, offsets, size, index, 0)
        if flag > 0:  # insightface: images are keys 1..label[0]-1, identity records follow
            image_keys = _insightface_image_keys(rec, offsets, size, index, label)
    keys = np.fromiter(image_keys, dtype=np.int64)
    starts = np.fromiter((index[k] for k in keys.tolist()), dtype=np.int64, count=len(keys))
    order = np.argsort(starts, kind="stable")
    keys, starts = keys[order], starts[order]
    all_offsets = np.array(offsets + [size], dtype=np.int64)
    ends = all_offsets[np.searchsorted(all_offsets, starts, side="right")]
    if num_classes is None:
        prop = read_property(storage.parent(rec))
        num_classes = prop[0] if prop else None
    return ShardInfo(rec, size, keys, starts, ends, num_classes, {off: k for k, off in index.items()})


# --------------------------------------------------------------------------- reading


def _label_of(header) -> int:
    value = float(np.atleast_1d(header.label)[0]) if header.flag > 0 else float(header.label)
    if not value.is_integer():  # NaN and infinities included
        raise ValueError(f"non-integer label {value}")
    return int(value)


def _read_block(rec: str, start: int, end: int, keys: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                num_classes: int | None, on_bad_record: str, bad_records: BadRecords | None,
                include_paths: bool = False) -> pa.Table:
    """Parse the image records with the given keys/offsets/extents from the byte range [start, end) of `rec`.

    Each record is parsed on its own from its `.idx` offset and must fill its extent (up to the next indexed
    record): a damaged record never swallows or hides its neighbour, and under "skip" every image record of
    the range is either returned or counted once in `bad_records`."""
    out_keys, out_labels, out_images, bad = [], [], [], []
    buf = storage.read_range(rec, start, end - start)
    skip = on_bad_record == "skip"
    for key, offset, stop in zip(keys.tolist(), starts.tolist(), ends.tolist()):
        try:
            payload = read_extent(buf, offset - start, stop - start, base_offset=start, path=rec)
            header, image = unpack(payload)
            label = _label_of(header)
        except ValueError as exc:  # RecordIOError included
            reason = f"record key {key} (byte offset {offset}): {getattr(exc, 'reason', exc)}"
            if not skip:
                raise RecordIOError(rec, None, reason) from None
            bad.append(f"{rec}: {reason}")
            continue
        if label < 0 or (num_classes is not None and label >= num_classes):  # a setting to fix: never skipped
            raise RecordIOError(rec, None, f"record key {key} (byte offset {offset}): label {label} outside "
                                           f"[0, {num_classes if num_classes is not None else 'inf'}) (num_classes "
                                           "from the shard's 'property' file or the num_classes argument)")
        out_keys.append(key)
        out_labels.append(label)
        out_images.append(image)
    report_bad(bad_records, bad)
    columns = [pa.array(out_keys, pa.int64()), pa.array(out_labels, pa.int64()), pa.array(out_images, pa.binary())]
    if include_paths:
        columns.append(pa.array([rec] * len(out_keys), pa.string()))
    return pa.Table.from_arrays(columns, schema=SCHEMA_WITH_PATH if include_paths else SCHEMA)


def _split_even(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _blocks_of(shard: ShardInfo, lo: int, hi: int, block_bytes: int) -> list[tuple[int, int]]:
    """Cut image positions [lo, hi) into runs of about block_bytes; each run is one ranged read."""
    out, a = [], lo
    while a < hi:
        limit = shard.starts[a] + block_bytes
        b = max(a + 1, int(np.searchsorted(shard.ends[a:hi], limit, side="right")) + a)
        out.append((a, min(b, hi)))
        a = min(b, hi)
    return out


class RecordIODatasource(Datasource):
    """A Ray Data datasource over RecordIO shards; one read task = a contiguous run of image records."""

    def __init__(self, shards: list[ShardInfo], *, on_bad_record: str = "raise", bad_records=None,
                 block_bytes: int = _BLOCK_BYTES, include_paths: bool = False):
        super().__init__()
        self._shards, self._on_bad, self._bad, self._block_bytes = shards, on_bad_record, bad_records, block_bytes
        self._include_paths = include_paths

    def get_name(self) -> str:
        return "ReadRecordIO"

    def estimate_inmemory_data_size(self) -> int:
        return int(sum((s.ends - s.starts).sum() for s in self._shards))

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
        sizes = [int((s.ends - s.starts).sum()) for s in self._shards]
        total = max(1, sum(sizes))
        parallelism = max(parallelism, len(self._shards))
        tasks = []
        for shard, nbytes in zip(self._shards, sizes):
            n = len(shard.keys)
            parts = min(n, max(1, round(parallelism * nbytes / total)))
            for lo, hi in _split_even(n, parts):
                blocks = [(int(shard.starts[a]), int(shard.ends[b - 1]), shard.keys[a:b], shard.starts[a:b],
                           shard.ends[a:b]) for a, b in _blocks_of(shard, lo, hi, self._block_bytes)]
                nbytes_task = int((shard.ends[lo:hi] - shard.starts[lo:hi]).sum())
                meta = BlockMetadata(num_rows=hi - lo, size_bytes=nbytes_task, input_files=[shard.rec],
                                     exec_stats=None)
                tasks.append(ReadTask(self._reader(shard, blocks), meta,
                                      schema=SCHEMA_WITH_PATH if self._include_paths else SCHEMA,
                                      per_task_row_limit=per_task_row_limit))
        return tasks

    def _reader(self, shard: ShardInfo, blocks: list):
        rec, num_classes, on_bad, bad, with_path = (shard.rec, shard.num_classes, self._on_bad, self._bad,
                                                    self._include_paths)

        def read():
            for start, end, keys, starts, ends in blocks:
                yield _read_block(rec, start, end, keys, starts, ends, num_classes, on_bad, bad, with_path)

        return read


def _expand(paths) -> list[str]:
    """`.rec` files from a path, an S3 URI, a folder/prefix of shards, or a list of those."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out = []
    for p in map(str, items):
        if p.endswith(".rec"):
            out.append(p)
            continue
        found = storage.list_files(p, ".rec")
        if not found:
            raise FileNotFoundError(f"{p}: no .rec shards found (give .rec files or a folder/prefix holding them)")
        out += found
    return out


def _aws_runtime_env(paths: list[str]) -> dict:
    """The driver's AWS_* and MAGFACE_S3_* (timeouts) settings, for read tasks on workers started before
    they were set."""
    if not any(storage.is_s3(p) for p in paths):
        return {}
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MAGFACE_S3_"))}
    return {"runtime_env": {"env_vars": env}} if env else {}


def read_recordio(paths, *, num_classes: int | None = None, on_bad_record: str = "raise",
                  bad_records: BadRecords | None = None, override_num_blocks: int | None = None,
                  include_paths: bool = False, forward_aws_env: bool = True, block_bytes: int = _BLOCK_BYTES,
                  ray_remote_args: dict | None = None):
    """Read MXNet RecordIO shards (local paths or `s3://` URIs) as a Ray Dataset.

    Rows: `key` (int64, the record's `.idx` key), `label` (int64), `image` (binary: the encoded JPEG).

    Args:
        paths: a `.rec`, a folder or S3 prefix holding `.rec` shards, or a list of these. Each shard needs its
            `.idx` beside it (missing: rebuilt by a scan, with a warning).
        num_classes: labels must lie in [0, num_classes); default: the `property` file beside each shard.
            A label outside is an error naming the shard and record key.
        on_bad_record: "raise" (default) or "skip" records that cannot be parsed; skips are counted in
            `bad_records` and logged.
        override_num_blocks: number of read tasks (byte ranges); default: Ray's choice from the data size.
            Never more than one task per record.
        forward_aws_env: pass the driver's AWS_* variables to the read tasks, so shards on S3 read with the
            same credentials/endpoint on workers whose environment lacks them.
        include_paths: add a `path` column (the shard), so later errors (decode) can name the file.
        block_bytes: bytes per ranged read and per output block.
    """
    import ray

    if on_bad_record not in _ON_BAD:
        raise ValueError(f"on_bad_record must be one of {_ON_BAD}, got {on_bad_record!r}")
    if num_classes is not None and num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    recs = _expand(paths)
    shards = [scan_shard(rec, num_classes) for rec in recs]
    source = RecordIODatasource(shards, on_bad_record=on_bad_record, bad_records=bad_records,
                                block_bytes=block_bytes, include_paths=include_paths)
    remote_args = dict(ray_remote_args or {})
    if forward_aws_env:
        remote_args = {**_aws_runtime_env(recs), **remote_args}
    return ray.data.read_datasource(source, override_num_blocks=override_num_blocks,
                                    ray_remote_args=remote_args or None)
