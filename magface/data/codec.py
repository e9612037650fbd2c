"""Image codec: encoded bytes <-> RGB uint8 H x W x 3 arrays.

JPEG goes through simplejpeg (libjpeg-turbo bundled in the wheel; no system library needed). MXNet
`.rec` files may also hold PNG or JPEGs libjpeg-turbo cannot convert to RGB (CMYK), so anything
simplejpeg refuses is retried with Pillow before it is declared undecodable.

Sizes are checked on the header before any pixel is decoded (libjpeg-turbo and Pillow both read dimensions
without decoding): an 854-byte JPEG can declare 16000 x 16000 pixels, i.e. 730 MiB of RGB. `decode_jpeg`
refuses images larger than `max_pixels` (default MAX_PIXELS) or, given `size`, of any other size.
"""

from __future__ import annotations

import io
import struct
from contextlib import contextmanager

import numpy as np
import simplejpeg

__all__ = ["MAX_PIXELS", "ImageDecodeError", "check_size", "decode_jpeg", "encode_jpeg", "image_size"]

_JPEG_SOI = b"\xff\xd8"
MAX_PIXELS = 1 << 25  # 33.5 Mpx, 96 MiB of RGB: an 8K frame or a 24 Mpx photo pass, a decompression bomb not


class ImageDecodeError(ValueError):
    """The bytes are not an image this codec can decode."""


def check_size(height: int, width: int, size: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse (ImageDecodeError) a header's dimensions: not `size` (height, width) when given, or too many pixels."""
    if size is not None and (height, width) != tuple(size):
        raise ImageDecodeError(f"image is {width}x{height}, expected {size[1]}x{size[0]}")
    if height * width > max_pixels:
        raise ImageDecodeError(f"image header declares {width}x{height} = {height * width} pixels, more than "
                               f"the {max_pixels} allowed (a corrupt or hostile file); not decoded")


def _jpeg_header(buf: bytes):
    """(height, width) from a JPEG header via libjpeg-turbo, or None if it cannot read it (then Pillow tries)."""
    if buf[:2] != _JPEG_SOI:
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(buf)
        return height, width
    except (ValueError, RuntimeError):
        return None


def image_size(data) -> tuple[int, int]:
    """(height, width) from the image header only; nothing is decoded."""
    buf = data if isinstance(data, bytes) else bytes(data)
    dims = _jpeg_header(buf)
    if dims is not None:
        return dims
    with _pillow_errors(buf):
        with _pillow_open(buf) as im:
            return im.size[1], im.size[0]


def decode_jpeg(data, *, size: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS,
                colorspace: str = "RGB") -> np.ndarray:
    """Decode JPEG (or, via Pillow, PNG/BMP/...) bytes to a C-contiguous RGB uint8 (H, W, 3) array.

    The header is read first: `size` (height, width) demands exactly that size, and more than `max_pixels`
    pixels is refused, both before decoding. `colorspace="BGR"` gives the channels reversed."""
    buf = data if isinstance(data, bytes) else bytes(data)
    dims = _jpeg_header(buf)
    if dims is not None:
        check_size(*dims, size, max_pixels)
        try:
            return simplejpeg.decode_jpeg(buf, colorspace=colorspace)
        except (ValueError, RuntimeError):
            pass  # e.g. CMYK or a recoverable libjpeg warning under strict mode: let Pillow try
    img = _decode_pillow(buf, size, max_pixels)
    return img if colorspace == "RGB" else np.ascontiguousarray(img[:, :, ::-1])


def _pillow_open(buf: bytes):
    try:
        from PIL import Image
    except ImportError as exc:  # Pillow is only needed for non-JPEG payloads
        raise ImageDecodeError(f"not a decodable JPEG ({len(buf)} bytes) and Pillow is not installed") from exc
    return Image.open(io.BytesIO(buf))  # reads the header only; pixels load on first use


@contextmanager
def _pillow_errors(buf: bytes):
    """Pillow's failures, its decompression-bomb refusal and a MemoryError as one ImageDecodeError."""
    try:
        from PIL import Image, UnidentifiedImageError

        pillow = (UnidentifiedImageError, Image.DecompressionBombError)
    except ImportError:
        pillow = ()
    try:
        yield
    except ImageDecodeError:
        raise
    except (*pillow, OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, MemoryError) as exc:
        head = buf[:8].hex()
        raise ImageDecodeError(f"undecodable image ({len(buf)} bytes, starts with {head or 'nothing'}): "
                               f"{type(exc).__name__}: {exc}") from exc


def _decode_pillow(buf: bytes, size=None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    with _pillow_errors(buf):
        with _pillow_open(buf) as im:
            check_size(im.size[1], im.size[0], size, max_pixels)
            return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


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
