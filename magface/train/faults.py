"""Fault injection for testing recovery: one rank exits hard, once, at a given global step.

`os._exit` skips every Python cleanup, like a node loss or an OOM kill would. A marker file in the run's
storage folder (created before exiting) makes the restarted workers, which replay from the last checkpoint and
pass the same step again, carry on instead of dying in a loop.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def marker_path(storage_path: str, name: str) -> Path | None:
    """Where the 'already injected' marker lives; None for remote storage (fault injection is local-only)."""
    if "://" in storage_path:
        return None
    return Path(os.path.expanduser(storage_path)) / name / ".fault_injected"


def maybe_kill(*, rank: int, step: int, kill_rank: int | None, kill_step: int | None, marker: Path | None,
               settle=None) -> None:
    """Exit the process if this is the configured rank and step and the fault was not injected before.
    `settle()` runs first: it waits until the checkpoints already reported are registered, so the injected
    fault lands after the last checkpoint is durable, as a real fault hours into an epoch would."""
    if kill_rank is None or rank != kill_rank or step != kill_step or marker is None:
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: only the first attempt wins
    except FileExistsError:
        return
    if settle is not None:
        settle()
    os.write(fd, f"rank {rank} killed at step {step}\n".encode())
    os.close(fd)
    log.warning("fault injection: rank %d exits at step %d", rank, step)
    os._exit(17)
