"""Training state inside a checkpoint directory, resumable by any number of workers.

Layout (format "magface-train-state/2"):
- `train_state.pt`, written by rank 0: step, epoch, world size, scheduler, grad scaler and the optimizer state
  of everything except the classifier (identical on every rank under DDP), plus the classifier's per-parameter
  optimizer entries that are not row-shaped (e.g. Adam's step count);
- `classifier_rows_{start:09d}_{end:09d}.pt`, one per rank: its contiguous class range [start, end) of the class
  centres and every row-shaped optimizer buffer of them (SGD's momentum; Adam's two moments).
The backbone itself goes to `model.pt` (magface.checkpoint, rank 0).

Resuming with W' workers, rank r' owns shard_range(C, r', W') and reads only the row files overlapping it,
memory-mapped, copying just its rows: no process ever holds more than its own shard (WebFace42M's 2M classes
x 512 x fp32 with SGD is 4 GiB of centres + 4 GiB of momentum; 8 ranks write and read 1 GiB each). On remote
storage only those files are downloaded (`checkpoint_files`). The row files must tile [0, C) exactly, else the
checkpoint is refused by name. Every file is loaded with `torch.load(weights_only=True)`: tensors and plain
containers only, so a hostile checkpoint cannot run code. Files are written under a temporary name and renamed.

Format 1 (`train_state_rank{r}.pt`, one full per-rank state) still loads when the world size matches.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from magface.checkpoint import atomic_torch_save
from magface.sharded_fc import shard_range

FORMAT = "magface-train-state/2"
LEGACY_FORMAT = "magface-train-state/1"
SHARED_FILE = "train_state.pt"
_ROWS = re.compile(r"^classifier_rows_(\d{9})_(\d{9})\.pt$")


def rows_file(checkpoint_dir, start: int, end: int) -> Path:
    return Path(checkpoint_dir) / f"classifier_rows_{start:09d}_{end:09d}.pt"


def legacy_state_file(checkpoint_dir, rank: int) -> Path:
    return Path(checkpoint_dir) / f"train_state_rank{rank}.pt"


def _param_index(optimizer, param) -> int:
    """Index of `param` in the optimizer's state_dict (parameters are numbered across groups in order)."""
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(flat):
        if p is param:
            return i
    raise ValueError("the classifier weight is not among the optimizer's parameters")


def save_train_state(checkpoint_dir, *, rank: int, world_size: int, classifier, optimizer, scheduler,
                     scaler=None, epoch: int, step: int, extra: dict | None = None) -> list[Path]:
    """Write this rank's class rows (every rank) and the shared state (rank 0). `epoch` counts completed
    epochs, `step` optimizer steps taken; `extra` (rank 0) holds small plain values kept with the state."""
    d = Path(checkpoint_dir)
    d.mkdir(parents=True, exist_ok=True)
    weight = classifier.weight
    index = _param_index(optimizer, weight)
    opt = optimizer.state_dict()
    entry = opt["state"].pop(index, {})
    rows_state = {k: v for k, v in entry.items() if torch.is_tensor(v) and v.shape == weight.shape}
    other = {k: v for k, v in entry.items() if k not in rows_state}
    start, end = classifier.class_start, classifier.class_end
    written = [atomic_torch_save({
        "format": FORMAT, "num_classes": classifier.num_classes, "start": start, "end": end,
        "weight": weight.detach().cpu(), "optim": {k: v.cpu() for k, v in rows_state.items()},
    }, rows_file(d, start, end))]
    if rank == 0:
        written.append(atomic_torch_save({
            "format": FORMAT, "world_size": int(world_size), "num_classes": classifier.num_classes,
            "embedding_size": classifier.embedding_size, "classifier_param_index": index,
            "classifier_optim_other": other, "optimizer": opt, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": int(epoch), "step": int(step), "extra": dict(extra or {}),
        }, d / SHARED_FILE))
    return written


def safe_load(path, map_location="cpu", mmap: bool = False):
    """torch.load restricted to tensors and plain containers; anything else is refused, never executed."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load: it holds objects other than tensors and plain containers "
                         f"(a damaged or hostile file; a genuine train state never does). Details: "
                         f"{str(e).splitlines()[0]}") from None


def _check_format(path, state, expected: str) -> None:
    got = state.get("format") if isinstance(state, dict) else type(state).__name__
    if got != expected:
        raise ValueError(f"{path}: not a train-state file (format {got!r}, expected {expected!r})")


def list_row_files(checkpoint_dir, num_classes: int) -> list[tuple[int, int, Path]]:
    """The checkpoint's (start, end, path) row files, checked to tile [0, num_classes) exactly."""
    found = sorted((int(m[1]), int(m[2]), p) for p in Path(checkpoint_dir).iterdir()
                   if (m := _ROWS.match(p.name)))
    pos = 0
    for start, end, path in found:
        if start != pos or end <= start:
            raise ValueError(f"{checkpoint_dir}: classifier rows {'overlap' if start < pos else 'missing'} at "
                             f"class {min(pos, start)} ({path.name}); the checkpoint is incomplete or mixed "
                             f"from two runs: resume from another checkpoint")
        pos = end
    if pos != num_classes:
        raise ValueError(f"{checkpoint_dir}: classifier rows cover classes [0, {pos}) of {num_classes}; "
                         f"the checkpoint is incomplete: resume from another checkpoint")
    return found


def load_train_state(checkpoint_dir, *, rank: int, world_size: int, map_location="cpu") -> dict:
    """This rank's state for a run of `world_size` workers, whatever world size wrote it:
    {"classifier": {"weight": rows}, "optimizer": full optimizer state_dict with this rank's classifier
    buffers, "scheduler", "scaler", "epoch", "step", "world_size" (the writer's), "extra"}."""
    d = Path(checkpoint_dir)
    shared_path = d / SHARED_FILE
    if not shared_path.exists():
        return _load_legacy(d, rank=rank, world_size=world_size, map_location=map_location)
    shared = safe_load(shared_path, map_location)
    _check_format(shared_path, shared, FORMAT)
    num_classes = shared["num_classes"]
    if world_size > num_classes:
        raise ValueError(f"{d}: {world_size} workers for {num_classes} classes; use at most {num_classes}")
    start, end = shard_range(num_classes, rank, world_size)
    weight, buffers = None, {}
    for f_start, f_end, path in list_row_files(d, num_classes):
        lo, hi = max(start, f_start), min(end, f_end)
        if lo >= hi:
            continue
        part = safe_load(path, "cpu", mmap=True)
        _check_format(path, part, FORMAT)
        if (part["start"], part["end"]) != (f_start, f_end) or part["weight"].shape[0] != f_end - f_start:
            raise ValueError(f"{path}: holds rows [{part['start']}, {part['end']}) x {part['weight'].shape[0]}, "
                             f"not the range in its name")
        if weight is None:
            weight = part["weight"].new_empty((end - start,) + part["weight"].shape[1:])
            buffers = {k: v.new_empty(weight.shape) for k, v in part["optim"].items()}
        sl = slice(lo - f_start, hi - f_start)
        weight[lo - start:hi - start] = part["weight"][sl]
        if set(part["optim"]) != set(buffers):
            raise ValueError(f"{path}: optimizer buffers {sorted(part['optim'])} differ from the other row "
                             f"files' {sorted(buffers)}")
        for k, v in part["optim"].items():
            buffers[k][lo - start:hi - start] = v[sl]
        del part
    optimizer = shared["optimizer"]
    if buffers or shared["classifier_optim_other"]:
        optimizer["state"][shared["classifier_param_index"]] = {
            **shared["classifier_optim_other"], **{k: v.to(map_location) for k, v in buffers.items()}}
    return {"format": FORMAT, "world_size": shared["world_size"], "classifier": {"weight": weight.to(map_location)},
            "optimizer": optimizer, "scheduler": shared["scheduler"], "scaler": shared["scaler"],
            "epoch": shared["epoch"], "step": shared["step"], "extra": shared.get("extra", {})}


def _load_legacy(d: Path, *, rank: int, world_size: int, map_location) -> dict:
    path = legacy_state_file(d, rank)
    if not path.exists():
        raise FileNotFoundError(f"{d}: no train state ({SHARED_FILE}, or {path.name} of the older per-rank "
                                f"format) in this checkpoint directory")
    state = safe_load(path, map_location)
    _check_format(path, state, LEGACY_FORMAT)
    if state["world_size"] != world_size:
        raise ValueError(f"{path}: the older per-rank format, saved with world_size={state['world_size']}, "
                         f"resuming with {world_size}; resume with scaling.num_workers={state['world_size']} "
                         f"(this format's classifier shards are per rank; checkpoints written since resume "
                         f"at any worker count)")
    return state


def restore_train_state(state: dict, *, classifier, optimizer, scheduler, scaler=None) -> tuple[int, int]:
    """Load a state dict from `load_train_state` into live objects; returns (epoch, step)."""
    classifier.load_state_dict(state["classifier"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return state["epoch"], state["step"]


@contextmanager
def checkpoint_files(checkpoint, *, rank: int, world_size: int):
    """A local folder with what this rank needs from a `ray.train.Checkpoint` (refused when its completion
    manifests say it is unfinished): the checkpoint's own folder on a local filesystem, else a download of `model.pt`, the shared state and only the class-row
    files overlapping this rank's range (or its older-format file)."""
    import pyarrow.fs as pafs

    from magface.checkpoint import check_not_incomplete

    fs, root = checkpoint.filesystem, checkpoint.path
    if isinstance(fs, pafs.LocalFileSystem):
        check_not_incomplete(root)
        yield root
        return
    check_not_incomplete(f"{fs.type_name}://{root}")
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.File]
    with tempfile.TemporaryDirectory(prefix="magface_resume_") as tmp:
        def fetch(name):
            pafs.copy_files(f"{root}/{name}", os.path.join(tmp, name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())

        wanted = [n for n in names if not _ROWS.match(n) and not n.startswith("train_state_rank")]
        for name in wanted:
            fetch(name)
        if SHARED_FILE in names:
            num_classes = safe_load(os.path.join(tmp, SHARED_FILE))["num_classes"]
            start, end = shard_range(num_classes, rank, world_size)
            for name in names:
                m = _ROWS.match(name)
                if m and int(m[1]) < end and int(m[2]) > start:
                    fetch(name)
                elif m:  # an empty placeholder keeps the tiling check meaningful without the download
                    Path(tmp, name).touch()
        elif legacy_state_file(tmp, rank).name in names:
            fetch(legacy_state_file(tmp, rank).name)
        yield tmp
