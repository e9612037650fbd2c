"""Face alignment: a 5-point similarity transform onto the ArcFace template, then a bilinear warp.

This reproduces insightface's `norm_crop` (skimage SimilarityTransform = Umeyama least squares, then
cv2.warpAffine with bilinear interpolation and its default BORDER_CONSTANT black border) without OpenCV: the
warp is numpy + scipy.ndimage.map_coordinates with cv2's pixel-centre convention (integer coordinates are
pixel centres). Near the edge cv2 blends the edge pixel with the black outside (scipy's "grid-constant";
"constant" would blacken the last pixel); cv2 rounds coordinates to 1/32 px and weights to 1/2^15, hence
results within 1 grey level of it. Landmarks outside the image are aligned all the same, as eval_ijbc.py
does (`landmarks_outside` lets the caller count them).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Landmarks (left eye, right eye, nose tip, left mouth corner, right mouth corner) in a 112x112 crop.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


class LandmarkError(ValueError):
    """Landmarks that cannot be used for alignment (outside the image, not finite, wrong shape)."""


def reference_landmarks(size: int | tuple[int, int] = 112) -> np.ndarray:
    """The template for an output of `size` (int or (height, width)), scaled from the 112x112 one.

    A multiple of 128 follows insightface's convention (the 112 template shifted by 8 px, then scaled by
    size/128), so 128x128 crops match models trained on insightface's 128 crops.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if h == w and h % 128 == 0:
        ratio = h / 128.0
        return (ARCFACE_TEMPLATE_112 + np.array([8.0, 0.0])) * ratio
    return ARCFACE_TEMPLATE_112 * np.array([w / 112.0, h / 112.0])


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """3x3 similarity T minimising sum ||dst_i - T(src_i)||^2 (Umeyama 1991, with the reflection guard).

    src, dst: (K, 2) point sets. Returns the homogeneous matrix [[sR, t], [0, 0, 1]].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2:
        raise ValueError(f"umeyama needs two (K, d) arrays of one shape, got {src.shape} and {dst.shape}")
    k, d = src.shape
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / k
    sign = np.ones(d)
    if np.linalg.det(cov) < 0:
        sign[-1] = -1
    u, s, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    t = np.eye(d + 1)
    if rank == 0:
        raise ValueError("umeyama: degenerate point set (all points coincide)")
    if rank == d - 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:
        r = u @ vt
    elif rank == d - 1:
        flip = sign.copy()
        flip[-1] = -1
        r = u @ np.diag(flip) @ vt
    else:
        r = u @ np.diag(sign) @ vt
    var_s = (sc ** 2).sum() / k
    scale = (s @ sign) / var_s if estimate_scale else 1.0
    t[:d, :d] = scale * r
    t[:d, d] = mu_d - scale * (r @ mu_s)
    return t


def warp_affine(image: np.ndarray, matrix: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Bilinear warp of a uint8 HxWxC (or HxW) image: output pixel p samples the input at M^-1 p.

    matrix: 2x3 or 3x3 mapping input (x, y) to output (x, y); out_size: (height, width). Outside the
    input is black, as cv2.warpAffine's default border.
    """
    m = np.eye(3)
    m[:2] = np.asarray(matrix, dtype=np.float64)[:2]
    inv = np.linalg.inv(m)
    oh, ow = out_size
    ys, xs = np.mgrid[0:oh, 0:ow].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    img = np.asarray(image)
    planes = img[..., None] if img.ndim == 2 else img
    out = np.empty((oh, ow, planes.shape[2]), dtype=np.float64)
    for c in range(planes.shape[2]):
        out[..., c] = ndimage.map_coordinates(planes[..., c].astype(np.float64), [sy, sx], order=1,
                                              mode="grid-constant", cval=0.0, prefilter=False)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out[..., 0] if img.ndim == 2 else out


def check_landmarks(landmarks: np.ndarray, where: str = "") -> np.ndarray:
    """(5, 2) float64 landmarks, finite; else LandmarkError naming `where`."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.size != 10:
        raise LandmarkError(f"{where}: expected 5 landmark points (10 numbers), got {lm.size}")
    lm = lm.reshape(5, 2)
    if not np.isfinite(lm).all():
        raise LandmarkError(f"{where}: landmarks are not finite: {lm.ravel().tolist()}")
    return lm


def landmarks_outside(landmarks: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether any of the 5 points lies outside an image of `shape` (H, W, ...) (pixel centres 0..W-1)."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    h, w = shape[:2]
    return bool(((lm[:, 0] < 0) | (lm[:, 0] > w - 1) | (lm[:, 1] < 0) | (lm[:, 1] > h - 1)).any())


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int | tuple[int, int] = 112,
               where: str = "") -> np.ndarray:
    """uint8 HxWx3 image + 5 landmarks (x, y in pixels) -> aligned uint8 size x size x 3 crop. Points outside
    the image are used as they are (the crop is then partly black, as cv2.warpAffine makes it)."""
    lm = check_landmarks(landmarks, where)
    out = (size, size) if isinstance(size, int) else tuple(size)
    m = umeyama(lm, reference_landmarks(out))
    return warp_affine(image, m, out)
