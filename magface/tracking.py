"""The one place that talks to MLflow.

`MLFLOW_TRACKING_URI` chooses the server; unset, MLflow's own local default is used. Tracking must never
take a training run down: every call is guarded, a failure is reported once as a warning, and the tracker
backs off (no calls for `retry_after_s`) so an unreachable server does not stall the training loop.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

# Fail fast against an unreachable server instead of MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

DEFAULT_EXPERIMENT = "magface"
_PARAM_MAX_LEN = 6000


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


class Tracker:
    """A handle on one MLflow run. A disabled tracker (enabled=False) accepts every call and does nothing."""

    def __init__(self, run_id: str | None, *, enabled: bool = True, retry_after_s: float = 60.0):
        self.run_id = run_id
        self.enabled = enabled and run_id is not None
        self.retry_after_s = retry_after_s
        self._down_since: float | None = None
        self._warned = False
        self._client = None

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
    ) -> "Tracker":
        """Create (or, with run_id, reopen) a run. Never raises: an unreachable server gives a disabled tracker."""
        if not enabled:
            return cls(None, enabled=False)
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            if run_id is None:
                exp = client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
                all_tags = {**default_tags(), **(tags or {})}
                if parent_run_id:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
                run_id = run.info.run_id
            else:
                client.update_run(run_id, status="RUNNING")
        except Exception as e:  # noqa: BLE001 - tracking must never stop the job
            log.warning("MLflow tracking disabled: could not start a run at %s (%s)", _uri(), e)
            return cls(None, enabled=False)
        tracker = cls(run_id)
        tracker._client = client
        if params:
            tracker.log_params(params)
        return tracker

    # ---------------------------------------------------------------- guarded calls
    def _call(self, what: str, fn, *args, **kwargs) -> bool:
        if not self.enabled:
            return False
        if self._down_since is not None and time.monotonic() - self._down_since < self.retry_after_s:
            return False
        try:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient()
            fn(self._client, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if self._down_since is None or not self._warned:
                log.warning("MLflow %s failed at %s (%s); training continues, retrying in %.0fs",
                            what, _uri(), e, self.retry_after_s)
                self._warned = True
            self._down_since = time.monotonic()
            return False
        if self._down_since is not None:
            log.warning("MLflow at %s reachable again", _uri())
        self._down_since = None
        return True

    def log_params(self, params: Mapping[str, Any]) -> bool:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:_PARAM_MAX_LEN]) for k, v in flatten(params).items()]
        return self._call("log_params", lambda c: [c.log_batch(self.run_id, params=flat[i:i + 100])
                                                  for i in range(0, len(flat), 100)])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> bool:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        return self._call("log_metrics", lambda c: c.log_batch(self.run_id, metrics=ms))

    def set_tags(self, tags: Mapping[str, Any]) -> bool:
        return self._call("set_tags", lambda c: [c.set_tag(self.run_id, k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> bool:
        return self._call("log_artifact", lambda c: c.log_artifact(self.run_id, str(path), artifact_path))

    def log_dict(self, obj: Any, filename: str) -> bool:
        """JSON (.json) or YAML (.yaml/.yml) document as an artifact."""
        return self._call("log_dict", lambda c: c.log_dict(self.run_id, obj, filename))

    def log_text(self, text: str, filename: str) -> bool:
        return self._call("log_text", lambda c: c.log_text(self.run_id, text, filename))

    def log_figure(self, figure, filename: str) -> bool:
        """A matplotlib figure saved as PNG (or the extension of filename) under the run's artifacts."""
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / Path(filename).name
            figure.savefig(p, dpi=110, bbox_inches="tight")
            sub = str(Path(filename).parent) if str(Path(filename).parent) != "." else None
            return self.log_artifact(p, sub)

    def end(self, status: str = "FINISHED") -> bool:
        return self._call("end_run", lambda c: c.set_terminated(self.run_id, status=status))

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")


def _uri() -> str:
    try:
        import mlflow

        return mlflow.get_tracking_uri()
    except Exception:  # noqa: BLE001
        return os.environ.get("MLFLOW_TRACKING_URI", "<mlflow default>")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Small helper used for result files next to MLflow: temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
