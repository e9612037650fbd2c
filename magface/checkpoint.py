"""Checkpoint files. `model.pt` holds everything inference needs (see docs/architecture.md):
{"format": "magface-checkpoint/1", "backbone", "backbone_kwargs", "state_dict", "preprocessing", "config",
"epoch", "step"}. Files are written under a temporary name and renamed into place."""

from __future__ import annotations

import io

from pathlib import Path

import torch

from magface.data.storage import atomic_write
from magface.preprocess import PixelConvention

MODEL_FILE = "model.pt"
MODEL_FORMAT = "magface-checkpoint/1"
_REQUIRED = ("backbone", "backbone_kwargs", "state_dict", "preprocessing", "config", "epoch", "step")


def atomic_torch_save(obj, path) -> Path:
    """torch.save under a temporary name, renamed into place: readers never see half a file."""
    with atomic_write(path) as f:
        torch.save(obj, f)
    return Path(path)


def save_model_file(
    directory, backbone_name: str, backbone_kwargs: dict, state_dict: dict, preprocessing: PixelConvention,
    config: dict, epoch: int, step: int,
) -> Path:
    """Write `<directory>/model.pt` atomically; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": MODEL_FORMAT,
        "backbone": backbone_name,
        "backbone_kwargs": dict(backbone_kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "preprocessing": preprocessing.to_dict(),
        "config": config,
        "epoch": int(epoch),
        "step": int(step),
    }
    return atomic_torch_save(payload, directory / MODEL_FILE)


def load_model_file(path) -> dict:
    """Read a checkpoint directory's model.pt (or the file itself) onto the CPU. Errors name the file."""
    from magface.data import storage

    if storage.is_s3(str(path)):
        # s3://bucket/run/checkpoint_x (a directory) or .../model.pt: read straight from the bucket, so actors
        # on any node of a cluster load the same checkpoint without a shared filesystem.
        file = str(path) if str(path).endswith(".pt") else storage.join(str(path), MODEL_FILE)
        if not storage.exists(file):
            raise FileNotFoundError(f"{file}: no MagFace model file here (expected a checkpoint prefix holding {MODEL_FILE})")
        source = io.BytesIO(storage.read_bytes(file))
    else:
        path = Path(path)
        file = path / MODEL_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no MagFace model file here (expected a checkpoint directory holding {MODEL_FILE})")
        source = file
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, or a pickle with foreign objects
        raise ValueError(f"{file}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{file}: unknown checkpoint format {found!r}; expected {MODEL_FORMAT!r}")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise ValueError(f"{file}: checkpoint is missing field(s) {missing}")
    return payload
