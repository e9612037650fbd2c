"""Cleanup after a driver that was killed outright (SIGKILL, the OOM killer, a closed terminal).

Such a driver runs no cleanup: its private local Ray loses the head processes but leaves the dashboard and
runtime-env agents running, and its MLflow runs stay RUNNING forever. `start()` (called by
`magface.cluster.connect`) launches this module as a small guard process in its own session. The guard
notices the driver's end when its stdin pipe closes (whatever killed the driver), waits `GRACE_S` for Ray's own
teardown, then
- ends the processes of the driver's private local Ray that are still alive: only processes it saw as
  descendants of the driver, identified by pid and start time (never a reused pid);
- marks the MLflow runs the driver had open (`watch_run`, not yet `release_run`) as KILLED (FAILED when the
  driver exited by itself, e.g. on an unhandled error, with a run still open).
After a normal exit there is nothing left to do and the guard just exits.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import time

GRACE_S = 5.0
_guard: subprocess.Popen | None = None
_lock = threading.Lock()


def start(reap_local_ray: bool) -> bool:
    """Start this process's guard (once). `reap_local_ray`: this process started a private local Ray."""
    global _guard
    with _lock:
        if _guard is not None:
            return True
        try:
            _guard = subprocess.Popen([sys.executable, "-m", "magface.driver_guard", str(os.getpid()),
                                       "1" if reap_local_ray else "0"],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
                                      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        except OSError:
            return False
    atexit.register(_send, {"exit": True})
    return True


def _send(msg: dict) -> None:
    with _lock:
        if _guard is None or _guard.stdin is None:
            return
        try:
            _guard.stdin.write((json.dumps(msg) + "\n").encode())
            _guard.stdin.flush()
        except (OSError, ValueError):
            pass


def watch_run(tracking_uri: str | None, run_id: str | None) -> None:
    """The guard marks this run KILLED if the driver dies before `release_run`."""
    if run_id:
        _send({"watch": run_id, "uri": tracking_uri})


def release_run(run_id: str | None) -> None:
    if run_id:
        _send({"release": run_id})


# ------------------------------------------------------------------------------------------------ guard side
def _psutil():
    import importlib.util

    spec = importlib.util.find_spec("ray")  # Ray ships psutil in its thirdparty_files; no ray import needed
    if spec and spec.submodule_search_locations:
        sys.path.append(os.path.join(list(spec.submodule_search_locations)[0], "thirdparty_files"))
    import psutil

    return psutil


def _is_ray(proc) -> bool:
    """A process of Ray's (its name or command line says so): what the private local Ray started."""
    try:
        return "ray" in proc.name().lower() or any("ray" in part for part in proc.cmdline())
    except Exception:  # noqa: BLE001 - gone or not ours to read
        return False


def _reap(psutil, seen: dict[int, float]) -> list[int]:
    """Terminate (then kill) the recorded processes still alive with the same start time."""
    alive = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 0.01:
                alive.append(p)
        except psutil.Error:
            pass
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=5)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in alive]


def _mark_ended(runs: dict[str, str | None], status: str) -> None:
    from mlflow.tracking import MlflowClient

    for run_id, uri in runs.items():
        try:
            client = MlflowClient(uri) if uri else MlflowClient()
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status=status)
        except Exception as e:  # noqa: BLE001 - best effort, the driver is gone
            print(f"driver_guard: could not mark MLflow run {run_id} {status}: {e}", file=sys.stderr)


def main(argv: list[str]) -> int:
    import signal

    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # outlive the terminal and its Ctrl-C; the pipe says when to act
    driver, reap = int(argv[0]), argv[1] == "1"
    psutil = _psutil()
    me = os.getpid()
    seen: dict[int, float] = {}
    runs: dict[str, str | None] = {}
    state = {"eof": False, "clean": False}

    def read():
        for line in sys.stdin.buffer:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "watch" in msg:
                runs[msg["watch"]] = msg.get("uri")
            elif "release" in msg:
                runs.pop(msg["release"], None)
            elif msg.get("exit"):
                state["clean"] = True
        state["eof"] = True

    threading.Thread(target=read, daemon=True).start()
    while not state["eof"]:
        if reap:
            try:
                for child in psutil.Process(driver).children(recursive=True):
                    if child.pid != me and child.pid not in seen and _is_ray(child):
                        seen[child.pid] = child.create_time()
            except psutil.Error:
                pass
        time.sleep(1.0)
    time.sleep(GRACE_S)  # Ray's own teardown first
    if reap and seen:
        _reap(psutil, seen)
    if runs:
        _mark_ended(runs, "FAILED" if state["clean"] else "KILLED")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
