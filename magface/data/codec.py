"""Image codec: encoded bytes <-> RGB uint8 H x W x 3 arrays.

JPEG goes through simplejpeg (libjpeg-turbo bundled in the wheel; no system library needed). MXNet
`.rec` files may also hold PNG or JPEGs libjpeg-turbo cannot convert to RGB (CMYK), so anything
simplejpeg refuses is retried with Pillow before it is declared undecodable.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg

__all__ = ["ImageDecodeError", "decode_jpeg", "encode_jpeg"]

_JPEG_SOI = b"\xff\xd8"


class ImageDecodeError(ValueError):
    """The bytes are not an image this codec can decode."""


def decode_jpeg(data) -> np.ndarray:
    """Decode JPEG (or, via Pillow, PNG/BMP/...) bytes to a C-contiguous RGB uint8 (H, W, 3) array."""
    buf = data if isinstance(data, bytes) else bytes(data)
    if buf[:2] == _JPEG_SOI:
        try:
            return simplejpeg.decode_jpeg(buf, colorspace="RGB")
        except (ValueError, RuntimeError):
            pass  # e.g. CMYK or a recoverable libjpeg warning under strict mode: let Pillow try
    return _decode_pillow(buf)


def _decode_pillow(buf: bytes) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # Pillow is only needed for non-JPEG payloads
        raise ImageDecodeError(f"not a decodable JPEG ({len(buf)} bytes) and Pillow is not installed") from exc
    try:
        with Image.open(io.BytesIO(buf)) as im:
            return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        head = buf[:8].hex()
        raise ImageDecodeError(f"undecodable image ({len(buf)} bytes, starts with {head or 'nothing'}): {exc}") from exc


def encode_jpeg(img: np.ndarray, quality: int = 95, subsampling: str = "420") -> bytes:
    """Encode an RGB uint8 (H, W, 3) array (or grayscale (H, W)) to JPEG.

    4:2:0 chroma subsampling by default, like OpenCV's `imencode` that MXNet's `pack_img` uses.
    """
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_jpeg expects uint8 pixels, got {arr.dtype}")
    if arr.ndim == 2:
        return simplejpeg.encode_jpeg(np.ascontiguousarray(arr[:, :, None]), quality=quality, colorspace="GRAY",
                                      colorsubsampling="Gray")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"encode_jpeg expects an RGB (H, W, 3) array, got shape {arr.shape}")
    return simplejpeg.encode_jpeg(np.ascontiguousarray(arr), quality=quality, colorspace="RGB",
                                  colorsubsampling=subsampling)
