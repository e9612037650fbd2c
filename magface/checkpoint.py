"""Checkpoint files. `model.pt` holds everything inference needs (see docs/architecture.md):
{"format": "magface-checkpoint/1", "backbone", "backbone_kwargs", "state_dict", "preprocessing", "config",
"epoch", "step"}. Files are written under a temporary name and renamed into place.

A checkpoint directory is *complete* when every rank's completion manifest `complete_rank{r}.json` is present
and every file each manifest lists has the listed size. Each rank writes its manifest last, into the folder
it hands to `ray.train.report`; Ray copies a rank's files in parallel, so an interrupted upload can leave the
manifest beside a truncated `model.pt`, and the sizes catch that. `is_complete` is the one test every reader
of a run's folders uses (`evaluation.runner.find_latest_checkpoint`, the `Embedder`, resume)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from magface.data.storage import atomic_write
from magface.preprocess import PixelConvention

MODEL_FILE = "model.pt"
MODEL_FORMAT = "magface-checkpoint/1"
COMPLETE_PREFIX = "complete_rank"
COMPLETE_FORMAT = "magface-complete/1"
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


def model_summary(payload: dict) -> dict:
    """What a model.pt holds, in words users and run names need: loss kind, backbone, epoch, step, pixel
    convention, input size."""
    cfg = payload.get("config") or {}
    return {"loss": (cfg.get("loss") or {}).get("kind", "unknown"), "backbone": payload.get("backbone"),
            "epoch": payload.get("epoch"), "step": payload.get("step"),
            "convention": PixelConvention.from_dict(payload["preprocessing"]).name,
            "input_size": (payload.get("backbone_kwargs") or {}).get("input_size", 112),
            "magnitude_range": [(cfg.get("loss") or {}).get("l_a"), (cfg.get("loss") or {}).get("u_a")]}


def read_model_summary(path) -> dict:
    """model_summary of a local checkpoint directory without reading its weights into memory (memory-mapped)."""
    file = Path(path) / MODEL_FILE if Path(path).is_dir() else Path(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return model_summary(payload)
    except Exception as exc:  # noqa: BLE001 - a file we cannot read has no summary
        raise ValueError(f"{file}: not a readable MagFace checkpoint ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------------------------- completeness


class IncompleteCheckpointError(ValueError):
    """A checkpoint directory whose completion manifests are missing or disagree with its files."""


def _marker_name(rank: int) -> str:
    return f"{COMPLETE_PREFIX}{int(rank)}.json"


def _is_marker(rel: str) -> bool:
    return rel.startswith(COMPLETE_PREFIX) and rel.endswith(".json") and "/" not in rel


def mark_complete(directory, rank: int = 0, world_size: int = 1) -> Path:
    """Record that this rank's part of a local checkpoint folder is fully written: call it LAST, after every
    file of this rank is in `directory` (and before `ray.train.report`). Lists each file with its size."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and not _is_marker(rel):
            files[rel] = p.stat().st_size
    manifest = {"format": COMPLETE_FORMAT, "rank": int(rank), "world_size": int(world_size), "files": files}
    path = directory / _marker_name(rank)
    from magface.data.storage import atomic_write

    with atomic_write(path) as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    return path


def completeness(directory) -> tuple[str, str]:
    """("complete" | "incomplete" | "unmarked", why) for a checkpoint directory (local or s3://).

    "unmarked": no manifest at all (a folder written by hand or before manifests existed)."""
    from magface.data import storage

    directory = str(directory)
    try:
        listed = storage.list_files(directory)
    except storage.StorageError as exc:
        return "incomplete", str(exc)
    base = directory.rstrip("/") + "/"
    sizes = {}
    for uri in listed:
        rel = uri[len(base):] if uri.startswith(base) else os.path.relpath(uri, directory).replace(os.sep, "/")
        sizes[rel] = None  # sizes fetched lazily: only the files manifests name
    markers = sorted(r for r in sizes if _is_marker(r))
    if not markers:
        return "unmarked", f"{directory}: no completion manifest ({COMPLETE_PREFIX}<r>.json)"
    world = None
    for rank in range(1 << 16):
        name = _marker_name(rank)
        if name not in sizes:
            return "incomplete", f"{directory}: {name} missing (rank {rank} of {world} did not finish writing)"
        try:
            manifest = json.loads(storage.read_bytes(storage.join(directory, name)))
            files, mrank, mworld = manifest["files"], int(manifest["rank"]), int(manifest["world_size"])
            if manifest.get("format") != COMPLETE_FORMAT or mrank != rank or not isinstance(files, dict):
                raise ValueError("unexpected content")
        except (ValueError, KeyError, TypeError) as exc:
            return "incomplete", f"{directory}: {name} is not a valid completion manifest ({exc})"
        world = mworld if world is None else world
        if mworld != world or not 0 < world <= 1 << 16:
            return "incomplete", f"{directory}: {name} says world_size {mworld}, rank 0 says {world}"
        for rel, want in files.items():
            if rel not in sizes:
                return "incomplete", f"{directory}: {rel} missing (listed in {name})"
            have = storage.size(storage.join(directory, rel))
            if have != want:
                return "incomplete", f"{directory}: {rel} has {have} bytes, {name} says {want} (a truncated copy)"
        if rank + 1 >= world:
            return "complete", ""
    return "incomplete", f"{directory}: too many ranks"


def is_complete(directory) -> bool:
    """True when the directory's completion manifests say every rank finished writing (see module doc)."""
    return completeness(directory)[0] == "complete"


def check_not_incomplete(directory) -> None:
    """Refuse a checkpoint folder whose manifests say it is unfinished; unmarked folders pass (their files
    are still validated when read)."""
    state, why = completeness(directory)
    if state == "incomplete":
        raise IncompleteCheckpointError(f"incomplete checkpoint: {why}; use an earlier checkpoint of the run "
                                        "(training resumes from the last complete one)")


# ---------------------------------------------------------------------------------- building the backbone

_KWARG_TYPES = (bool, int, float, str, type(None))


def build_backbone_checked(payload: dict, file="model.pt"):
    """The backbone a loaded `model.pt` payload describes, with its weights, after checking that its
    `backbone_kwargs` describe exactly the tensors in `state_dict`.

    The network is first built on PyTorch's "meta" device (shapes only, no memory), so a file asking for an
    absurd size (`input_size: 768` next to 112-pixel weights) is refused before anything is allocated."""
    from magface.models import BACKBONES, get_backbone

    name, kwargs, state = payload["backbone"], payload["backbone_kwargs"], payload["state_dict"]
    if name not in BACKBONES:
        raise ValueError(f"{file}: backbone {name!r} unknown; known: {list(BACKBONES)}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and isinstance(v, _KWARG_TYPES)
                                               for k, v in kwargs.items()):
        raise ValueError(f"{file}: backbone_kwargs must map names to plain numbers/strings, got {kwargs!r}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: state_dict must map parameter names to tensors")
    try:
        with torch.device("meta"):
            expected = get_backbone(name, **kwargs).state_dict()
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ValueError(f"{file}: backbone_kwargs {kwargs} do not describe a {name} backbone: {exc}") from None
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{file}: state_dict does not match {name}({kwargs}): missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for key, ref in expected.items():
        if tuple(ref.shape) != tuple(state[key].shape):
            raise ValueError(f"{file}: backbone_kwargs {kwargs} do not match the weights: {key} is "
                             f"{tuple(state[key].shape)} in the file, {name} with these kwargs needs {tuple(ref.shape)}")
    model = get_backbone(name, **kwargs)
    model.load_state_dict(state)
    return model
