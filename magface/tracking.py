"""The one place that talks to MLflow.

`MLFLOW_TRACKING_URI` chooses the server; unset, MLflow's own local default is used. Tracking must never take
a training run down nor slow it: every logging call only appends to an in-memory queue and returns (µs); a
background sender thread ships the queue in batches. While the server is unreachable (killed, frozen,
network down) nothing is dropped: the sender keeps retrying (backoff up to `retry_max_s`), the queue is
bounded in memory (`max_memory_points`) and the oldest metric points beyond that are spilled to a spool file
on local disk, which is sent first when the server answers again. `close()`/`end()` wait a bounded time for
the queue to drain; what is still unsent then stays in the spool (the message says how many points and
where) and is sent the next time a tracker for that run starts on this machine (a resumed job does) or by
`python -m magface.tracking`. Requests the server refuses (4xx: a bad value) are dropped with a warning.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

# Fail fast against an unreachable server instead of MLflow's default minutes of retries; the sender thread
# does its own retrying, so one request attempt blocks it for at most ~2 x the timeout.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

DEFAULT_EXPERIMENT = "magface"
_PARAM_MAX_LEN = 6000
_BATCH = 1000  # MLflow's log_batch limit on metrics per request
DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as the run's description


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"s": 64}} -> {"loss.s": 64}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def default_tags() -> dict[str, str]:
    """git commit, Ray and torch versions: what is needed to reproduce a run."""
    tags = {}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        if commit:
            tags["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    for mod in ("ray", "torch", "mlflow"):
        try:
            tags[f"{mod}_version"] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional module only loses a tag
            pass
    return tags


def spool_dir() -> Path:
    """Where unsent tracking data waits: $MAGFACE_SPOOL, else <MAGFACE_CACHE or ~/.cache/magface>/mlflow_spool."""
    if os.environ.get("MAGFACE_SPOOL"):
        return Path(os.environ["MAGFACE_SPOOL"]).expanduser()
    return Path(os.environ.get("MAGFACE_CACHE", "~/.cache/magface")).expanduser() / "mlflow_spool"


def _permanent(exc: BaseException) -> bool:
    """A request the server answered with a client error (bad value, unknown run): retrying cannot help."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, FileNotFoundError):  # a queued artifact file that is gone
        return True
    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


class _QuietSenderRetries(logging.Filter):
    """urllib3 logs every retry of a refused connection; from the sender thread that is one line per attempt
    while the server is down, and the tracker already says so once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not threading.current_thread().name.startswith("mlflow-sender")


logging.getLogger("urllib3.connectionpool").addFilter(_QuietSenderRetries())

_open_trackers: "weakref.WeakSet[Tracker]" = weakref.WeakSet()


@atexit.register
def _close_open_trackers() -> None:  # a process that forgot close(): flush briefly, spool the rest
    for t in list(_open_trackers):
        t.close(timeout_s=5.0)


class Tracker:
    """A handle on one MLflow run. A disabled tracker (enabled=False) accepts every call and does nothing.

    All logging calls are non-blocking (queued); `close()` (or `end()`) flushes with a bounded wait.
    """

    def __init__(self, run_id: str | None, *, enabled: bool = True, tracking_uri: str | None = None,
                 max_memory_points: int = 20000, max_spool_points: int = 2_000_000, retry_max_s: float = 5.0):
        self.run_id = run_id
        self.enabled = enabled and run_id is not None
        self.max_memory_points = max_memory_points
        self.max_spool_points = max_spool_points
        self.retry_max_s = retry_max_s
        self.sent_points = 0
        self.dropped_points = 0  # only past max_spool_points, or refused by the server (4xx)
        self._uri = tracking_uri
        self._client = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._ops: deque = deque()  # ("metrics", [[key, value, ts_ms, step], ...]) or (kind, payload)
        self._mem_points = 0
        self._inflight = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._down_since: float | None = None
        self._spool_points = 0
        if not self.enabled:
            return
        if self._uri is None:
            self._uri = _uri()
        self._spool = spool_dir() / f"{run_id}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.jsonl"
        self._adopt_orphan_spools()
        _open_trackers.add(self)
        if self._spool_points or self._spool.exists():
            self._kick()

    # ---------------------------------------------------------------- construction
    @classmethod
    def start(
        cls,
        run_name: str | None = None,
        *,
        experiment: str = DEFAULT_EXPERIMENT,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        enabled: bool = True,
        description: str | None = None,
    ) -> "Tracker":
        """Create (or, with run_id, reopen) a run. Never raises: a server unreachable when a NEW run must be
        created gives a disabled tracker (there is no run id to log to); reopening a known run always works
        (the status update is queued like any other call)."""
        if not enabled:
            return cls(None, enabled=False)
        uri = _uri()
        if run_id is None:
            try:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(uri)
                exp = client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
                all_tags = {**default_tags(), **(tags or {})}
                if parent_run_id:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                if description:
                    all_tags[DESCRIPTION_TAG] = description
                run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
                run_id = run.info.run_id
            except Exception as e:  # noqa: BLE001 - tracking must never stop the job
                log.warning("MLflow tracking disabled: could not start a run at %s (%s)", uri, e)
                return cls(None, enabled=False)
            tracker = cls(run_id, tracking_uri=uri)
            tracker._client = client
        else:
            try:  # a run deleted meanwhile: say so (the caller may start a new one); a server down: queue
                from mlflow.tracking import MlflowClient

                MlflowClient(uri).get_run(run_id)
            except Exception as e:  # noqa: BLE001
                if _permanent(e):
                    log.warning("MLflow run %s not found at %s (%s)", run_id, uri, e)
                    return cls(None, enabled=False)
            tracker = cls(run_id, tracking_uri=uri)
            tracker._put(("status", "RUNNING"))
            if tags or description:
                tracker.set_tags({**(tags or {}), **({DESCRIPTION_TAG: description} if description else {})})
        if params:
            tracker.log_params(params)
        from magface import driver_guard

        driver_guard.watch_run(uri, run_id)  # ended as KILLED if this process dies with the run open
        return tracker

    # ---------------------------------------------------------------- queueing (caller's thread, never blocks)
    def _put(self, op: tuple) -> bool:
        if not self.enabled or self._closed:
            return False
        with self._lock:
            if op[0] == "metrics" and self._ops and self._ops[-1][0] == "metrics" and \
                    len(self._ops[-1][1]) + len(op[1]) <= _BATCH:
                self._ops[-1][1].extend(op[1])
            else:
                self._ops.append(op)
            if op[0] == "metrics":
                self._mem_points += len(op[1])
                if self._mem_points > self.max_memory_points:
                    self._spill_locked(only_metrics=True)
        self._kick()
        return True

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._sender, name=f"mlflow-sender-{self.run_id}", daemon=True)
            self._thread.start()

    def _spill_locked(self, only_metrics: bool) -> None:
        """Move queued ops (oldest first) to the spool file. Caller holds the lock."""
        keep, lines = deque(), []
        for op in self._ops:
            if only_metrics and op[0] != "metrics":
                keep.append(op)
            else:
                lines.append(op)
        self._ops = keep
        n = sum(len(op[1]) for op in lines if op[0] == "metrics")
        self._mem_points -= n
        room = self.max_spool_points - self._spool_points
        if n > room:
            self.dropped_points += n - room
            log.warning("MLflow spool for run %s is full (%d points): dropping %d point(s)", self.run_id,
                        self.max_spool_points, n - room)
            lines = _trim_metrics(lines, room)
        if lines:
            self._spool.parent.mkdir(parents=True, exist_ok=True)
            with open(self._spool, "a") as f:
                for op in lines:
                    f.write(json.dumps(list(op)) + "\n")
            self._spool_points += min(n, max(room, 0))

    # ---------------------------------------------------------------- the sender thread
    def _sender(self) -> None:
        delay = 0.5
        while True:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            while not self._closed:
                try:
                    more = self._send_next()
                except Exception as e:  # noqa: BLE001 - anything here means "not delivered yet"
                    self._went_down(e)
                    if self._closed:
                        return
                    self._wake.wait(timeout=delay)
                    self._wake.clear()
                    delay = min(delay * 2, self.retry_max_s)
                    continue
                if self._down_since is not None:
                    log.warning("MLflow at %s reachable again after %.0f s; sending what was buffered", self._uri,
                                time.monotonic() - self._down_since)
                    self._down_since = None
                delay = 0.5
                if not more:
                    break
            with self._lock:
                if not self._ops and not self._spool_points and not self._spool.exists():
                    self._idle.set()
            if self._closed:
                return

    def _went_down(self, e: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("MLflow at %s not reachable (%s); training continues, %d point(s) buffered and resent "
                        "when it answers", self._uri, e, self.pending_points())

    def _send_next(self) -> bool:
        """Deliver the spool (oldest data) or the next queued op. Returns whether anything is left."""
        self._ensure_client()  # MLflow's import and store set-up take seconds: not while holding an op
        if self._spool.exists():
            self._send_spool()
            return True
        with self._lock:
            if not self._ops:
                return False
            op = self._ops.popleft()
            if op[0] == "metrics":
                self._mem_points -= len(op[1])
            self._inflight = op
        try:
            self._deliver(op)
        except Exception as e:
            if _permanent(e):
                self._refused(op, e)
            else:
                with self._lock:  # back at the head of the queue, retried after the backoff
                    self._ops.appendleft(op)
                    if op[0] == "metrics":
                        self._mem_points += len(op[1])
                    self._inflight = None
                raise
        with self._lock:
            self._inflight = None
            return bool(self._ops) or self._spool.exists()

    def _send_spool(self) -> None:
        sending = self._spool.with_suffix(".sending")
        with self._lock:
            if not sending.exists():
                os.replace(self._spool, sending)
        ops = [tuple(json.loads(line)) for line in sending.read_text().splitlines() if line.strip()]
        n_total = sum(len(op[1]) for op in ops if op[0] == "metrics")
        done = 0
        try:
            for i, op in enumerate(ops):
                try:
                    self._deliver(op)
                except Exception as e:
                    if not _permanent(e):
                        raise
                    self._refused(op, e)
                done = i + 1
        finally:
            rest = ops[done:]
            with self._lock:
                if self._closed:  # close() handed the files over to a later tracker
                    return
                if rest:  # put the undelivered part back in front of anything spilled meanwhile
                    tmp = self._spool.with_suffix(".tmp")
                    with open(tmp, "w") as f:
                        for op in rest:
                            f.write(json.dumps(list(op)) + "\n")
                        if self._spool.exists():
                            f.write(self._spool.read_text())
                    os.replace(tmp, self._spool)
                    sending.unlink()
                else:
                    sending.unlink()
                sent = n_total - sum(len(op[1]) for op in rest if op[0] == "metrics")
                self._spool_points -= sent
                for op in ops[:done]:
                    if op[0] == "artifact":
                        _unlink_quietly(op[1][0])

    def _ensure_client(self) -> None:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self._uri)

    def _deliver(self, op: tuple) -> None:
        self._ensure_client()
        c, kind, payload = self._client, op[0], op[1]
        if kind == "metrics":
            from mlflow.entities import Metric

            c.log_batch(self.run_id, metrics=[Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in payload])
            self.sent_points += len(payload)
        elif kind == "params":
            from mlflow.entities import Param

            c.log_batch(self.run_id, params=[Param(k, v) for k, v in payload.items()])
        elif kind == "tags":
            from mlflow.entities import RunTag

            c.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in payload.items()])
        elif kind == "artifact":
            path, artifact_path = payload
            c.log_artifact(self.run_id, path, artifact_path)
            if op is self._inflight and not self._closed:
                _unlink_quietly(path)
        elif kind == "dataset":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            ds = Dataset(name=payload["name"], digest=payload["digest"], source_type=_source_type(payload["source"]),
                         source=json.dumps({"uri": payload["source"]}), profile=json.dumps(payload["profile"]))
            c.log_inputs(self.run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context",
                                                                                 payload["context"])])])
        elif kind == "status":
            if payload == "RUNNING":
                c.update_run(self.run_id, status="RUNNING")
            else:
                c.set_terminated(self.run_id, status=payload)
        else:
            raise ValueError(f"unknown tracking op {kind!r}")

    def _refused(self, op: tuple, e: BaseException) -> None:
        n = len(op[1]) if op[0] == "metrics" else 0
        self.dropped_points += n
        log.warning("MLflow at %s refused %s for run %s (%s); dropped", self._uri, op[0], self.run_id, e)

    def _adopt_orphan_spools(self) -> None:
        """Take over spool files a previous tracker of this run on this host left (its process is gone)."""
        d = self._spool.parent
        if not d.is_dir():
            return
        host = socket.gethostname()
        for f in sorted(d.glob(f"{self.run_id}.*.jsonl")) + sorted(d.glob(f"{self.run_id}.*.sending")):
            parts = f.name.split(".")
            if len(parts) < 5 or f.with_suffix(".jsonl") == self._spool:
                continue
            h, pid = ".".join(parts[1:-3]), parts[-3]
            gone = pid.startswith("closed-") or (pid.isdigit() and not _alive(int(pid)))
            if h != host or not gone:
                continue
            try:
                text = f.read_text()
                f.unlink()
            except FileNotFoundError:  # another tracker adopted it first
                continue
            self._spool.parent.mkdir(parents=True, exist_ok=True)
            with open(self._spool, "a") as out:
                out.write(text)
            self._spool_points += _count_points(text)

    # ---------------------------------------------------------------- the API
    def pending_points(self) -> int:
        """Metric points not yet delivered (memory + spool)."""
        inflight = self._inflight
        busy = len(inflight[1]) if inflight and inflight[0] == "metrics" else 0
        return self._mem_points + self._spool_points + busy

    def log_params(self, params: Mapping[str, Any]) -> bool:
        flat = {k: str(v)[:_PARAM_MAX_LEN] for k, v in flatten(params).items()}
        items = list(flat.items())
        return all([self._put(("params", dict(items[i:i + 100]))) for i in range(0, len(items), 100)] or [True])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> bool:
        ts = int(time.time() * 1000)
        pts = [[k, float(v), ts, int(step or 0)] for k, v in metrics.items() if v is not None]
        return self._put(("metrics", pts)) if pts else self.enabled

    def set_tags(self, tags: Mapping[str, Any]) -> bool:
        items = [(k, str(v)) for k, v in tags.items()]
        return all([self._put(("tags", dict(items[i:i + 100]))) for i in range(0, len(items), 100)] or [True])

    def set_description(self, text: str) -> bool:
        """The run's description (Markdown) on the MLflow run page."""
        return self.set_tags({DESCRIPTION_TAG: text})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> bool:
        """Queue a copy of the file (the caller may delete or change the original at once)."""
        if not self.enabled or self._closed:
            return False
        copy = self._stash(Path(path).name)
        copy.write_bytes(Path(path).read_bytes())
        return self._put(("artifact", [str(copy), artifact_path]))

    def log_dict(self, obj: Any, filename: str) -> bool:
        """JSON (.json) or YAML (.yaml/.yml) document as an artifact."""
        if filename.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(obj, sort_keys=False)
        else:
            text = json.dumps(obj, indent=2, default=str)
        return self.log_text(text, filename)

    def log_text(self, text: str, filename: str) -> bool:
        if not self.enabled or self._closed:
            return False
        copy = self._stash(Path(filename).name)
        copy.write_text(text)
        return self._put(("artifact", [str(copy), _parent(filename)]))

    def log_figure(self, figure, filename: str) -> bool:
        """A matplotlib figure saved as PNG (or the extension of filename) under the run's artifacts."""
        if not self.enabled or self._closed:
            return False
        copy = self._stash(Path(filename).name)
        figure.savefig(copy, dpi=110, bbox_inches="tight")
        return self._put(("artifact", [str(copy), _parent(filename)]))

    def _stash(self, name: str) -> Path:
        d = self._spool.with_suffix(".files") / uuid.uuid4().hex[:12]
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait (at most timeout_s) until everything queued so far is delivered."""
        if not self.enabled:
            return True
        if self._ops or self._spool.exists():
            self._kick()
        return self._idle.wait(timeout_s)

    def persist(self) -> int:
        """Make everything logged so far survive this process being killed (a checkpoint calls it): the queue,
        and a copy of the metrics being sent (MLflow's SQL stores ignore an identical repeat), go to the spool
        file on local disk (milliseconds). The sender sends it first; if this process dies, the next tracker of
        this run on this machine or `collect_spools` at the end of the job sends it. Returns the points moved."""
        if not self.enabled or self._closed:
            return 0
        with self._lock:
            inflight = self._inflight
            if inflight is not None and inflight[0] == "metrics":
                self._ops.appendleft(("metrics", list(inflight[1])))
                self._mem_points += len(inflight[1])
            moved = self._mem_points
            if self._ops:
                self._spill_locked(only_metrics=False)
        if moved:
            self._kick()
        return moved

    def close(self, timeout_s: float = 30.0) -> int:
        """Flush with a bounded wait, then stop the sender. Returns the number of metric points left unsent
        (kept in the spool file; the message says where and how they are sent later)."""
        if not self.enabled or self._closed:
            return 0
        self.flush(timeout_s)
        self._closed = True
        self._wake.set()
        _open_trackers.discard(self)
        with self._lock:
            if self._inflight is not None:  # stuck on a frozen server: keep a copy (a duplicate is harmless)
                self._ops.appendleft(self._inflight)
                if self._inflight[0] == "metrics":
                    self._mem_points += len(self._inflight[1])
            if self._ops:
                self._spill_locked(only_metrics=False)
            left = self._hand_over_spool_locked()
        if left is not None:
            log.warning("MLflow at %s did not take everything for run %s within %.0f s: %d metric point(s) "
                        "(and any tags/artifacts/status) are kept in %s and are sent when this run next logs "
                        "from this machine (a resumed job does) or by `python -m magface.tracking`",
                        self._uri, self.run_id, timeout_s, left, self._spool.parent)
        return left or 0

    def _hand_over_spool_locked(self) -> int | None:
        """Rename what is left (the part being sent first: it is older) to a closed spool any later tracker of
        this run adopts. Returns its number of metric points, None when nothing is left."""
        parts = [p for p in (self._spool.with_suffix(".sending"), self._spool) if p.exists()]
        if not parts:
            return None
        text = "".join(p.read_text() for p in parts)
        closed = self._spool.with_name(self._spool.name.replace(f".{os.getpid()}.", f".closed-{os.getpid()}.", 1))
        tmp = closed.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, closed)
        for p in parts:
            p.unlink()
        return _count_points(text)

    def end(self, status: str = "FINISHED", timeout_s: float = 30.0) -> bool:
        """Mark the run terminated (FINISHED, FAILED, KILLED) after everything logged before; True if delivered."""
        if not self.enabled:
            return False
        self._put(("status", status))
        from magface import driver_guard

        driver_guard.release_run(self.run_id)
        return self.close(timeout_s) == 0 and not self._spool.exists()

    # ---------------------------------------------------------------- MLflow 3 entities
    def log_embedder_model(self, checkpoint: str, name: str = "backbone",
                           registered_model_name: str | None = None) -> str | None:
        """Log a checkpoint's backbone as an MLflow model (pyfunc around the Embedder, pixel convention inside,
        input example and signature), loadable with mlflow.pyfunc.load_model and servable with `mlflow models
        serve`. Synchronous (a one-off at the end of a job); returns the model URI, or None after a warning."""
        if not self.enabled:
            return None
        try:
            self.flush(30.0)
            from magface.mlflow_model import log_embedder_model

            return log_embedder_model(checkpoint, run_id=self.run_id, tracking_uri=self._uri, name=name,
                                      registered_model_name=registered_model_name)
        except Exception as e:  # noqa: BLE001 - the run's metrics matter more than its model entry
            log.warning("MLflow: could not log the model from %s for run %s (%s)", checkpoint, self.run_id, e)
            return None

    def log_dataset(self, name: str, source: str, digest: str, context: str = "training",
                    profile: Mapping[str, Any] | None = None) -> bool:
        """A run input (what the MLflow UI lists under Datasets): name, source URI, content digest, context."""
        return self._put(("dataset", {"name": name, "source": source, "digest": digest, "context": context,
                                      "profile": dict(profile or {})}))

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")


def _count_points(spool_text: str) -> int:
    return sum(len(json.loads(line)[1]) for line in spool_text.splitlines() if line.startswith('["metrics"'))


def _trim_metrics(ops: list, room: int) -> list:
    out = []
    for op in ops:
        if op[0] == "metrics":
            keep = op[1][:max(room, 0)]
            room -= len(keep)
            if keep:
                out.append(("metrics", keep))
        else:
            out.append(op)
    return out


def _parent(filename: str) -> str | None:
    p = str(Path(filename).parent)
    return None if p == "." else p


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed worker not yet reaped by its parent is a zombie: gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _source_type(source: str) -> str:
    return source.split("://", 1)[0] if "://" in source else "local"


def dataset_digest(paths: list[str], max_sized: int = 256) -> str:
    """A short digest of a file set from names and sizes (cheap for S3 and terabytes of shards); beyond
    `max_sized` files (one request each on S3) from names only."""
    from magface.data import storage

    paths = sorted(str(p) for p in paths)
    h = hashlib.sha256()
    for p in paths:
        size = (storage.size(p) if storage.exists(p) else -1) if len(paths) <= max_sized else ""
        h.update(f"{p.rstrip('/').rsplit('/', 1)[-1]}\0{size}\n".encode())
    return h.hexdigest()[:16]


def _spool_files(run_ids: list[str] | None = None) -> list[Path]:
    d = spool_dir()
    if not d.is_dir():
        return []
    files = sorted(d.glob("*.jsonl")) + sorted(d.glob("*.sending"))
    return [f for f in files if run_ids is None or f.name.split(".", 1)[0] in run_ids]


def _owner_alive(f: Path) -> bool:
    parts = f.name.split(".")
    host, pid = ".".join(parts[1:-3]), parts[-3] if len(parts) >= 5 else ""
    # this process's own open trackers send their spools themselves
    return host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))


def flush_spools(run_ids: list[str] | None = None, timeout_s: float = 60.0, wait_s: float = 0.0,
                 tracking_uri: str | None = None) -> int:
    """Send every spool left on this machine (for `run_ids`, else all runs) by trackers whose process is gone,
    first waiting up to `wait_s` for the processes that own one to exit (a job's workers shutting down).
    Returns the points still unsent."""
    deadline = time.monotonic() + wait_s
    while any(_owner_alive(f) for f in _spool_files(run_ids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = 0
    for run_id in sorted({f.name.split(".", 1)[0] for f in _spool_files(run_ids)}):
        left += Tracker(run_id, tracking_uri=tracking_uri).close(timeout_s)
    return left


def collect_spools(run_ids: list[str], timeout_s: float = 60.0, wait_s: float = 15.0,
                   tracking_uri: str | None = None) -> int:
    """End of a job: send what its trackers left in spools, on this machine and on every other alive node of
    the Ray cluster this process is connected to (a tiny task per node; nothing is imported there unless that
    node holds a spool of these runs). A worker killed mid-run, or closed while MLflow was slow, leaves its
    points there. Returns the points still unsent (they stay in the spools, see the module's docstring)."""
    run_ids = [r for r in run_ids if r]
    if not run_ids:
        return 0
    left, pending = 0, []
    try:
        import ray

        if ray.is_initialized():
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = ray.get_runtime_context().get_node_id()
            task = ray.remote(num_cpus=0, max_retries=0)(flush_spools)
            pending = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                       .remote(run_ids, timeout_s, wait_s, tracking_uri)
                       for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    except ImportError:
        pass
    left += flush_spools(run_ids, timeout_s, wait_s, tracking_uri)
    if pending:
        import ray

        ready, not_ready = ray.wait(pending, num_returns=len(pending), timeout=timeout_s + wait_s + 30)
        for ref in ready:
            try:
                left += ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a node lost meanwhile keeps its spool for later
                log.warning("could not send the MLflow spools of a node: %s", e)
        if not_ready:
            log.warning("%d node(s) did not finish sending their MLflow spools in time; they are sent by "
                        "`python -m magface.tracking` on that node", len(not_ready))
            for ref in not_ready:
                ray.cancel(ref, force=True)
    return left


def _uri() -> str:
    # The environment first, as the module says: MLflow itself would prefer a URI some earlier code set with
    # mlflow.set_tracking_uri, so a job whose caller changed MLFLOW_TRACKING_URI would log to the old store.
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    try:
        import mlflow

        return mlflow.get_tracking_uri()
    except Exception:  # noqa: BLE001
        return "<mlflow default>"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Small helper used for result files next to MLflow: temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    n = flush_spools()
    print(f"MLflow spool {spool_dir()}: {'all sent' if n == 0 else f'{n} point(s) still unsent'}")
