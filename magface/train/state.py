"""Per-rank training state inside a checkpoint directory: `train_state_rank{r}.pt`.

Each rank owns a different classifier shard and its optimizer moments, so each rank saves and loads its own
file; the backbone (identical on every rank under DDP) goes to `model.pt` via magface.checkpoint, written by
rank 0. Files are written under a temporary name and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from magface.checkpoint import atomic_torch_save

FORMAT = "magface-train-state/1"


def state_file(checkpoint_dir: str | os.PathLike, rank: int) -> Path:
    return Path(checkpoint_dir) / f"train_state_rank{rank}.pt"


def save_train_state(checkpoint_dir, *, rank: int, world_size: int, classifier, optimizer, scheduler,
                     scaler=None, epoch: int, step: int) -> Path:
    """`epoch` is the number of completed epochs, `step` the number of optimizer steps taken."""
    path = state_file(checkpoint_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "rank": rank,
        "world_size": world_size,
        "classifier": classifier.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
    }
    return atomic_torch_save(state, path)


def load_train_state(checkpoint_dir, *, rank: int, world_size: int, map_location="cpu") -> dict:
    """The saved dict for this rank; a checkpoint from another world size is refused (classifier shards and
    their optimizer moments are laid out per rank)."""
    path = state_file(checkpoint_dir, rank)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no train state for rank {rank} in checkpoint {checkpoint_dir}")
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a train-state file (format {state.get('format') if isinstance(state, dict) else type(state).__name__!r}, expected {FORMAT!r})")
    if state["world_size"] != world_size:
        raise ValueError(f"{path}: saved with world_size={state['world_size']}, resuming with {world_size}; "
                         f"resume with scaling.num_workers={state['world_size']} (classifier shards are per rank)")
    return state


def restore_train_state(state: dict, *, classifier, optimizer, scheduler, scaler=None) -> tuple[int, int]:
    """Load a state dict from `load_train_state` into live objects; returns (epoch, step)."""
    classifier.load_state_dict(state["classifier"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return state["epoch"], state["step"]
