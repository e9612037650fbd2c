"""IJB-B / IJB-C 1:1 verification in insightface's layout: protocol files, aligned crops, templates, TAR@FAR.

Layout (docs/architecture.md): `<set>/meta/<name>_face_tid_mid.txt` (`image template_id media_id`),
`<set>/meta/<name>_template_pair_label.txt` (`tid1 tid2 label`), `<set>/meta/<name>_name_5pts_score.txt`
(`image x1 y1 ... x5 y5 faceness`), `<set>/loose_crop/<image>`.

Memory at IJB-C scale (469,375 images, 23,124 templates, 15,658,489 pairs): the protocol arrays (~250 MB of
int64 pairs + 19 MB landmarks), the per-image features (469k x 512 float32 = 0.96 GB, kept until the
templates are built), the template features (23k x 512 x 4 B = 47 MB per rule) and the scores (63 MB
float32). Images stream through the Ray Data actor pool and are never held together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from magface.evaluation.alignment import LandmarkError, align_face, landmarks_outside, warp_affine

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
CONVENTIONS = ("insightface", "magface", "magface_plus")
DEFAULT_CONVENTIONS = ("insightface", "magface_plus")


@dataclass(frozen=True)
class Convention:
    """One named IJB template convention (docs/conventions.md), equal to its reference script.

    - "insightface": arcface_torch `eval_ijbc.py`, with its switches (all on there): `norm_score` keeps each
      image feature's norm, `detector_score` multiplies it by the faceness score, `flip` uses F1 + F2 (F2 the
      feature of the mirrored image); media mean, template sum, normalised.
    - "magface" / "magface_plus": MagFace `eval_ijb.py` with `qlt=0` / `qlt=1`: raw F1 (that script has no
      flip), no faceness; the switches do not apply.
    """

    rule: str
    norm_score: bool = True
    detector_score: bool = True
    flip: bool = True

    def __post_init__(self):
        if self.rule not in CONVENTIONS:
            raise ValueError(f"unknown IJB convention {self.rule!r}; known: {', '.join(CONVENTIONS)}")

    @property
    def name(self) -> str:
        """'insightface' with its script's defaults, else e.g. 'insightface_N1D0F1' (its TestMode letters)."""
        if self.rule != "insightface" or (self.norm_score and self.detector_score and self.flip):
            return self.rule
        return f"insightface_N{int(self.norm_score)}D{int(self.detector_score)}F{int(self.flip)}"


def parse_conventions(names=DEFAULT_CONVENTIONS, *, norm_score: bool = True, detector_score: bool = True,
                      flip: bool = True) -> list[Convention]:
    """Conventions from names (a list or 'a,b'); the switches apply to "insightface"."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = [n if isinstance(n, Convention) else
           Convention(n, norm_score, detector_score, flip) if n == "insightface" else Convention(n) for n in names]
    if not out:
        raise ValueError(f"no IJB convention given; known: {', '.join(CONVENTIONS)}")
    return list(dict.fromkeys(out))


class ProtocolError(ValueError):
    """A protocol file that cannot be used: the message names the file and the 1-based line."""


class BadImageError(ValueError):
    """An image that does not decode or cannot be aligned: the message names the file (and protocol line)."""


@dataclass
class IJBProtocol:
    """One IJB 1:1 protocol. Arrays are aligned with `images` (one row per face)."""

    name: str
    set_dir: Path
    images: list[str]
    template_ids: np.ndarray  # (N,) int64
    media_ids: np.ndarray  # (N,) int64
    landmarks: np.ndarray  # (N, 5, 2) float32, pixels of the loose crop
    faceness: np.ndarray  # (N,) float32 detector score
    pairs: np.ndarray  # (P, 2) int64 template ids
    labels: np.ndarray  # (P,) int8, 1 = same subject
    files: dict = field(default_factory=dict)  # which file each part came from (for messages)

    @property
    def image_dir(self) -> Path:
        return self.set_dir / "loose_crop"

    def where(self, i: int) -> str:
        """'<image path> (<landmark file>:<line>)': where image row i comes from, for error messages."""
        return f"{self.image_dir / self.images[i]} ({self.files['landmarks']}:{i + 1})"


# ---------------------------------------------------------------------------------------- protocol files
def find_ijb_dir(data_root: str | Path, name: str) -> Path:
    """`<root>/<NAME>` or `<root>/ijb/<NAME>` (NAME = IJBB, IJBC, SYNTH, ...)."""
    root = Path(data_root)
    candidates = [root / name.upper(), root / "ijb" / name.upper(), root / name]
    for c in candidates:
        if (c / "meta").is_dir():
            return c
    raise FileNotFoundError(
        f"IJB set {name.upper()!r} not found: none of {[str(c / 'meta') for c in candidates]} exists. "
        f"Expected insightface's layout <root>/{name.upper()}/meta/{name.lower()}_face_tid_mid.txt etc.")


def _read_columns(path: Path, kinds: str, what: str) -> list[np.ndarray]:
    """Whitespace-separated columns; kinds is one letter per column: s(tring), i(nt), f(loat).

    pyarrow's CSV reader does the 15.6M-line pair file in about a second. It splits on single spaces, so a
    file with runs of blanks, tabs or trailing blanks (the real IJB release has some) is first rewritten in
    memory to single spaces, as both reference readers accept it. If it still refuses, a line-by-line pass
    finds the first bad line so the error names it. "nan" is a number here, never an empty field: the
    caller's finiteness check names its line.
    """
    if not path.is_file():
        raise ProtocolError(f"missing protocol file {path} ({what}); expected a text file with "
                            f"{len(kinds)} space-separated columns per line")
    import io
    import re

    import pyarrow as pa
    from pyarrow import csv

    names = [f"c{i}" for i in range(len(kinds))]
    types = {n: {"s": pa.string(), "i": pa.int64(), "f": pa.float64()}[k] for n, k in zip(names, kinds)}

    def parse(source):
        table = csv.read_csv(
            source,
            read_options=csv.ReadOptions(column_names=names, block_size=1 << 24),
            parse_options=csv.ParseOptions(delimiter=" ", ignore_empty_lines=True),
            convert_options=csv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False,
                                               quoted_strings_can_be_null=False),
        )
        return [table.column(n) for n in names]

    try:
        cols = parse(path)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        data = path.read_bytes()
        tidy = re.sub(rb"[ \t]*(\r?\n)[ \t]*", rb"\n", re.sub(rb"[ \t]+", b" ", data)).strip(b" \t")
        try:
            cols = parse(io.BytesIO(tidy))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            _raise_first_bad_line(path, kinds, what)
            raise ProtocolError(f"{path}: cannot parse {what}: {e}") from e  # a failure the scan did not see
    out = []
    for c, k in zip(cols, kinds):
        arr = c.to_numpy()
        out.append(list(arr) if k == "s" else arr)
    return out


def _raise_first_bad_line(path: Path, kinds: str, what: str) -> None:
    conv = {"s": str, "i": int, "f": float}
    with open(path, "r", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != len(kinds):
                raise ProtocolError(f"{path}:{lineno}: expected {len(kinds)} fields ({what}), got {len(parts)}: "
                                    f"{line.strip()[:120]!r}")
            for j, (p, k) in enumerate(zip(parts, kinds)):
                try:
                    conv[k](p)
                except ValueError:
                    kind = {"i": "an integer", "f": "a number", "s": "text"}[k]
                    raise ProtocolError(f"{path}:{lineno}: field {j + 1} should be {kind}, got {p!r}") from None


def read_protocol(set_dir: str | Path, name: str | None = None) -> IJBProtocol:
    """Parse and cross-check one IJB set's three meta files. `name` defaults to the folder name, lowercased."""
    set_dir = Path(set_dir)
    name = (name or set_dir.name).lower()
    meta = set_dir / "meta"
    f_tid = meta / f"{name}_face_tid_mid.txt"
    f_pairs = meta / f"{name}_template_pair_label.txt"
    f_lmk = meta / f"{name}_name_5pts_score.txt"

    images, tids, mids = _read_columns(f_tid, "sii", "image template_id media_id")
    lmk_cols = _read_columns(f_lmk, "s" + "f" * 11, "image x1 y1 ... x5 y5 faceness")
    t1, t2, labels = _read_columns(f_pairs, "iii", "template_id1 template_id2 label")

    lmk_images = lmk_cols[0]
    if len(lmk_images) != len(images):
        raise ProtocolError(f"{f_lmk}: {len(lmk_images)} lines, but {f_tid} has {len(images)}; "
                            f"both must list the same faces in the same order")
    if lmk_images != images:
        i = next(k for k, (a, b) in enumerate(zip(lmk_images, images)) if a != b)
        raise ProtocolError(f"{f_lmk}:{i + 1}: image {lmk_images[i]!r} but {f_tid}:{i + 1} names {images[i]!r}; "
                            f"both files must list the same faces in the same order")
    landmarks = np.stack(lmk_cols[1:11], axis=1).astype(np.float32).reshape(-1, 5, 2)
    faceness = np.asarray(lmk_cols[11], dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(landmarks.reshape(len(images), -1)).all(1))
    if bad.size:
        raise ProtocolError(f"{f_lmk}:{bad[0] + 1}: landmarks are not finite")

    labels = np.asarray(labels)
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise ProtocolError(f"{f_pairs}:{bad[0] + 1}: label must be 0 or 1, got {labels[bad[0]]}")
    pairs = np.stack([t1, t2], axis=1).astype(np.int64)
    known = np.unique(tids)
    unknown = ~np.isin(pairs, known)
    if unknown.any():
        row, col = np.argwhere(unknown)[0]
        raise ProtocolError(f"{f_pairs}:{row + 1}: template {pairs[row, col]} is not in {f_tid} "
                            f"({int(unknown.any(1).sum())} pair(s) name unknown templates)")
    return IJBProtocol(name=name, set_dir=set_dir, images=images, template_ids=np.asarray(tids, np.int64),
                       media_ids=np.asarray(mids, np.int64), landmarks=landmarks, faceness=faceness,
                       pairs=pairs, labels=labels.astype(np.int8),
                       files={"templates": f_tid, "pairs": f_pairs, "landmarks": f_lmk})


# ---------------------------------------------------------------------------------------- images
def load_face(data: bytes | None, path: str | None, landmarks: np.ndarray | None, size: int,
              where: str, info: dict | None = None) -> np.ndarray:
    """Read + decode one image and bring it to size x size: 5-point alignment when landmarks are given, else
    a plain bilinear resize when the size differs (.bin sets are already aligned). Raises BadImageError.
    Landmarks outside the image are aligned as OpenCV would (eval_ijbc.py keeps such faces); `info`, when
    given, receives "landmarks_outside": bool so the caller can count them."""
    from magface.data.codec import decode_jpeg

    try:
        if data is None:
            data = Path(path).read_bytes()
        img = decode_jpeg(data)
    except Exception as e:  # noqa: BLE001 - any decoder/IO failure is reported with the file
        raise BadImageError(f"{where}: cannot read image ({type(e).__name__}: {e})") from None
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    try:
        if landmarks is not None:
            face = align_face(img, landmarks, size, where=where)
            if info is not None:
                info["landmarks_outside"] = landmarks_outside(landmarks, img.shape)
            return face
    except LandmarkError as e:
        raise BadImageError(str(e)) from None
    if img.shape[:2] != (size, size):
        h, w = img.shape[:2]
        # output pixel centres map onto input pixel centres of the same relative position
        m = np.array([[size / w, 0, 0.5 * size / w - 0.5], [0, size / h, 0.5 * size / h - 0.5]])
        img = warp_affine(img, m, (size, size))
    return img


def protocol_images(protocol: IJBProtocol):
    """The protocol's faces as an image table for magface.evaluation.features.extract_features."""
    from magface.evaluation.features import image_table

    d, lm_file = str(protocol.image_dir), str(protocol.files["landmarks"])
    paths = [f"{d}/{im}" for im in protocol.images]
    where = [f"{p} ({lm_file}:{i})" for i, p in enumerate(paths, 1)]  # as protocol.where(i - 1)
    return image_table(paths=paths, landmarks=protocol.landmarks.reshape(-1, 10), where=where)


# ---------------------------------------------------------------------------------------- scoring
def ijb_verification(protocol: IJBProtocol, features: np.ndarray, magnitudes: np.ndarray,
                     valid: np.ndarray | None = None, *, flip_features: np.ndarray | None = None,
                     flip_magnitudes: np.ndarray | None = None, conventions=DEFAULT_CONVENTIONS,
                     fars=FARS) -> dict:
    """Templates under each convention (see `Convention`), cosine scores for every pair, TAR@FAR under both
    tie conventions ("nearest": the published numbers; "strict").

    features: (N, D) unit F1, magnitudes: (N,) |F1|; flip_features / flip_magnitudes: unit (F1 + F2) and its
    norm, needed by an insightface convention with flip. valid: (N,) bool (False = image failed and skipped).
    conventions: Convention objects or names (names take the insightface defaults).
    Pairs whose template lost all its images score -1 (counted as a rejection), and are counted.
    Returns {"tar_at_far": {name: {tie convention: {far: tar}}}, "scores": {name: (P,)}, "labels", ...}.
    """
    from magface.evaluation.metrics import tar_at_far
    from magface.evaluation.templates import aggregate_templates, score_pairs

    convs = parse_conventions(conventions)
    n = len(protocol.images)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    tids, mids = protocol.template_ids[valid], protocol.media_ids[valid]
    present = np.isin(protocol.pairs, np.unique(tids)).all(1)
    p1, p2 = protocol.pairs[present, 0], protocol.pairs[present, 1]
    genuine = protocol.labels == 1  # bool once: tar_at_far then skips its label checks
    out = {"tar_at_far": {}, "scores": {}, "labels": protocol.labels, "n_images": n,
           "n_images_used": int(valid.sum()), "n_templates": int(np.unique(protocol.template_ids).size),
           "n_pairs": int(len(protocol.pairs)), "n_pairs_missing_template": int((~present).sum()),
           "conventions": {c.name: {"rule": c.rule, "norm_score": c.norm_score, "detector_score": c.detector_score,
                                    "flip": c.flip} if c.rule == "insightface" else {"rule": c.rule}
                           for c in convs}}
    for c in convs:
        weights = None
        if c.rule == "insightface":
            if c.flip and flip_features is None:
                raise ValueError(f"IJB convention {c.name}: flip needs the mirrored images' features "
                                 "(extract with flip, or turn the convention's flip off)")
            f, m = (flip_features, flip_magnitudes) if c.flip else (features, magnitudes)
            m = m[valid] if c.norm_score else None  # unit rows when the norm is not kept
            weights = protocol.faceness[valid] if c.detector_score else None
        else:
            f, m = features, magnitudes[valid]
        t_ids, t_feats = aggregate_templates(f[valid], m, tids, mids, mode=c.rule, weights=weights)
        scores = np.full(len(protocol.pairs), -1.0, t_feats.dtype)
        scores[present] = score_pairs(t_feats, t_ids, p1, p2)
        out["scores"][c.name] = scores
        out["tar_at_far"][c.name] = {tie: tar_at_far(scores, genuine, fars, convention=tie)
                                     for tie in ("nearest", "strict")}
    return out
