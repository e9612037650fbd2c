"""Write a synthetic dataset: MS1MV2-layout training shard, `.bin` verification set, IJB-layout set, q files.

Every image has its own seed, derived from (seed, split, identity, index), so the bytes written do not
depend on the number of worker processes. `manifest.json` is written last (atomically): a directory
without it, or with other parameters, is not a finished dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from magface.data.synthetic.render import Identity, loose_pose, render_face, sample_identity

__all__ = ["GENERATOR_VERSION", "SyntheticDataset", "dataset_params", "generate", "is_complete", "load_manifest"]

# Bump whenever a change alters the bytes written for the same parameters (cached datasets regenerate).
GENERATOR_VERSION = "magface-synthetic/2"  # 2: template quality file
IJB_NAME = "SYNTH"
JPEG_QUALITY = 95
# Seed-sequence tags: identities and images of each split draw from their own streams.
_STREAMS = {"train-id": 0, "verify-id": 1, "ijb-id": 2, "train": 10, "verify": 11, "ijb": 12,
            "verify-pairs": 20, "ijb-media": 21, "ijb-faceness": 22}


@dataclass(frozen=True)
class SyntheticDataset:
    """Paths of a generated dataset (all under `root`)."""

    root: Path
    num_classes: int

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def train_rec(self) -> Path:
        return self.train_dir / "train.rec"

    @property
    def train_idx(self) -> Path:
        return self.train_dir / "train.idx"

    @property
    def train_property(self) -> Path:
        return self.train_dir / "property"

    @property
    def train_quality(self) -> Path:
        return self.train_dir / "quality.csv"

    @property
    def verify_bin(self) -> Path:
        return self.root / "verify" / "synth.bin"

    @property
    def verify_quality(self) -> Path:
        return self.root / "verify" / "synth_quality.csv"

    @property
    def ijb_root(self) -> Path:
        """The `<root>` of insightface's IJB layout; the set itself is `ijb_root / "SYNTH"`."""
        return self.root / "ijb"

    @property
    def ijb_dir(self) -> Path:
        return self.ijb_root / IJB_NAME

    @property
    def ijb_quality(self) -> Path:
        return self.ijb_dir / "meta" / "synth_quality.csv"

    @property
    def ijb_template_quality(self) -> Path:
        """template_id,identity,n_images,q_mean,q_min,q_max: the known quality of every IJB template."""
        return self.ijb_dir / "meta" / "synth_template_quality.csv"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def _rng(seed: int, stream: str, *ids: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[stream], *ids]))


def _identity(seed: int, split: str, i: int, spread: float = 1.0) -> Identity:
    return sample_identity(_rng(seed, f"{split}-id", i), spread)


def _draw_q(rng: np.random.Generator, q_beta: tuple[float, float]) -> float:
    # rounded so the q written to the csv files is exactly the q the image was rendered with
    return round(float(rng.beta(*q_beta)), 6)


# ---------------------------------------------------------------------------------------- worker tasks
def _aligned_images(task) -> list[tuple[float, bytes]]:
    """(q, JPEG) for images 0..count-1 of one identity, aligned crops of image_size."""
    from magface.data.codec import encode_jpeg

    seed, split, ident, count, size, q_beta, spread = task
    identity = _identity(seed, split, ident, spread)
    out = []
    for j in range(count):
        rng = _rng(seed, split, ident, j)
        q = _draw_q(rng, q_beta)
        img, _ = render_face(identity, q, rng, size)
        out.append((q, encode_jpeg(img, quality=JPEG_QUALITY)))
    return out


def _ijb_images(task) -> list[tuple[float, bytes, np.ndarray]]:
    """(q, JPEG, landmarks) of one identity's IJB frames: loose crops; frames of a media share its pose."""
    from magface.data.codec import encode_jpeg

    seed, ident, media, frames, q_beta, spread = task
    identity = _identity(seed, "ijb", ident, spread)
    out = []
    for m in range(media):
        mrng = _rng(seed, "ijb-media", ident, m)
        size = int(mrng.integers(150, 181))
        base = loose_pose(mrng, size)
        for f in range(frames):
            rng = _rng(seed, "ijb", ident, m, f)
            q = _draw_q(rng, q_beta)
            # video-like frames: the media's pose plus a little motion
            pose = type(base)(scale=base.scale * rng.uniform(0.98, 1.02), angle=base.angle + rng.normal(0, 0.02),
                              centre=(base.centre[0] + rng.normal(0, 1.5), base.centre[1] + rng.normal(0, 1.5)))
            img, lmk = render_face(identity, q, rng, size, pose=pose)
            out.append((q, encode_jpeg(img, quality=JPEG_QUALITY), lmk))
    return out


class _Runner:
    """Maps tasks in order, inline (workers=1) or over processes; results never depend on which."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            # spawn: the caller may hold threads (Ray, torch) that fork would copy in a broken state
            self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
        return self

    def map(self, fn, tasks):
        tasks = list(tasks)
        if self.pool is None:
            return [fn(t) for t in tasks]
        return list(self.pool.map(fn, tasks, chunksize=max(1, len(tasks) // (8 * self.workers))))

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------------------------------- files
def _atomic_text(path: Path, text: str) -> None:
    from magface.recordio import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8", newline="\n")


def _write_train(ds: SyntheticDataset, per_identity: list[list[tuple[float, bytes]]], size: int) -> int:
    """insightface's MS1MV2 layout: header record 0, images 1..N, then one (start, end) record per identity."""
    from magface.recordio import IRHeader, MXIndexedRecordIO, pack

    n_images = sum(len(x) for x in per_identity)
    first_id_key = n_images + 1
    end_key = first_id_key + len(per_identity)
    rows, ranges = [], []
    with MXIndexedRecordIO(ds.train_idx, ds.train_rec, "w") as rec:
        # as MXNet's im2rec writes it (see the golden ms1m_layout): flag 2, label slot 0, id 0
        rec.write_idx(0, pack(IRHeader(2, [first_id_key, end_key], 0, 0), b""))
        key = 1
        for label, images in enumerate(per_identity):
            start = key
            for q, jpeg in images:
                rec.write_idx(key, pack(IRHeader(0, float(label), key, 0), jpeg))
                rows.append(f"{key},{label},{q:.6f}")
                key += 1
            ranges.append((start, key))
        for i, (start, end) in enumerate(ranges):
            rec.write_idx(first_id_key + i, pack(IRHeader(2, [start, end], first_id_key + i, 0), b""))
    _atomic_text(ds.train_property, f"{len(per_identity)},{size},{size}")
    _atomic_text(ds.train_quality, "key,label,quality\n" + "\n".join(rows) + "\n")
    return n_images


def _verify_pairs(rng: np.random.Generator, n_ids: int, per_id: int, n_pairs: int) -> list[tuple[int, int, bool]]:
    """Half genuine, half impostor pairs of (identity * per_id + image) indices, in a random order."""
    if n_ids < 2 or per_id < 2:
        raise ValueError(f"a verification set needs >= 2 identities with >= 2 images each, got {n_ids} x {per_id}")
    pairs = []
    for k in range(n_pairs):
        if k < n_pairs // 2:
            i = rng.integers(n_ids)
            a, b = rng.choice(per_id, 2, replace=False)
            pairs.append((i * per_id + a, i * per_id + b, True))
        else:
            i, j = rng.choice(n_ids, 2, replace=False)
            pairs.append((i * per_id + rng.integers(per_id), j * per_id + rng.integers(per_id), False))
    return [pairs[k] for k in rng.permutation(n_pairs)]


def _write_verify(ds: SyntheticDataset, pool: list[list[tuple[float, bytes]]], n_pairs: int, seed: int) -> None:
    from magface.data.binfile import write_bin

    per_id = len(pool[0])
    flat = [img for images in pool for img in images]
    images, issame, rows = [], [], []
    for a, b, same in _verify_pairs(_rng(seed, "verify-pairs"), len(pool), per_id, n_pairs):
        for k in (a, b):
            rows.append(f"{len(images)},{k // per_id},{flat[k][0]:.6f}")
            images.append(flat[k][1])
        issame.append(same)
    ds.verify_bin.parent.mkdir(parents=True, exist_ok=True)
    write_bin(ds.verify_bin, images, issame)
    _atomic_text(ds.verify_quality, "index,identity,quality\n" + "\n".join(rows) + "\n")


def _write_ijb(ds: SyntheticDataset, per_identity, templates: int, media: int, frames: int, seed: int) -> int:
    """insightface's IJB layout. Template t of identity i holds media [t*media, (t+1)*media) of that identity."""
    set_dir = ds.ijb_dir
    (set_dir / "meta").mkdir(parents=True, exist_ok=True)
    (set_dir / "loose_crop").mkdir(parents=True, exist_ok=True)
    tid_mid, pts, quality, owner = [], [], [], []
    template_q: dict[int, list[float]] = {}
    name_no = 0
    for ident, images in enumerate(per_identity):
        for k, (q, jpeg, lmk) in enumerate(images):
            m = k // frames  # media index within the identity
            tid = ident * templates + m // media + 1
            mid = ident * templates * media + m + 1
            name_no += 1
            image = f"{name_no}.jpg"
            _atomic_bytes(set_dir / "loose_crop" / image, jpeg)
            # a detector's faceness score, loosely tracking q as real detectors' scores do
            face = float(np.clip(0.5 + 0.5 * q + _rng(seed, "ijb-faceness", ident, k).normal(0, 0.1), 0.01, 1.0))
            tid_mid.append(f"{image} {tid} {mid}")
            pts.append(" ".join([image, *(f"{v:.3f}" for v in lmk.reshape(-1)), f"{face:.4f}"]))
            quality.append(f"{image},{ident},{q:.6f}")
            template_q.setdefault(tid, []).append(q)
        owner.extend([ident] * templates)
    n_t = len(owner)
    pair_lines = [f"{a + 1} {b + 1} {int(owner[a] == owner[b])}" for a in range(n_t) for b in range(a + 1, n_t)]
    meta = set_dir / "meta"
    _atomic_text(meta / "synth_face_tid_mid.txt", "\n".join(tid_mid) + "\n")
    _atomic_text(meta / "synth_name_5pts_score.txt", "\n".join(pts) + "\n")
    _atomic_text(meta / "synth_template_pair_label.txt", "\n".join(pair_lines) + "\n")
    _atomic_text(ds.ijb_quality, "image_name,identity,quality\n" + "\n".join(quality) + "\n")
    t_rows = [f"{tid},{owner[tid - 1]},{len(qs)},{np.mean(qs):.6f},{min(qs):.6f},{max(qs):.6f}"
              for tid, qs in sorted(template_q.items())]
    _atomic_text(ds.ijb_template_quality,
                 "template_id,identity,n_images,q_mean,q_min,q_max\n" + "\n".join(t_rows) + "\n")
    return name_no


def _impostor_pairs(n_ids: int, templates_per_id: int) -> int:
    """Impostor pairs of the all-pairs IJB protocol: template pairs of different identities."""
    n_t = n_ids * templates_per_id
    return n_t * (n_t - 1) // 2 - n_ids * templates_per_id * (templates_per_id - 1) // 2


def _atomic_bytes(path: Path, data: bytes) -> None:
    from magface.recordio import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


# ---------------------------------------------------------------------------------------- entry points
# Evaluation defaults: 6,000 .bin pairs (3,000 genuine, as LFW's protocol) and 150 x 3 = 450 IJB templates,
# whose all-pairs protocol holds 100,575 impostor pairs (TAR is measurable at FAR 1e-4).
DEFAULTS = dict(num_train_ids=300, images_per_id=24, num_eval_ids=150, eval_images_per_id=12, image_size=112,
                bin_pairs=6000, seed=0, ijb_templates_per_id=3, ijb_media_per_template=2, q_beta=(1.0, 1.0),
                eval_q_beta=None, eval_identity_spread=1.0)


def dataset_params(**kw) -> dict:
    """The full, JSON-ready parameter set of a dataset: `generate`'s keywords (less `workers`) over the defaults."""
    unknown = set(kw) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown synthetic dataset parameter(s): {sorted(unknown)}")
    params = {**DEFAULTS, **kw}
    params["q_beta"] = [float(v) for v in params["q_beta"]]
    # None: the evaluation images draw q like the training images
    params["eval_q_beta"] = [float(v) for v in (params["eval_q_beta"] or params["q_beta"])]
    params["eval_identity_spread"] = float(params["eval_identity_spread"])
    return params


def load_manifest(out_dir) -> dict | None:
    """The manifest of a finished dataset in `out_dir`, or None."""
    path = Path(out_dir) / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(out_dir, params: dict | None = None) -> bool:
    """True when `out_dir` holds a finished dataset of this generator version (and these params, if given;
    missing ones take `generate`'s defaults): the manifest exists and every file it lists has its size."""
    manifest = load_manifest(out_dir)
    if manifest is None or manifest.get("version") != GENERATOR_VERSION:
        return False
    if params is not None and manifest.get("params") != dataset_params(**params):
        return False
    root = Path(out_dir)
    return all((root / rel).is_file() and (root / rel).stat().st_size == size
               for rel, size in manifest.get("files", {}).items())


def generate(out_dir, *, num_train_ids: int = 300, images_per_id: int = 24, num_eval_ids: int = 150,
             eval_images_per_id: int = 12, image_size: int = 112, bin_pairs: int = 6000, seed: int = 0,
             ijb_templates_per_id: int = 3, ijb_media_per_template: int = 2,
             q_beta: tuple[float, float] = (1.0, 1.0), eval_q_beta: tuple[float, float] | None = None,
             eval_identity_spread: float = 1.0, workers: int | None = None) -> SyntheticDataset:
    """Generate (or reuse) a synthetic dataset under `out_dir`; see the package docstring for the files.

    Verification and IJB identities are `num_eval_ids` each, disjoint from training and from each other.
    IJB identities have `ijb_templates_per_id` templates of `ijb_media_per_template` media, each media
    `eval_images_per_id // (templates * media)` frames. q ~ Beta(*q_beta) per training image (uniform by
    default) and ~ Beta(*eval_q_beta) per evaluation image (None: q_beta). `eval_identity_spread` < 1 draws
    the evaluation identities from narrower shape/texture ranges (look-alikes: a harder benchmark).
    """
    params = dataset_params(num_train_ids=num_train_ids, images_per_id=images_per_id, num_eval_ids=num_eval_ids,
                     eval_images_per_id=eval_images_per_id, image_size=image_size, bin_pairs=bin_pairs, seed=seed,
                     ijb_templates_per_id=ijb_templates_per_id, ijb_media_per_template=ijb_media_per_template,
                     q_beta=q_beta, eval_q_beta=eval_q_beta, eval_identity_spread=eval_identity_spread)
    root = Path(out_dir)
    ds = SyntheticDataset(root=root, num_classes=num_train_ids)
    if is_complete(root, params):
        return ds
    frames = eval_images_per_id // (ijb_templates_per_id * ijb_media_per_template)
    if frames < 1:
        raise ValueError(f"eval_images_per_id={eval_images_per_id} is less than ijb_templates_per_id * "
                         f"ijb_media_per_template = {ijb_templates_per_id * ijb_media_per_template}")
    if bin_pairs < 2 or bin_pairs % 2:
        raise ValueError(f"bin_pairs must be an even number >= 2, got {bin_pairs}")
    if not 0.0 < params["eval_identity_spread"] <= 1.0:
        raise ValueError(f"eval_identity_spread must lie in (0, 1], got {eval_identity_spread}")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ds.manifest.unlink(missing_ok=True)  # from here on the directory is not a finished dataset
    for stale in (ds.train_dir, ds.verify_bin.parent, ds.ijb_dir):  # leftovers of another run's parameters
        shutil.rmtree(stale, ignore_errors=True)
    ds.train_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    qb, eqb = tuple(params["q_beta"]), tuple(params["eval_q_beta"])
    spread = params["eval_identity_spread"]
    with _Runner(workers) as run:
        train = run.map(_aligned_images, [(seed, "train", i, images_per_id, image_size, qb, 1.0)
                                          for i in range(num_train_ids)])
        n_train = _write_train(ds, train, image_size)
        del train
        pool = run.map(_aligned_images, [(seed, "verify", i, eval_images_per_id, image_size, eqb, spread)
                                         for i in range(num_eval_ids)])
        _write_verify(ds, pool, bin_pairs // 2 * 2, seed)
        ijb = run.map(_ijb_images, [(seed, i, ijb_templates_per_id * ijb_media_per_template, frames, eqb, spread)
                                    for i in range(num_eval_ids)])
        n_ijb = _write_ijb(ds, ijb, ijb_templates_per_id, ijb_media_per_template, frames, seed)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"):
        files[path.relative_to(root).as_posix()] = path.stat().st_size
    manifest = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "params": params,
        "counts": {"train_identities": num_train_ids, "train_images": n_train, "verify_pairs": bin_pairs,
                   "verify_images": 2 * bin_pairs, "ijb_identities": num_eval_ids, "ijb_images": n_ijb,
                   "ijb_templates": num_eval_ids * ijb_templates_per_id,
                   "ijb_impostor_pairs": _impostor_pairs(num_eval_ids, ijb_templates_per_id)},
        "paths": {k: str(getattr(ds, k).relative_to(root)) for k in
                  ("train_rec", "train_idx", "train_property", "train_quality", "verify_bin", "verify_quality",
                   "ijb_dir", "ijb_quality")},
        "files": files,
        "seconds": round(time.perf_counter() - started, 2),
        "workers": workers,
    }
    _atomic_text(ds.manifest, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return ds
