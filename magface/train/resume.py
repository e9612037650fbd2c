"""Resuming a job: the newest complete checkpoint in the job's folder, and the MLflow run it continues.

Ray Train V2 resumes from the latest checkpoint recorded in its run snapshot (`checkpoint_manager_snapshot
.json`), which lags behind storage: a worker uploads its checkpoint folder first and then waits for the
controller to register it (a queue of one report per worker), so when the driver stops without a clean
shutdown the last one or two uploaded checkpoints are in storage but not in the snapshot, and a re-run went
back to an older epoch. The driver therefore scans `<storage_path>/<name>/checkpoint_*` for the newest
complete folder (magface.checkpoint.completeness) and the workers start from whichever is newer, that
folder or Ray's choice (`pick`). Checkpoint folders are named `checkpoint_epoch{E}_step{S}`; the global
step orders them.

The job folder also holds `magface_run.json` (the MLflow run id and tracking URI), so a re-run logs into the
same MLflow run instead of starting a second one.
"""

from __future__ import annotations

import json
import re

from magface.data import storage

RUN_RECORD = "magface_run.json"
_NAME = re.compile(r"checkpoint_epoch(\d+)_step(\d+)$")


def order(path) -> tuple[int, int] | None:
    """(step, epoch) from a checkpoint folder name, None for a folder not named by the training loop."""
    m = _NAME.search(str(path).rstrip("/"))
    return (int(m.group(2)), int(m.group(1))) if m else None


def newest_complete_checkpoint(run_dir: str) -> str | None:
    """The newest `checkpoint_epoch*_step*` folder directly under `run_dir` (local or s3://) that is not
    known to be incomplete; None when there is none."""
    from magface.checkpoint import completeness

    try:
        files = storage.list_files(run_dir, "model.pt")
    except (storage.StorageError, FileNotFoundError):
        return None
    base = run_dir.rstrip("/")
    dirs = {storage.parent(f) for f in files}
    candidates = sorted((d for d in dirs if storage.parent(d).rstrip("/") == base and order(d)),
                        key=order, reverse=True)
    for d in candidates:
        if completeness(d)[0] != "incomplete":
            return d
    return None


def pick(ray_checkpoint, resume_from: str | None):
    """Worker side: the checkpoint to start from, Ray's (`ray.train.get_checkpoint()`) or the driver's
    `resume_from` folder, whichever has the higher step. Returns a `ray.train.Checkpoint` or None."""
    if not resume_from:
        return ray_checkpoint
    if ray_checkpoint is not None and (order(ray_checkpoint.path) or (-1, -1)) >= (order(resume_from) or (-1, -1)):
        return ray_checkpoint
    import ray.train

    return ray.train.Checkpoint(resume_from)


def read_run_record(run_dir: str) -> dict | None:
    """{"run_id", "tracking_uri"} of the MLflow run an earlier attempt of this job logged to, if any."""
    path = storage.join(run_dir, RUN_RECORD)
    try:
        if not storage.exists(path):
            return None
        record = json.loads(storage.read_bytes(path))
    except (storage.StorageError, OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("run_id") else None


def write_run_record(run_dir: str, run_id: str, tracking_uri: str) -> None:
    if not storage.is_s3(run_dir):
        import os

        os.makedirs(run_dir, exist_ok=True)
    with storage.atomic_write(storage.join(run_dir, RUN_RECORD)) as f:
        f.write(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}).encode())
