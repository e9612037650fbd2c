"""Driver side of a training job: the Ray Data pipeline, the TorchTrainer, the MLflow run.

`run(cfg)` is what `pipelines/train.py` calls. The job name and storage path identify the run: Ray Train V2
finds the previous attempt's checkpoint list under `<storage_path>/<name>` and the workers resume from its
latest checkpoint, so rerunning the same command continues an interrupted job.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from magface.config import Config
from magface.data import storage
from magface.train import faults, interrupt, resume
from magface.train.loop import Runtime, build_loop_config, train_loop_per_worker
from magface.train.schedule import epoch_steps

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

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:  # MLflow unsets the variable when it puts back "no URI set": later runs would log elsewhere
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def build_dataset(cfg: Config):
    """RecordIO shards -> shuffled (per epoch: the pipeline re-executes every time a shard is iterated) ->
    decoded uint8 images. Shuffling happens on the encoded rows, which are ~10x smaller than decoded ones."""
    from magface.data import decode_images, read_recordio

    # include_paths: keys restart in every shard, so a decode error must name the shard to be findable
    ds = read_recordio(cfg.data.train, num_classes=cfg.data.num_classes, include_paths=True)
    if cfg.data.shuffle == "full":
        ds = ds.random_shuffle()
    elif cfg.data.shuffle == "local":
        ds = ds.randomize_block_order()
    size = cfg.data.image_size
    return decode_images(ds, image_size=(size, size), flip=cfg.data.flip, seed=cfg.data.seed,
                         resize=cfg.data.resize)


def steps_per_epoch(cfg: Config, num_images: int) -> int:
    """Optimizer steps per epoch, the same for every worker count the config allows (schedule.epoch_steps)."""
    s, g = cfg.scaling, cfg.global_batch_size
    steps = epoch_steps(num_images, g, s.min_workers, s.max_workers)
    if cfg.train.max_steps_per_epoch is not None:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    if steps <= 0:
        raise ValueError(f"{num_images} images give no full global batch of {g} split across "
                         f"{s.min_workers}-{s.max_workers} worker(s); lower train.global_batch_size "
                         f"(or train.batch_size)")
    return steps


def make_runtime(cfg: Config, steps: int, uri: str | None, run_id: str | None,
                 keys_log_dir: str | None = None) -> Runtime:
    """What the workers need beyond the config: steps per epoch, where to track, the fault-injection marker."""
    marker = faults.marker_path(storage_path(cfg), cfg.train.name)
    return Runtime(steps_per_epoch=steps, global_batch_size=cfg.global_batch_size, tracking_uri=uri,
                   run_id=run_id,
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
        # [min, max] is Ray Train's elastic mode: it starts with as many workers as the cluster holds in that
        # range, restarts from the latest checkpoint with fewer when a node is lost, and with more when the
        # monitor (every elastic_resize_interval_s) finds room for them
        scaling_config=ray.train.ScalingConfig(
            num_workers=tuple(s.num_workers) if s.elastic else s.num_workers, use_gpu=s.use_gpu,
            resources_per_worker=resources,
            **({"elastic_resize_monitor_interval_s": s.elastic_resize_interval_s} if s.elastic else {})),
        run_config=ray.train.RunConfig(
            name=cfg.train.name,
            storage_path=storage_path(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.num_to_keep,
                checkpoint_score_attribute=cfg.train.checkpoint_score,
                checkpoint_score_order="max"),
            # Train V2 patches print() on workers to tee each line to its logger too, and Ray streams both
            # copies to the driver: every progress line appeared twice. Plain print: once.
            worker_runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                                             "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            callbacks=list(callbacks) or None,
        ),
        datasets=datasets,
    )


def run(cfg: Config, dataset=None, *, keys_log_dir: str | None = None, parent_run_id: str | None = None,
        run_name: str | None = None) -> TrainResult:
    """Train to completion (or resume and finish). `dataset` overrides the RecordIO pipeline (tests)."""
    from magface.tracking import Tracker, collect_spools

    if dataset is None:
        dataset = build_dataset(cfg)
    num_images = cfg.data.num_images or dataset.count()
    spe = steps_per_epoch(cfg, num_images)

    uri = tracking_uri(cfg) if cfg.tracking.enabled else ""  # tracking off: MLflow need not be installed
    run_dir = storage.join(storage_path(cfg), cfg.train.name)
    earlier = resume.read_run_record(run_dir)  # a re-run continues the job's MLflow run
    reopen = earlier["run_id"] if earlier and earlier.get("tracking_uri") == uri else None
    with _bound_tracking_uri(uri) if uri else nullcontext():  # the tracker's client binds to it at creation
        tracker = Tracker.start(run_name or cfg.train.name, experiment=cfg.tracking.experiment, run_id=reopen,
                                params=None if reopen else cfg.to_dict(), parent_run_id=parent_run_id,
                                enabled=cfg.tracking.enabled,
                                tags={"job_name": cfg.train.name, "storage_path": storage_path(cfg),
                                      "loss": cfg.loss.kind, "backbone": cfg.model.backbone,
                                      # a continued run moves under the parent of this attempt
                                      **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})})
        if reopen and tracker.run_id is None and cfg.tracking.enabled:  # that run is gone: a new one, linked
            tracker = Tracker.start(run_name or cfg.train.name, experiment=cfg.tracking.experiment,
                                    params=cfg.to_dict(), parent_run_id=parent_run_id,
                                    tags={"job_name": cfg.train.name, "continues_run_id": reopen})
    if tracker.run_id:
        resume.write_run_record(run_dir, tracker.run_id, uri)
        if not reopen:
            _describe_run(tracker, cfg, num_images)
    runtime = make_runtime(cfg, spe, uri, tracker.run_id, keys_log_dir=keys_log_dir)
    runtime.resume_from = resume.newest_complete_checkpoint(run_dir)
    runtime.stop_flag = interrupt.create_stop_flag()
    if runtime.resume_from or reopen:
        print(f"[magface] resuming job {cfg.train.name!r} from {runtime.resume_from or 'its start'}"
              + (f"; continuing MLflow run {reopen}" if reopen and tracker.run_id == reopen else ""), flush=True)
    s = cfg.scaling
    workers = f"{s.min_workers}-{s.max_workers} workers (elastic)" if s.elastic else f"{s.num_workers} worker(s)"
    print(f"[magface] job {cfg.train.name!r}: {num_images} images, {workers}, global batch "
          f"{cfg.global_batch_size}, {spe} steps/epoch x {cfg.train.epochs} epochs; "
          f"storage {storage_path(cfg)}; MLflow {uri} run {tracker.run_id}", flush=True)
    trainer = build_trainer(cfg, {"train": dataset}, runtime)
    try:
        result, stopped = interrupt.fit_interruptibly(trainer, runtime.stop_flag,
                                                      on_hard_stop=lambda _: tracker.end("KILLED"))
    except Exception:
        collect_spools([tracker.run_id], tracking_uri=uri or None)
        tracker.end("FAILED")
        raise
    # what workers killed or closed while MLflow was slow left unsent, on any node
    collect_spools([tracker.run_id], tracking_uri=uri or None)
    if stopped:
        tracker.end("KILLED")
        raise interrupt.TrainingInterrupted(stopped, resume.newest_complete_checkpoint(run_dir), tracker.run_id)
    best = None
    if result.best_checkpoints:
        key = cfg.train.checkpoint_score
        ranked = [(m.get(key), c) for c, m in result.best_checkpoints] if key else []
        ranked = [rc for rc in ranked if rc[0] is not None]
        best = max(ranked, key=lambda rc: rc[0])[1].path if ranked else result.checkpoint.path
    ckpt = _uri(cfg, result.checkpoint.path) if result.checkpoint else None
    best = _uri(cfg, best) if best else None
    tracker.set_tags({"checkpoint_path": ckpt, "best_checkpoint_path": best})
    if result.metrics:  # one value each: tags (a run-table column), not single-point metric charts
        tracker.set_tags({f"final.{k}": f"{v:.6g}" if isinstance(v, float) else v
                          for k, v in result.metrics.items() if isinstance(v, (int, float))})
    if ckpt and result.error is None and cfg.tracking.log_model:
        model_uri = tracker.log_embedder_model(ckpt, registered_model_name=cfg.tracking.registered_model)
        if model_uri:
            print(f"[magface] MLflow model {model_uri} (mlflow.pyfunc.load_model; pixel convention inside)",
                  flush=True)
    tracker.end("FINISHED" if result.error is None else "FAILED")
    return TrainResult(ckpt, best, dict(result.metrics or {}), tracker.run_id, spe, result.error)


def _describe_run(tracker, cfg: Config, num_images: int) -> None:
    """The run page's description and its training data as a run input (shards with a digest)."""
    from magface.tracking import dataset_digest

    tracker.set_description(
        f"MagFace training job `{cfg.train.name}`: {cfg.loss.kind} loss, {cfg.model.backbone} backbone "
        f"(embedding {cfg.model.embedding_size}), {num_images} images of {cfg.data.num_classes} identities at "
        f"{cfg.data.image_size}x{cfg.data.image_size}, pixel convention {cfg.data.pixel_convention}; "
        f"{cfg.train.epochs} epochs, global batch {cfg.global_batch_size}. Checkpoints: "
        f"{storage.join(storage_path(cfg), cfg.train.name)}.")
    if cfg.data.train:
        try:
            from magface.data.datasource import _expand

            shards = _expand(cfg.data.train)
            tracker.log_dataset("train", ",".join(map(str, cfg.data.train)),
                                dataset_digest(shards + [s[:-4] + ".idx" for s in shards]), context="training",
                                profile={"shards": len(shards), "images": num_images,
                                         "classes": cfg.data.num_classes})
        except Exception as e:  # noqa: BLE001 - a missing run input must not stop training
            log.warning("MLflow: training data not logged as a run input (%s)", e)


def _uri(cfg: Config, path: str) -> str:
    """Ray reports checkpoints on S3 as "bucket/key" (a pyarrow path); give users and the evaluation the URI."""
    if "://" in path or "://" not in storage_path(cfg):
        return path
    scheme = storage_path(cfg).split("://", 1)[0]
    return f"{scheme}://{path}"


def connect(cfg: Config | None = None, **kwargs) -> str:
    """The connection rule lives in magface.cluster (one for every pipeline); kept here for callers."""
    from magface.cluster import connect as _connect

    return _connect(cfg, **kwargs)
