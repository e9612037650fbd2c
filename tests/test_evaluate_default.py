"""Which checkpoint `pipelines/evaluate.py` evaluates without --checkpoint: the newest complete MagFace-loss
checkpoint (not a newer ArcFace baseline, not a half-written folder), or the newest of the runs named by --run."""

from __future__ import annotations

import os
import time

import pytest
import torch

from magface.checkpoint import mark_complete, save_model_file
from magface.evaluation.runner import find_latest_checkpoint
from magface.preprocess import PixelConvention


def _checkpoint(root, run: str, name: str, loss: str, mtime: float, complete: bool = True):
    d = root / run / name
    save_model_file(d, "small", {"embedding_size": 8, "input_size": 16}, {"w": torch.zeros(2)}, PixelConvention(),
                    {"loss": {"kind": loss, "l_a": 10.0, "u_a": 110.0}}, 1, 10)
    os.utime(d / "model.pt", (mtime, mtime))
    if complete:
        mark_complete(d)
    return d


def test_default_is_the_newest_complete_magface_checkpoint_and_run_selects(tmp_path):
    now = time.time()
    older_mag = _checkpoint(tmp_path, "demo_magface_20260101-000000", "checkpoint_epoch001", "magface", now - 300)
    newest_mag = _checkpoint(tmp_path, "demo_magface_20260102-000000", "checkpoint_epoch006", "magface", now - 200)
    arc = _checkpoint(tmp_path, "demo_arcface_20260102-000000", "checkpoint_epoch006", "arcface", now - 100)
    _checkpoint(tmp_path, "demo_magface_20260103-000000", "checkpoint_epoch001", "magface", now, complete=False)

    assert find_latest_checkpoint(tmp_path) == newest_mag  # not the newer ArcFace one, not the unfinished one
    assert find_latest_checkpoint(tmp_path, run="demo_arcface") == arc
    assert find_latest_checkpoint(tmp_path, run="demo_magface_20260101") == older_mag
    with pytest.raises(FileNotFoundError, match="no checkpoint of a run named 'demo_cosface'.*demo_arcface_2026"):
        find_latest_checkpoint(tmp_path, run="demo_cosface")


def test_without_any_magface_checkpoint_the_newest_is_used(tmp_path, caplog):
    now = time.time()
    _checkpoint(tmp_path, "a", "c1", "arcface", now - 100)
    newest = _checkpoint(tmp_path, "b", "c1", "cosface", now)
    assert find_latest_checkpoint(tmp_path) == newest
    assert "no MagFace-loss checkpoint" in caplog.text
