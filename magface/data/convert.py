"""Write RecordIO shards in insightface's MS1MV2 layout, in parallel Ray tasks, resumably.

Each shard is a complete insightface-style `.rec/.idx` pair: record 0 is a header whose label is
(first identity-record key, end), images are keys 1..n, then one identity record per identity with label
(first image key, end). Labels stay global, so one `property` file (num_classes,h,w) serves all shards.

Resuming: a shard counts as finished only when its marker `<name>.done` exists; the `.rec`/`.idx` are
renamed into place by the RecordIO writer on success and the marker (with the record count and file sizes)
is written after them, so a crash at any point leaves a shard that is redone, never one that looks complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magface.data import storage
from magface.data.codec import decode_jpeg, encode_jpeg, image_size as header_size
from magface.data.datasource import read_property, scan_shard
from magface.recordio import IRHeader, MXIndexedRecordIO, iter_records, pack, unpack

__all__ = ["ImageSizeError", "convert_folder", "is_complete", "read_landmarks", "shard_names", "split_rec",
           "upload_shards", "write_shard"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_JPEG_SOI = b"\xff\xd8"


def shard_names(num_shards: int, prefix: str = "train") -> list[str]:
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def _marker(out_dir, name: str) -> str:
    return os.path.join(out_dir, f"{name}.done")


def is_complete(out_dir, name: str) -> bool:
    """A shard is complete when its marker exists and the files have the sizes the marker recorded."""
    marker = _marker(out_dir, name)
    if not os.path.exists(marker):
        return False
    meta = json.loads(Path(marker).read_text())
    return all(os.path.exists(os.path.join(out_dir, f)) and os.path.getsize(os.path.join(out_dir, f)) == n
               for f, n in meta["files"].items())


def write_shard(out_dir: str, name: str, identities: list[tuple]) -> dict:
    """Write one shard; returns what its completion marker records.

    `identities` holds, per identity, (global label, encoded images), or for `split` (None, the image
    records' (IRHeader, image) pairs), whose headers are kept but for the key.
    """
    rec, idx = os.path.join(out_dir, f"{name}.rec"), os.path.join(out_dir, f"{name}.idx")
    n_images = sum(len(imgs) for _, imgs in identities)
    first_id_key = n_images + 1
    with MXIndexedRecordIO(idx, rec, "w") as w:
        w.write_idx(0, pack(IRHeader(2, [first_id_key, first_id_key + len(identities)], 0, 0), b""))
        key = 1
        ranges = []
        for label, images in identities:
            start = key
            for img in images:
                header, payload = img if isinstance(img, tuple) else (IRHeader(0, float(label), key, 0), img)
                w.write_idx(key, pack(header._replace(id=key), payload))
                key += 1
            ranges.append((start, key))
        for i, (start, end) in enumerate(ranges):
            w.write_idx(first_id_key + i, pack(IRHeader(2, [start, end], first_id_key + i, 0), b""))
    meta = {"images": n_images, "identities": len(identities),
            "files": {f"{name}.rec": os.path.getsize(rec), f"{name}.idx": os.path.getsize(idx)}}
    with storage.atomic_write(_marker(out_dir, name)) as f:
        f.write(json.dumps(meta).encode())
    return meta


def _balanced_groups(counts: list[int], parts: int) -> list[tuple[int, int]]:
    """Split identities (in order) into `parts` contiguous groups of about equal image counts."""
    cum = np.concatenate([[0], np.cumsum(counts)])
    cuts = np.searchsorted(cum, np.linspace(0, cum[-1], parts + 1)[1:-1])
    bounds = [0, *sorted(set(int(c) for c in cuts) - {0, len(counts)}), len(counts)]
    return list(zip(bounds[:-1], bounds[1:]))


class ImageSizeError(ValueError):
    """An image whose size differs from the others' (training needs one size: `property` and data.image_size)."""


def _fix_hint(height: int, width: int) -> str:
    return (f"convert with --resize {height} {width} (stretches whole images), or better --align LANDMARKS "
            "(5-point landmarks from any face detector; crops onto the 112x112 face template); see docs/own_faces.md")


def read_landmarks(path, root=None) -> dict[str, np.ndarray]:
    """A 5-point landmark file: one line per image, `<image> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [score]` (left eye,
    right eye, nose tip, left and right mouth corners, in pixels; the layout of insightface's IJB
    `*_name_5pts_score.txt`). `<image>` is relative to the image folder (e.g. `alice/001.jpg`). Returns
    {relative path: (5, 2) float64}; errors name the file and line."""
    from magface.evaluation.alignment import LandmarkError, check_landmarks

    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) not in (11, 12):
            raise ValueError(f"{path}:{n}: expected '<image> x1 y1 ... x5 y5 [score]' (11 or 12 fields), "
                             f"got {len(parts)}")
        try:
            lm = check_landmarks([float(v) for v in parts[1:11]], f"{path}:{n}")
        except ValueError as exc:
            raise ValueError(exc if isinstance(exc, LandmarkError) else f"{path}:{n}: {exc}") from None
        key = Path(parts[0]).as_posix()
        if root is not None and Path(key).is_absolute():
            key = Path(key).relative_to(root).as_posix()
        if key in out:
            raise ValueError(f"{path}:{n}: second line for {key}")
        out[key] = lm
    if not out:
        raise ValueError(f"{path}: no landmark lines")
    return out


def _as_jpeg(path: Path, image_size, *, resize: bool = False, landmarks=None) -> bytes:
    """One image file -> JPEG bytes of the shard. The header is read first: without resize/align every image
    must be `image_size` (h, w), and nothing else is decoded."""
    data = path.read_bytes()
    if landmarks is not None:
        from magface.evaluation.alignment import align_face

        return encode_jpeg(align_face(decode_jpeg(data), landmarks, tuple(image_size), where=str(path)), quality=95)
    if resize:
        from magface.data.transforms import _resize

        img = decode_jpeg(data)
        if img.shape[:2] != tuple(image_size):
            img = _resize(img, *image_size)
        return encode_jpeg(img, quality=95)
    if image_size is not None:
        h, w = header_size(data)
        if (h, w) != tuple(image_size):
            raise ImageSizeError(f"{path}: image is {w}x{h} but the data set's images are {image_size[1]}x"
                                 f"{image_size[0]}; every training image must have one size. Fix: "
                                 + _fix_hint(*image_size))
    return data if data[:2] == _JPEG_SOI else encode_jpeg(decode_jpeg(data), quality=95)


def _folder_shard(out_dir: str, name: str, identities: list[tuple[int, list]], image_size, resize=False) -> dict:
    """identities: (label, [file or (file, landmarks)])."""
    loaded = [(label, [_as_jpeg(Path(f[0]), image_size, landmarks=f[1]) if isinstance(f, tuple)
                       else _as_jpeg(Path(f), image_size, resize=resize) for f in files])
              for label, files in identities]
    return write_shard(out_dir, name, loaded)


def _split_shard(out_dir: str, name: str, src: str, groups: list[tuple[int, int, int, int]]) -> dict:
    """Copy identities [(first key, end key, byte start, byte end)] of `src` into one shard."""
    identities = []
    for first, end, start, stop in groups:
        records = [unpack(p) for _, p in iter_records(storage.read_range(src, start, stop - start),
                                                      base_offset=start, path=src)]
        if len(records) != end - first:
            raise ValueError(f"{src}: identity with images {first}..{end - 1} spans bytes [{start}, {stop}) holding "
                             f"{len(records)} records, expected {end - first} (images not stored in key order?)")
        identities.append((None, records))
    return write_shard(out_dir, name, identities)


def _run(out_dir: str, jobs: dict, fn, progress: bool) -> dict:
    """Run fn(out_dir, name, *args) for every unfinished shard as Ray tasks; a tqdm bar counts shards."""
    import ray
    from tqdm import tqdm

    todo = {name: args for name, args in jobs.items() if not is_complete(out_dir, name)}
    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    pending = {remote.remote(out_dir, name, *args): name for name, args in todo.items()}
    done = {}
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="shard", disable=not progress) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            done[pending.pop(ready[0])] = ray.get(ready[0])
            bar.update(1)
    return {"shards": sorted(jobs), "written": sorted(done), "skipped": sorted(set(jobs) - set(todo))}


def _write_property(out_dir: str, num_classes: int, height: int, width: int) -> None:
    with storage.atomic_write(os.path.join(out_dir, "property")) as f:
        f.write(f"{num_classes},{height},{width}".encode())


def convert_folder(src_dir, out_dir, num_shards: int, *, image_size: tuple[int, int] | None = None,
                   prefix: str = "train", progress: bool = True, resize: bool = False, landmarks=None) -> dict:
    """Image folder (one subfolder per identity, labels in sorted folder order) -> `num_shards` shards.

    All images must have one size: `image_size` (h, w), else the first image's; a different one stops the
    conversion with `ImageSizeError` naming the file (read from headers, nothing decoded). `resize=True`
    resizes every image to `image_size` instead; `landmarks` (a file, see `read_landmarks`) aligns every
    image onto the 5-point face template at `image_size` (default 112x112), as insightface prepares its data.
    JPEG files are otherwise stored unchanged; other formats are encoded to JPEG.
    Returns {"shards", "written", "skipped", "num_classes", "image_size"}.
    """
    src_dir, out_dir = Path(src_dir), str(out_dir)
    folders = sorted(p for p in src_dir.iterdir() if p.is_dir())
    identities = [(label, sorted(str(f) for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
                  for label, d in enumerate(folders)]
    identities = [(label, files) for label, files in identities if files]
    if not identities:
        raise FileNotFoundError(f"{src_dir}: no identity subfolders with images ({', '.join(IMAGE_SUFFIXES)})")
    if resize and landmarks is not None:
        raise ValueError("choose one of resize and landmarks (alignment already gives the output size)")
    if resize and image_size is None:
        raise ValueError("resize needs the target image_size (h, w)")
    if landmarks is not None:
        image_size = tuple(image_size or (112, 112))
        marks = read_landmarks(landmarks, src_dir)
        rel = {f: Path(f).relative_to(src_dir).as_posix() for _, files in identities for f in files}
        missing = [r for r in rel.values() if r not in marks]
        if missing:
            raise ValueError(f"{landmarks}: no landmarks for {len(missing)} of {len(rel)} image(s), e.g. "
                             f"{missing[0]!r} (image paths are relative to {src_dir})")
        identities = [(label, [(f, marks[rel[f]]) for f in files]) for label, files in identities]
    elif image_size is None:
        image_size = header_size(Path(identities[0][1][0]).read_bytes())
    os.makedirs(out_dir, exist_ok=True)
    height, width = image_size
    _write_property(out_dir, len(folders), height, width)
    groups = _balanced_groups([len(f) for _, f in identities], num_shards)
    names = shard_names(len(groups), prefix)
    jobs = {name: (identities[a:b], tuple(image_size), resize) for name, (a, b) in zip(names, groups)}
    return {**_run(out_dir, jobs, _folder_shard, progress), "num_classes": len(folders),
            "image_size": (height, width)}


def split_rec(src_rec: str, out_dir, num_shards: int, *, prefix: str = "train", progress: bool = True) -> dict:
    """Split a `.rec` in insightface's layout (local or s3://) into `num_shards` shards of whole identities.

    Image records are copied with their headers (labels unchanged); keys are renumbered per shard.
    """
    src_rec, out_dir = str(src_rec), str(out_dir)
    info = scan_shard(src_rec)
    key_to_offset = {k: off for off, k in info.offset_to_key.items()}
    first_id = int(info.keys.max()) + 1 if len(info.keys) else 1
    if 0 not in key_to_offset or first_id not in key_to_offset:
        raise ValueError(f"{src_rec}: split needs insightface's layout (header record 0, identity records "
                         "after the images)")
    # Identity records are small and sit together after the images: one ranged read gets them all.
    id_start = key_to_offset[first_id]
    identities = []  # (first image key, end key, byte start, byte end)
    image_end = dict(zip(info.keys.tolist(), info.ends.tolist()))
    for offset, payload in iter_records(storage.read_range(src_rec, id_start, info.size - id_start),
                                        base_offset=id_start, path=src_rec):
        header, _ = unpack(payload)
        if header.flag < 2:
            raise ValueError(f"{src_rec}: record key {info.offset_to_key.get(offset)} (byte offset {offset}) "
                             "is not an identity record (flag < 2)")
        start, end = (int(v) for v in header.label[:2])
        if start not in key_to_offset or end - 1 not in image_end:
            raise ValueError(f"{src_rec}: identity record at byte offset {offset} names images {start}..{end - 1} "
                             "that are not in the index")
        identities.append((start, end, key_to_offset[start], image_end[end - 1]))
    os.makedirs(out_dir, exist_ok=True)
    prop = read_property(storage.parent(src_rec))
    if prop is None:
        raise FileNotFoundError(f"{storage.join(storage.parent(src_rec), 'property')}: split copies the source's "
                                "'property' file (num_classes,h,w) and it is missing")
    _write_property(out_dir, *prop)
    groups = _balanced_groups([end - start for start, end, _, _ in identities], num_shards)
    names = shard_names(len(groups), prefix)
    jobs = {name: (src_rec, identities[a:b]) for name, (a, b) in zip(names, groups)}
    return {**_run(out_dir, jobs, _split_shard, progress), "num_classes": prop[0]}


@dataclass
class UploadReport:
    uploaded: list[str]
    skipped: list[str]


def upload_shards(out_dir, dest: str, *, part_size_mb: int = 64) -> UploadReport:
    """Upload finished shards (+ `property`) to an s3:// prefix, multipart; each shard's marker goes last,
    and files already there with the right size are skipped, so an interrupted upload resumes."""
    out_dir = str(out_dir)
    names = sorted(f[: -len(".done")] for f in os.listdir(out_dir) if f.endswith(".done"))
    files = ["property"] + [f"{n}{ext}" for n in names if is_complete(out_dir, n) for ext in (".rec", ".idx", ".done")]
    uploaded, skipped = [], []
    for f in files:
        local, remote = os.path.join(out_dir, f), storage.join(dest, f)
        if storage.exists(remote) and storage.size(remote) == os.path.getsize(local):
            skipped.append(remote)
            continue
        storage.upload_file(local, remote, part_size_mb=part_size_mb)
        uploaded.append(remote)
    return UploadReport(uploaded, skipped)
