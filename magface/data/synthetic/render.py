"""Rendering of synthetic faces with a known quality q in [0, 1] (numpy only).

Geometry lives in a canonical frame: the 112x112 ArcFace crop, with the five landmarks of each identity
a few pixels away from the ArcFace template. A similarity transform (pose) maps that frame onto the
output canvas; every pixel is shaded by evaluating soft-edged shapes at its canonical coordinates, so the
returned landmarks are exactly where the drawn eyes, nose tip and mouth corners are.

Identity lives in shape and texture only (face outline, hairline, feature positions and sizes, texture
blobs, a fine skin texture). Colours (skin tone, hair, background, lighting) are drawn per image from one
shared range, so nothing that survives blur identifies a person. q then removes identity information
without adding input energy (a quick experiment showed that noise-like degradations make an
under-trained network's feature norm follow energy, not recognisability): resolution 6 + 50 q pixels
across the face, blur, contrast 0.4 + 0.6 q, an occluder with probability 1 - q, and mild fixed noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from magface.evaluation.alignment import ARCFACE_TEMPLATE_112  # landmarks land where alignment expects them

__all__ = ["Identity", "Pose", "degrade", "loose_pose", "make_identities", "random_pose", "render", "render_face",
           "sample_identity"]

CANON = 112.0  # side of the canonical frame, in canonical pixels
_TEX = 28  # side of an identity's fine-texture grid (canonical pixels / 4)
_AA = 0.8  # half-width of the soft shape edge, in canonical pixels


@dataclass(frozen=True)
class Identity:
    """One synthetic person: geometry and texture in the canonical 112x112 frame (see module doc)."""

    landmarks: np.ndarray  # (5, 2) eye centres, nose tip, mouth corners
    face: np.ndarray  # cx, cy, half-width, half-height, superellipse exponent, jaw taper
    hair: np.ndarray  # hairline height above the eyes, hairline curvature, crown height, side width
    eyes: np.ndarray  # half-width, half-height, iris radius, brow gap, brow thickness, brow length, brow tilt
    nose: np.ndarray  # ridge width, nostril spacing, nostril radius, bridge start (y)
    mouth: np.ndarray  # lip thickness, curvature (px, + = smile)
    blobs: np.ndarray  # (K, 4) x, y, sigma, amplitude (multiplicative darkening of the skin)
    shading: np.ndarray  # (112, 112) float32 skin shading: 1 - blobs + a fine texture, canonical frame


@dataclass(frozen=True)
class Pose:
    """Similarity transform canonical -> output pixels: p = scale * R(angle) (c - 56) + centre."""

    scale: float
    angle: float  # radians
    centre: tuple[float, float]

    def matrix(self) -> np.ndarray:
        c, s = np.cos(self.angle) * self.scale, np.sin(self.angle) * self.scale
        half = CANON / 2
        cx, cy = self.centre
        return np.array([[c, -s, cx - c * half + s * half], [s, c, cy - s * half - c * half]])

    def apply(self, pts: np.ndarray) -> np.ndarray:
        m = self.matrix()
        return pts @ m[:, :2].T + m[:, 2]


def sample_identity(rng: np.random.Generator, spread: float = 1.0) -> Identity:
    """A random identity: landmarks within a few pixels of the template, shape and texture parameters.

    `spread` scales every uniform draw towards the middle of its range (1: the full ranges; 0.5: half as
    wide), so identities look more alike and recognition gets harder; the draws themselves are unchanged.
    """
    if not 0.0 < spread <= 1.0:
        raise ValueError(f"identity spread must lie in (0, 1], got {spread}")

    def u(lo, hi, size=None):
        x = rng.uniform(lo, hi, size)
        return x if spread == 1.0 else (lo + hi) / 2 + spread * (x - (lo + hi) / 2)

    t = ARCFACE_TEMPLATE_112
    # eyes move together (vertical, spacing) plus a little asymmetry; mouth corners likewise
    eye_dy, eye_spread = u(-2.5, 2.5), u(-2.5, 2.5)
    le = t[0] + [-eye_spread + u(-0.8, 0.8), eye_dy + u(-0.8, 0.8)]
    re = t[1] + [eye_spread + u(-0.8, 0.8), eye_dy + u(-0.8, 0.8)]
    nose = t[2] + [u(-1.5, 1.5), u(-2.5, 2.5)]
    m_dy, m_spread = u(-2.5, 2.5), u(-3.0, 3.0)
    lm = t[3] + [-m_spread + u(-0.8, 0.8), m_dy + u(-0.8, 0.8)]
    rm = t[4] + [m_spread + u(-0.8, 0.8), m_dy + u(-0.8, 0.8)]
    face = np.array([56 + u(-1.5, 1.5), u(60, 64), u(33, 41), u(45, 52), u(1.8, 2.8), u(0.0, 0.35)])
    hair = np.array([u(14, 30), u(-6, 10), u(4, 12), u(0, 6)])
    eyes = np.array([u(5.0, 7.5), u(2.0, 3.6), u(1.8, 2.8), u(7, 11), u(1.2, 3.0), u(8, 14), u(-0.3, 0.3)])
    nosep = np.array([u(2.5, 6.0), u(3.5, 7.0), u(1.0, 2.0), u(54, 62)])
    mouth = np.array([u(1.6, 4.0), u(-3.5, 3.5)])
    k = int(rng.integers(4, 9))
    # texture blobs anywhere on the face: 70 % darker (moles, stubble patches), 30 % lighter
    bx = face[0] + u(-0.8, 0.8, k) * face[2]
    by = face[1] + u(-0.75, 0.85, k) * face[3]
    blobs = np.stack([bx, by, u(1.2, 4.5, k), u(0.15, 0.45, k) * rng.choice([-1.0, 1.0], k, p=[0.3, 0.7])], 1)
    g = _gauss_matrix(_TEX, 0.8)
    tex = g @ rng.standard_normal((_TEX, _TEX)) @ g.T
    up = _bilinear_matrix(int(CANON), _TEX)
    tex = up @ (tex / (tex.std() + 1e-8) * (0.10 * spread)) @ up.T
    gy, gx = np.mgrid[0:int(CANON), 0:int(CANON)].astype(np.float64)
    shading = 1.0 + tex
    for x0, y0, sig, amp in blobs:
        shading -= amp * np.exp(-((gx - x0) ** 2 + (gy - y0) ** 2) / (2 * sig * sig))
    lmk = np.array([le, re, nose, lm, rm], dtype=np.float64)
    return Identity(landmarks=lmk, face=face, hair=hair, eyes=eyes, nose=nosep, mouth=mouth,
                    blobs=blobs, shading=shading.astype(np.float32))


def make_identities(n: int, rng: np.random.Generator) -> list[Identity]:
    """`n` independent identities drawn from `rng`."""
    return [sample_identity(rng) for _ in range(n)]


def random_pose(rng: np.random.Generator, size: int = 112) -> Pose:
    """Alignment jitter of an aligned crop: +-6 degrees, +-5 % scale, +-2.5 px shift (for size 112)."""
    k = size / CANON
    return Pose(scale=k * rng.uniform(0.95, 1.05), angle=np.deg2rad(rng.uniform(-6, 6)),
                centre=(size / 2 + k * rng.uniform(-2.5, 2.5), size / 2 + k * rng.uniform(-2.5, 2.5)))


def loose_pose(rng: np.random.Generator, size: int) -> Pose:
    """A face somewhere in a loose crop of `size` px: random scale, in-plane rotation and offset."""
    scale = rng.uniform(0.85, 1.1) * size / 160.0
    slack = max(0.0, (size - CANON * scale) / 2 - 4)
    return Pose(scale=scale, angle=np.deg2rad(rng.uniform(-15, 15)),
                centre=(size / 2 + rng.uniform(-slack, slack), size / 2 + rng.uniform(-slack, slack)))


# ---------------------------------------------------------------------------------------- shapes
def _soft(sd: np.ndarray, aa: float) -> np.ndarray:
    """Coverage from a signed distance (negative inside), antialiased over about one output pixel."""
    return np.clip(0.5 - sd / (2 * aa), 0.0, 1.0)


def _ellipse(x, y, cx, cy, a, b, aa, p=2.0):
    r = (np.abs((x - cx) / a) ** p + np.abs((y - cy) / b) ** p) ** (1.0 / p)
    return _soft((r - 1.0) * min(a, b), aa)


def _segment(x, y, x0, y0, x1, y1, half_width, aa):
    """A stroke of `half_width` between two points (round caps)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    d = np.hypot(x - x0 - t * dx, y - y0 - t * dy)
    return _soft(d - half_width, aa)


def _blend(img: np.ndarray, alpha: np.ndarray, colour) -> None:
    """In place: img <- img + alpha (colour - img)."""
    img += alpha[..., None] * (np.asarray(colour, np.float32) - img)


def _canonical_grid(pose: Pose, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Canonical coordinates of each output pixel centre (pixel (i, j) has centre (j, i), as in cv2)."""
    m = pose.matrix()
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    jj, ii = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    x = inv[0, 0] * jj + inv[0, 1] * ii + inv[0, 2]
    y = inv[1, 0] * jj + inv[1, 1] * ii + inv[1, 2]
    return x.astype(np.float32), y.astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field (a 4x4 grid of colours around one base colour, bilinearly upsampled)."""
    base = rng.uniform(0.1, 0.9, 3)
    grid = np.clip(base + rng.normal(0, 0.12, (4, 4, 3)), 0, 1)
    return _separable(_bilinear_matrix(size, 4), grid.astype(np.float32))


def _bilinear_lookup(field: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """field sampled at (x, y) with bilinear interpolation, coordinates clamped to the edge."""
    n_y, n_x = field.shape
    x = np.clip(x, 0, n_x - 1.001)
    y = np.clip(y, 0, n_y - 1.001)
    x0, y0 = x.astype(np.intp), y.astype(np.intp)
    fx, fy = x - x0, y - y0
    top = field[y0, x0] * (1 - fx) + field[y0, x0 + 1] * fx
    bottom = field[y0 + 1, x0] * (1 - fx) + field[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


class _Scene:
    """An output canvas plus the canonical coordinates of its pixels; paints shapes inside bounding boxes."""

    def __init__(self, pose: Pose, size: int, img: np.ndarray):
        self.pose, self.size, self.img = pose, size, img
        self.x, self.y = _canonical_grid(pose, size)
        self.aa = _AA / pose.scale

    def box(self, cx: float, cy: float, rx: float, ry: float) -> tuple[slice, slice]:
        """Output-pixel slices covering the canonical box centre (cx, cy), half-sizes (rx, ry)."""
        corners = np.array([[cx - rx, cy - ry], [cx + rx, cy - ry], [cx - rx, cy + ry], [cx + rx, cy + ry]])
        p = self.pose.apply(corners)
        lo = np.clip(np.floor(p.min(0)).astype(int) - 2, 0, self.size)
        hi = np.clip(np.ceil(p.max(0)).astype(int) + 3, 0, self.size)
        return slice(lo[1], hi[1]), slice(lo[0], hi[0])

    def paint(self, box: tuple[slice, slice], colour, alpha_fn) -> None:
        """Blend `colour` over the box with coverage alpha_fn(x, y, aa) (canonical coordinates)."""
        a = alpha_fn(self.x[box], self.y[box], self.aa)
        if a.size:
            _blend(self.img[box], a, colour)


def render(identity: Identity, pose: Pose, size: int, rng: np.random.Generator,
           occlude: bool = False) -> np.ndarray:
    """The clean scene as float32 RGB in [0, 1] (H, W, 3): background, head, features, optional occluder."""
    sc = _Scene(pose, size, _background(rng, size))
    fx, fy, fa, fb, fp, taper = identity.face
    le, re, nose, lmc, rmc = identity.landmarks
    # skin tone and hair colour: per image, from one shared range (colour must not identify a person)
    tone = rng.uniform(0, 1)
    skin = np.array([0.93, 0.78, 0.66]) * (1 - tone) + np.array([0.42, 0.28, 0.20]) * tone
    skin = (skin * rng.uniform(0.93, 1.07, 3)).astype(np.float32)
    hair_col = rng.uniform(0.05, 0.5) * np.array([1.0, 0.85, 0.7]) * rng.uniform(0.85, 1.15, 3)
    light = rng.uniform(-0.25, 0.25, 2)

    hh, hcurve, crown, side = identity.hair
    head_box = sc.box(fx, fy - crown / 2, fa + side + 2, fb + crown / 2 + 2)
    x, y, img = sc.x[head_box], sc.y[head_box], sc.img[head_box]
    # head: superellipse narrowed towards the chin by the jaw taper, shaded by the identity's skin
    # texture (blobs + fine texture) and one light direction per image
    half_w = fa * (1 - taper * np.clip((y - fy) / fb, 0, None) ** 2)
    r = (np.abs((x - fx) / half_w) ** fp + np.abs((y - fy) / fb) ** fp) ** (1 / fp)
    head = _soft((r - 1) * fa, sc.aa)
    shade = _bilinear_lookup(identity.shading, x, y)
    shade *= 1 + light[0] * (x - fx) / fa + light[1] * (y - fy) / fb
    img += head[..., None] * (np.clip(shade, 0.2, 1.6)[..., None] * skin - img)
    # hair: the part of a slightly larger head above a curved hairline
    hairline = 0.5 * (le[1] + re[1]) - hh + hcurve * ((x - fx) / fa) ** 2
    r_hair = (np.abs((x - fx) / (fa + side)) ** fp + np.abs((y - fy + crown) / (fb + crown)) ** fp) ** (1 / fp)
    _blend(img, _soft((r_hair - 1) * fa, sc.aa) * _soft(y - hairline, sc.aa), hair_col)

    # eyes: white, iris, brow
    ew, eh, iris, brow_gap, brow_t, brow_len, brow_tilt = identity.eyes
    for (ex, ey), side_sign in ((le, -1), (re, 1)):
        eye_box = sc.box(ex, ey, ew + 1, eh + 1)
        sc.paint(eye_box, (0.92, 0.92, 0.9), lambda x, y, aa: _ellipse(x, y, ex, ey, ew, eh, aa))
        sc.paint(eye_box, (0.08, 0.06, 0.05), lambda x, y, aa: _ellipse(x, y, ex, ey, iris, iris, aa))
        dx = 0.5 * brow_len * np.cos(brow_tilt)
        dy = 0.5 * brow_len * np.sin(brow_tilt) * side_sign
        by = ey - brow_gap - eh
        sc.paint(sc.box(ex, by, abs(dx) + brow_t + 1, abs(dy) + brow_t + 1), hair_col,
                 lambda x, y, aa: _segment(x, y, ex - dx, by + dy, ex + dx, by - dy, brow_t, aa))
    # nose: a shaded ridge from the bridge to the tip, two nostrils
    rw, nsp, nr, bridge = identity.nose
    nx, ny = nose
    top = min(bridge, ny - 4)
    sc.paint(sc.box(nx, (top + ny) / 2, rw, (ny - top) / 2 + rw), skin * 0.7,
             lambda x, y, aa: 0.6 * _segment(x, y, nx, top, nx, ny, rw / 2, aa))
    for s in (-0.5, 0.5):
        sc.paint(sc.box(nx + s * nsp, ny + 1, nr * 1.3 + 1, nr + 1), skin * 0.35,
                 lambda x, y, aa: _ellipse(x, y, nx + s * nsp, ny + 1.0, nr * 1.3, nr, aa))
    # mouth: a lip band through both corners, bowed by the curvature
    thick, curve = identity.mouth
    mx, half = 0.5 * (lmc[0] + rmc[0]), 0.5 * (rmc[0] - lmc[0])

    def lips(x, y, aa):
        t = np.clip((x - mx) / half, -1, 1)
        centre_y = lmc[1] + (rmc[1] - lmc[1]) * (t + 1) / 2 + curve * (1 - t * t)
        return _soft(np.hypot(np.clip(np.abs(x - mx) - half, 0, None), y - centre_y) - thick / 2, aa)

    my = 0.5 * (lmc[1] + rmc[1])
    sc.paint(sc.box(mx, my + curve / 2, half + thick, abs(rmc[1] - lmc[1]) / 2 + abs(curve) + thick),
             skin * np.array([0.75, 0.45, 0.45], np.float32), lips)
    if occlude:
        _occluder(sc, identity, rng)
    return sc.img


def _occluder(sc: _Scene, identity: Identity, rng: np.random.Generator) -> None:
    """Sunglasses, a mask over the lower face, or a hand-like box somewhere on the face."""
    fx, fy, fa, fb = identity.face[:4]
    le, re, nose = identity.landmarks[:3]
    colour = np.clip(rng.uniform(0.05, 0.85) * rng.uniform(0.85, 1.15, 3), 0, 1)
    kind = rng.integers(3)
    if kind == 0:  # glasses band over both eyes
        cx, cy, w, h, p = fx, 0.5 * (le[1] + re[1]) + rng.uniform(-2, 2), fa * 0.95, rng.uniform(5, 9), 6.0
    elif kind == 1:  # mask from below the nose down
        top = nose[1] + rng.uniform(-6, 3)
        cx, cy, w, h, p = fx, fy + fb, fa * 1.05, fy + fb - top, 4.0
    else:  # a box covering 20-40 % of the face
        w, h = rng.uniform(0.45, 0.75) * fa, rng.uniform(0.45, 0.75) * fb
        cx, cy, p = fx + rng.uniform(-0.6, 0.6) * fa, fy + rng.uniform(-0.6, 0.6) * fb, 8.0
    sc.paint(sc.box(cx, cy, w + 1, h + 1), colour, lambda x, y, aa: _ellipse(x, y, cx, cy, w, h, aa, p=p))


# ---------------------------------------------------------------------------------------- degradation
def _separable(m: np.ndarray, img: np.ndarray) -> np.ndarray:
    """Apply the 1-D resampling matrix m along both image axes: m @ channel @ m.T for each channel."""
    return np.ascontiguousarray((m @ img.transpose(2, 0, 1) @ m.T).transpose(1, 2, 0))


@lru_cache(maxsize=256)
def _area_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Box-filter downsampling (each output pixel averages the input pixels it covers, fractionally)."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    w = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


@lru_cache(maxsize=256)
def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear upsampling with aligned pixel centres and clamped edges."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = src - i0
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] += 1 - f
    m[np.arange(n_out), i1] += f
    return m


@lru_cache(maxsize=256)
def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    """Gaussian blur along one axis; rows renormalised so the edges keep their brightness."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    w = np.exp(-0.5 * (d / max(sigma, 1e-3)) ** 2)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


@lru_cache(maxsize=1024)
def _degrade_matrix(n: int, r: int, sigma: float) -> np.ndarray:
    """n -> r -> n pixels along one axis (area down, bilinear up), then blur: one n x n matrix."""
    m = _bilinear_matrix(n, r) @ _area_matrix(r, n) if r < n else np.eye(n, dtype=np.float32)
    return _gauss_matrix(n, sigma) @ m if sigma > 0.05 else m


def resolution(q: float) -> float:
    """Pixels across the 112-pixel canonical face at quality q."""
    return 6.0 + 50.0 * q


def degrade(img: np.ndarray, q: float, face_scale: float, rng: np.random.Generator) -> np.ndarray:
    """Apply quality q to a rendered float image; returns uint8 RGB.

    `face_scale` is output pixels per canonical pixel, so a loose crop loses as much facial detail as an
    aligned one at the same q.
    """
    n = img.shape[0]
    r = max(2, int(round(resolution(q) * n / (CANON * face_scale))))
    sigma = round(1.2 * (1 - q) * face_scale, 2)
    img = _separable(_degrade_matrix(n, r, sigma), img)
    contrast = 0.4 + 0.6 * q
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = mean + contrast * (img - mean)
    img = img + rng.normal(0, 1.5 / 255, img.shape).astype(np.float32)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def render_face(identity: Identity, q: float, rng: np.random.Generator, size: int = 112,
                pose: Pose | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image of `identity` at quality q: (uint8 size x size x 3 RGB, float32 (5, 2) landmarks).

    Without `pose`, the face is an aligned crop with small pose jitter (the ArcFace template up to pose).
    The landmarks are the drawn eye centres, nose tip and mouth corners, in output pixels.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quality q must lie in [0, 1], got {q}")
    pose = pose or random_pose(rng, size)
    occlude = bool(rng.uniform() < 1.0 - q)
    with _blas_controller().limit(limits=1, user_api="blas"):
        img = render(identity, pose, size, rng, occlude=occlude)
        out = degrade(img, q, pose.scale, rng)
    return out, pose.apply(identity.landmarks).astype(np.float32)


@lru_cache(maxsize=1)
def _blas_controller():
    # 112 x 112 products: BLAS threads only add overhead (20x slower on a busy 2-core machine), and the
    # dataset writer already runs one process per core.
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
