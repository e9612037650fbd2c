"""Driver side of a training job: the Ray Data pipeline, the TorchTrainer, the MLflow run.

`run(cfg)` is what `pipelines/train.py` calls. The job name and storage path identify the run: Ray Train V2
finds the previous attempt's checkpoint list under `<storage_path>/<name>` and the workers resume from its
latest checkpoint, so rerunning the same command continues an interrupted job.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

from magface.config import Config
from magface.train import faults
from magface.train.loop import Runtime, build_loop_config, train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint_path: str | None  # the latest checkpoint directory (local path or URI)
    best_checkpoint_path: str | None
    metrics: dict
    run_id: str | None
    steps_per_epoch: int
    error: BaseException | None = None


def storage_path(cfg: Config) -> str:
    p = cfg.train.storage_path
    return p if "://" in p else os.path.abspath(os.path.expanduser(p))


def tracking_uri(cfg: Config) -> str:
    """Explicit setting, else MLFLOW_TRACKING_URI, else MLflow's default resolved on the driver (absolute, so
    workers with another working directory log to the same store)."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


@contextmanager
def _bound_tracking_uri(uri: str):
    """MLflow's process-wide URI set to `uri` for the duration (a URI set earlier with mlflow.set_tracking_uri
    would otherwise win over MLFLOW_TRACKING_URI), then put back."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


def build_dataset(cfg: Config):
    """RecordIO shards -> shuffled (per epoch: the pipeline re-executes every time a shard is iterated) ->
    decoded uint8 images. Shuffling happens on the encoded rows, which are ~10x smaller than decoded ones."""
    from magface.data import decode_images, read_recordio

    ds = read_recordio(cfg.data.train, num_classes=cfg.data.num_classes)
    if cfg.data.shuffle == "full":
        ds = ds.random_shuffle()
    elif cfg.data.shuffle == "local":
        ds = ds.randomize_block_order()
    size = cfg.data.image_size
    return decode_images(ds, image_size=(size, size), flip=cfg.data.flip, seed=cfg.data.seed)


def steps_per_epoch(cfg: Config, num_images: int) -> int:
    """Streaming split gives every worker floor(N / W) rows; each drops its last partial batch."""
    steps = (num_images // cfg.scaling.num_workers) // cfg.train.batch_size
    if cfg.train.max_steps_per_epoch is not None:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    if steps <= 0:
        raise ValueError(f"{num_images} images give no full batch of {cfg.train.batch_size} per worker with "
                         f"{cfg.scaling.num_workers} workers; lower train.batch_size")
    return steps


def make_runtime(cfg: Config, steps: int, uri: str | None, run_id: str | None,
                 keys_log_dir: str | None = None) -> Runtime:
    """What the workers need beyond the config: steps per epoch, where to track, the fault-injection marker."""
    marker = faults.marker_path(storage_path(cfg), cfg.train.name)
    return Runtime(steps_per_epoch=steps, tracking_uri=uri, run_id=run_id,
                   fault_marker=str(marker) if marker and cfg.train.fault_kill_rank is not None else None,
                   keys_log_dir=keys_log_dir)


def build_trainer(cfg: Config, datasets: dict, runtime: Runtime, callbacks=()):
    """The job's TorchTrainer; `callbacks` are Train V2 user callbacks (the sweep's Tune reporter)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=build_loop_config(cfg, runtime),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.train.name,
            storage_path=storage_path(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.num_to_keep,
                checkpoint_score_attribute=cfg.train.checkpoint_score,
                checkpoint_score_order="max"),
            worker_runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}},
            callbacks=list(callbacks) or None,
        ),
        datasets=datasets,
    )


def run(cfg: Config, dataset=None, *, keys_log_dir: str | None = None, parent_run_id: str | None = None,
        run_name: str | None = None) -> TrainResult:
    """Train to completion (or resume and finish). `dataset` overrides the RecordIO pipeline (tests)."""
    from magface.tracking import Tracker

    if dataset is None:
        dataset = build_dataset(cfg)
    num_images = cfg.data.num_images or dataset.count()
    spe = steps_per_epoch(cfg, num_images)

    uri = tracking_uri(cfg)
    with _bound_tracking_uri(uri):  # the tracker's client binds to the URI at creation
        tracker = Tracker.start(run_name or cfg.train.name, experiment=cfg.tracking.experiment,
                                params=cfg.to_dict(), parent_run_id=parent_run_id, enabled=cfg.tracking.enabled,
                                tags={"job_name": cfg.train.name, "storage_path": storage_path(cfg),
                                      "loss": cfg.loss.kind, "backbone": cfg.model.backbone})
    runtime = make_runtime(cfg, spe, uri, tracker.run_id, keys_log_dir=keys_log_dir)
    print(f"[magface] job {cfg.train.name!r}: {num_images} images, {cfg.scaling.num_workers} worker(s) x "
          f"{cfg.train.batch_size}, {spe} steps/epoch x {cfg.train.epochs} epochs; "
          f"storage {storage_path(cfg)}; MLflow {uri} run {tracker.run_id}", flush=True)
    trainer = build_trainer(cfg, {"train": dataset}, runtime)
    try:
        result = trainer.fit()
    except Exception:
        tracker.end("FAILED")
        raise
    best = None
    if result.best_checkpoints:
        key = cfg.train.checkpoint_score
        ranked = [(m.get(key), c) for c, m in result.best_checkpoints] if key else []
        ranked = [rc for rc in ranked if rc[0] is not None]
        best = max(ranked, key=lambda rc: rc[0])[1].path if ranked else result.checkpoint.path
    ckpt = _uri(cfg, result.checkpoint.path) if result.checkpoint else None
    best = _uri(cfg, best) if best else None
    tracker.set_tags({"checkpoint_path": ckpt, "best_checkpoint_path": best})
    if result.metrics:
        tracker.log_metrics({f"final_{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float))})
    tracker.end("FINISHED" if result.error is None else "FAILED")
    return TrainResult(ckpt, best, dict(result.metrics or {}), tracker.run_id, spe, result.error)


def _uri(cfg: Config, path: str) -> str:
    """Ray reports checkpoints on S3 as "bucket/key" (a pyarrow path); give users and the evaluation the URI."""
    if "://" in path or "://" not in storage_path(cfg):
        return path
    scheme = storage_path(cfg).split("://", 1)[0]
    return f"{scheme}://{path}"


def connect(cfg: Config | None = None, *, num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Attach to the cluster named by RAY_ADDRESS (set by `ray job submit`; "auto" finds a local head), else
    start a private local Ray with enough logical CPUs for the trainers plus Ray Data's tasks (or `num_cpus`).
    `dashboard` starts the dashboard (http://127.0.0.1:<port>, printed by Ray), whose state API Ray Train's
    placement-group cleaner needs: without it the CPUs of a trial that Tune stopped stay reserved and the next
    trial waits, and the cleaner warns every second of a training run."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    need = 1
    if cfg is not None:
        need = int(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 0.999) + 1
    env = {"RAY_AUTH_MODE": "disabled"}
    extra = {}
    if dashboard:
        # Workers find the state API by scanning for Ray instances, which fails when this machine runs another
        # one (a test session, a second sweep); name this instance's dashboard to them explicitly.
        extra["dashboard_port"] = _free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{extra['dashboard_port']}"
    ray.init(address="local", num_cpus=num_cpus or max(os.cpu_count() or 1, need), include_dashboard=dashboard,
             runtime_env={"env_vars": env}, **extra)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
