"""insightface `.bin` verification sets (LFW, CFP-FP, AgeDB-30, ...).

A `.bin` is a pickle of `(images, issame)`: `images` holds 2*P encoded images (JPEG/PNG bytes), pair i
being images 2i and 2i+1, and `issame` P booleans. Unpickling runs code named by the file, so loading
goes through an Unpickler that resolves only the few globals this layout can need:
- none at all for the usual files (Python 3 `bytes`/`bool`; Python 2 `str` loaded as bytes);
- `_codecs.encode` (latin-1 only), which Python 3 emits for `bytes` under pickle protocols < 3;
- numpy's array/scalar reconstruction, for files whose images or `issame` were stored as numpy arrays.
"""

from __future__ import annotations

import codecs
import importlib
import os
import pickle

import numpy as np

from magface.recordio import atomic_path

__all__ = ["BinFileError", "load_bin", "write_bin"]


class BinFileError(ValueError):
    """A `.bin` file that is not an insightface verification set, or that asks for a forbidden global."""


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    # What protocol-2 pickles of Python 3 bytes call; only the latin-1 form they use is honoured.
    if encoding != "latin1" or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"_codecs.encode({type(obj).__name__}, {encoding!r}) is not allowed")
    return codecs.encode(obj, "latin1", errors)


# (module, name) pairs numpy writes when pickling arrays and scalars; numpy >= 2 renamed numpy.core to
# numpy._core, so files of either era name either one and both resolve to the installed numpy.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
}


def _numpy_global(module: str, name: str):
    installed = "numpy._core" if hasattr(np, "_core") else "numpy.core"
    module = module.replace("numpy._core", installed).replace("numpy.core", installed)
    return getattr(importlib.import_module(module), name)


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file, encoding="bytes")  # Python 2 `str` images load as bytes, as insightface does
        self._path = path

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _NUMPY_GLOBALS:
            return _numpy_global(module, name)
        raise BinFileError(f"{self._path}: refusing to load: the pickle asks for global {module}.{name}, "
                           "which a .bin verification set never needs")

    def persistent_load(self, pid):
        raise BinFileError(f"{self._path}: refusing to load: persistent id {pid!r} in a .bin file")


def _image_bytes(obj, path, i) -> bytes:
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    if isinstance(obj, np.ndarray) and obj.dtype == np.uint8 and obj.ndim == 1:
        return obj.tobytes()  # MXNet-era files: np.frombuffer(jpeg, uint8) per image
    raise BinFileError(f"{path}: image {i} is a {type(obj).__name__}, expected encoded image bytes")


def load_bin(path) -> tuple[list[bytes], np.ndarray]:
    """Load a `.bin` verification set: (2*P encoded images, issame bool array of P)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            obj = _SafeUnpickler(f, path).load()
        except BinFileError:
            raise
        except Exception as exc:  # truncated or not a pickle at all
            raise BinFileError(f"{path}: not a readable pickle: {exc}") from exc
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFileError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    raw_images, raw_issame = obj
    if not isinstance(raw_images, (list, tuple, np.ndarray)):
        raise BinFileError(f"{path}: images must be a list of encoded images, got {type(raw_images).__name__}")
    images = [_image_bytes(img, path, i) for i, img in enumerate(raw_images)]
    if not isinstance(raw_issame, (list, tuple, np.ndarray)):
        raise BinFileError(f"{path}: issame must be a list of booleans, got {type(raw_issame).__name__}")
    try:
        issame = np.asarray(raw_issame)
    except ValueError as exc:  # ragged nesting: numpy refuses to build an array
        raise BinFileError(f"{path}: issame must be a flat list of booleans, got a ragged nested list ({exc})") from None
    if issame.dtype == object:
        raise BinFileError(f"{path}: issame must be a flat list of booleans, got mixed types")
    if not len(images) or not issame.size:
        raise BinFileError(f"{path}: empty verification set ({len(images)} images, {issame.size} pairs); a .bin "
                           "needs at least one pair")
    if issame.ndim != 1 or not (issame.dtype == np.bool_ or np.isin(issame, (0, 1)).all()):
        raise BinFileError(f"{path}: issame must be a flat list of booleans, got dtype {issame.dtype} "
                           f"shape {issame.shape}")
    issame = issame.astype(bool)
    if len(images) != 2 * len(issame):
        raise BinFileError(f"{path}: {len(images)} images for {len(issame)} pairs (need exactly 2 per pair)")
    return images, issame


def write_bin(path, images, issame) -> None:
    """Write a `.bin` verification set insightface's loader reads (pickle protocol 4), atomically."""
    images = [bytes(img) for img in images]
    issame = [bool(x) for x in issame]
    if len(images) != 2 * len(issame):
        raise ValueError(f"{os.fspath(path)}: {len(images)} images for {len(issame)} pairs (need 2 per pair)")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump((images, issame), f, protocol=4)
