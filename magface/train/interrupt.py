"""Ctrl-C and SIGTERM during training: stop within seconds at a step boundary, keeping every finished checkpoint.

The driver runs `trainer.fit()` in a thread and handles SIGINT/SIGTERM itself (Ray Train's own SIGINT handler
aborts the controller, which can wait minutes when the controller is busy, and drops reports not yet
registered). The first signal sets a `StopFlag` actor; each worker polls it between steps and the ranks
agree by an all-reduce, so all leave the loop at the same step. A checkpoint being written when the signal
came is finished first (the report is not interrupted); the epoch in progress is abandoned, and re-running
resumes from the newest complete checkpoint (magface.train.resume). A second signal, or no stop within
`grace_s`, stops at once: the caller's `on_hard_stop` runs (mark the MLflow run KILLED, print how to resume),
Ray is shut down, and the process exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class TrainingInterrupted(Exception):
    """Training stopped on a signal. `checkpoint`: the newest complete checkpoint (None: none yet)."""

    def __init__(self, signame: str, checkpoint: str | None = None, run_id: str | None = None):
        self.signame, self.checkpoint, self.run_id = signame, checkpoint, run_id
        super().__init__(f"training stopped by {signame}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signame, 1)


def _stop_flag_class():
    import ray

    @ray.remote(num_cpus=0, max_concurrency=4)
    class StopFlag:
        def __init__(self):
            self.reason = None

        def set(self, reason: str) -> None:
            self.reason = self.reason or reason

        def get(self) -> str | None:
            return self.reason

        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

    return StopFlag


def create_stop_flag():
    """A StopFlag actor owned by this driver (it dies with the driver), placed on the driver's node: anywhere
    else, losing that node (a spot worker) would take the flag with it under the surviving workers."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return _stop_flag_class().options(scheduling_strategy=here).remote()


class StopPoller:
    """Worker side: `requested(step)` between steps. Polls the flag without blocking (at most every
    `interval_s`); with several ranks, an all-reduce makes every rank see the same answer at the same step.
    The all-reduce (a host-device sync on GPUs) runs only every `agree_every` steps: ranks share the step
    counter, so they all take part in the same collectives, and a stop waits at most that many steps."""

    def __init__(self, flag, world_size: int, device=None, interval_s: float = 0.5, agree_every: int = 10):
        self.flag, self.world_size, self.device, self.interval_s = flag, world_size, device, interval_s
        self.agree_every = max(1, int(agree_every))
        self._pending, self._next_poll, self._local = None, 0.0, False
        self.stopped = False
        self.enabled = flag is not None

    def _poll(self) -> None:
        import ray

        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                try:
                    self._local = self._local or bool(ray.get(self._pending))
                except ray.exceptions.RayError as e:  # the flag is gone (its node or the driver died):
                    # keep training; a stop then comes from the driver's hard stop or the job's end
                    print(f"[magface] the stop flag is unreachable ({type(e).__name__}); training goes on "
                          "without a graceful-stop signal", flush=True)
                    self.flag = self._pending = None
                    return
                self._pending = None
        now = time.monotonic()
        if self._pending is None and now >= self._next_poll:
            self._pending, self._next_poll = self.flag.get.remote(), now + self.interval_s

    def requested(self, step: int) -> bool:
        if not self.enabled:
            return False
        if self.flag is not None and not self._local:  # a lost flag still takes part in the all-reduce below,
            self._poll()  # so that every rank runs the same collectives
        stop = self._local
        if self.world_size > 1:
            if step % self.agree_every:
                return False
            import torch
            import torch.distributed as dist

            t = torch.tensor([int(stop)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            stop = bool(t.item())
        self.stopped = stop
        return stop


def fit_interruptibly(trainer, flag, *, grace_s: float = 20.0, on_hard_stop: Callable[[str], None] | None = None,
                      out=sys.stderr):
    """`trainer.fit()` with SIGINT/SIGTERM handled as the module says. Returns (result, signame or None)."""
    if threading.current_thread() is not threading.main_thread() or flag is None:
        return trainer.fit(), None
    box: dict = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            box["error"] = e

    state = {"signame": None, "deadline": None, "hard": False}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if state["signame"] is None:
            state["signame"], state["deadline"] = name, time.monotonic() + grace_s
            print(f"\n[magface] {name}: stopping the workers at their next step (a checkpoint being written is "
                  f"finished first; up to {grace_s:.0f}s). Press Ctrl-C again to stop at once.", file=out, flush=True)
            try:
                flag.set.remote(name)
            except Exception:  # noqa: BLE001 - Ray already gone: the hard stop below ends the job
                state["hard"] = True
        else:
            state["hard"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=target, name="trainer.fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
            if state["hard"] or (state["deadline"] is not None and time.monotonic() > state["deadline"]):
                if thread.is_alive():
                    _hard_stop(state["signame"], on_hard_stop, out)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if "error" in box:
        raise box["error"]
    return box["result"], state["signame"]


def _hard_stop(signame: str, on_hard_stop, out) -> None:
    print(f"[magface] {signame}: stopping now; the epoch in progress is lost, finished checkpoints are kept",
          file=out, flush=True)
    if on_hard_stop is not None:
        try:
            on_hard_stop(signame)
        except Exception as e:  # noqa: BLE001 - still exit
            print(f"[magface] cleanup after {signame} failed: {e}", file=out, flush=True)
    import ray

    # Shutting Ray down ends this driver's actors (the Train controller and workers) on any cluster, and a
    # private local Ray entirely; bounded, since a wedged Ray must not keep the process alive.
    t = threading.Thread(target=ray.shutdown, daemon=True)
    t.start()
    t.join(15)
    out.flush()
    os._exit(EXIT_CODES.get(signame, 1))
