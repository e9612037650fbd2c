"""The per-worker training loop. It talks to Ray only through `ray.train.*`, so the same function runs under
TorchTrainer (any number of workers), under Tune, and in a 1-worker test.

Per step: uint8 batch -> PixelConvention -> backbone (DDP, autocast) -> ShardedClassifier (own shard, not in
DDP; margin math in fp32) -> backward (GradScaler for fp16) -> clip the backbone gradient -> SGD -> per-step lr.
Per epoch: every rank writes its train state into one temporary checkpoint folder (rank 0 also `model.pt`),
and `ray.train.report` merges the ranks' files into one checkpoint directory in storage.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from magface.config import Config
from magface.train import faults
from magface.train.schedule import build_scheduler
from magface.train.state import load_train_state, restore_train_state, save_train_state

log = logging.getLogger(__name__)

RUNTIME_KEY = "runtime"  # driver-computed values passed next to the config sections


@dataclass
class Runtime:
    """What the driver works out before training and every worker needs."""

    steps_per_epoch: int
    tracking_uri: str | None = None
    run_id: str | None = None
    fault_marker: str | None = None
    keys_log_dir: str | None = None  # audit: each rank saves the sample keys it trained on, per epoch
    extra: dict = field(default_factory=dict)


def build_loop_config(cfg: Config, runtime: Runtime) -> dict:
    d = cfg.to_dict()
    d[RUNTIME_KEY] = dict(runtime.__dict__)
    return d


def magnitude_stats(mag: np.ndarray, l_a: float, u_a: float) -> dict[str, float]:
    """Summary of feature magnitudes, with the fractions stuck at the clamp bounds (a collapse symptom)."""
    p5, p50, p95 = np.percentile(mag, [5, 50, 95])
    tol = 1e-3 * (u_a - l_a)
    return {
        "mag_mean": float(mag.mean()), "mag_min": float(mag.min()), "mag_max": float(mag.max()),
        "mag_p5": float(p5), "mag_p50": float(p50), "mag_p95": float(p95),
        "mag_frac_at_l_a": float((mag <= l_a + tol).mean()), "mag_frac_at_u_a": float((mag >= u_a - tol).mean()),
    }


def collapse_warning(stats: dict[str, float], threshold: float = 0.5) -> str | None:
    for bound in ("l_a", "u_a"):
        frac = stats[f"mag_frac_at_{bound}"]
        if frac >= threshold:
            return (f"magnitude collapse: {frac:.0%} of samples sit at {bound}; the magnitude no longer ranks "
                    f"quality (check lambda_g feasibility, lr and the l_a/u_a range)")
    return None


def _init_classifier_shard(classifier, seed: int) -> None:
    """Draw the full class-centre matrix from one seed and keep this rank's rows, so a run starts from the
    same weights whatever the number of workers (the sharded classifier draws per shard otherwise)."""
    g = torch.Generator().manual_seed(seed + 7919)
    full = torch.normal(0.0, 0.01, (classifier.num_classes, classifier.embedding_size), generator=g)
    with torch.no_grad():
        classifier.weight.copy_(full[classifier.class_start:classifier.class_end])


def _histogram_figure(mag: np.ndarray, epoch: int, l_a: float, u_a: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(mag, bins=60, color="tab:blue")
    for x in (l_a, u_a):
        ax.axvline(x, color="tab:red", ls="--", lw=1)
    ax.set_xlabel("feature magnitude ||f||")
    ax.set_ylabel("samples")
    ax.set_title(f"epoch {epoch}: magnitudes (rank 0)")
    return fig


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    from magface.checkpoint import save_model_file
    from magface.models import get_backbone
    from magface.sharded_fc import ShardedClassifier
    from magface.tracking import Tracker

    config = dict(config)
    rt = Runtime(**config.pop(RUNTIME_KEY))
    cfg = Config.from_dict(config, where="train_loop_per_worker config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)

    # ---- model: backbone in DDP, classifier shard outside it
    backbone_kwargs = {"trainable_feature_scale": cfg.model.resolved_feature_scale(cfg.loss),
                       **cfg.model.backbone_kwargs}
    backbone = get_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                            input_size=cfg.data.image_size, **backbone_kwargs)
    if cfg.model.sync_bn and world > 1:
        if device.type == "cpu":
            raise ValueError("model.sync_bn needs GPUs (torch's SyncBatchNorm has no CPU kernel)")
        backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    backbone.to(device)
    model = DistributedDataParallel(backbone, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else backbone
    classifier = ShardedClassifier(cfg.model.embedding_size, cfg.data.num_classes, cfg.loss, rank=rank,
                                   world_size=world, sample_rate=cfg.model.sample_rate, seed=cfg.train.seed)
    _init_classifier_shard(classifier, cfg.train.seed)
    classifier.to(device)

    optimizer = torch.optim.SGD(
        [{"params": backbone.parameters()}, {"params": classifier.parameters()}],
        lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=rt.steps_per_epoch, epochs=cfg.train.epochs)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    convention = cfg.data.convention

    # ---- resume
    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            from magface.checkpoint import load_model_file

            saved = load_model_file(ckpt_dir)
            backbone.load_state_dict(saved["state_dict"])
            state = load_train_state(ckpt_dir, rank=rank, world_size=world, map_location=device)
            start_epoch, step = restore_train_state(state, classifier=classifier, optimizer=optimizer,
                                                    scheduler=scheduler, scaler=scaler)
        if rank == 0:
            print(f"[magface] resumed from checkpoint: epoch {start_epoch}, step {step}", flush=True)

    tracker = None
    if rank == 0 and cfg.tracking.enabled and rt.run_id:
        if rt.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = rt.tracking_uri
        tracker = Tracker(rt.run_id)

    shard = ray.train.get_dataset_shard("train")
    total_steps = rt.steps_per_epoch * cfg.train.epochs
    steps_cap = cfg.train.max_steps_per_epoch
    l_a, u_a = cfg.loss.l_a, cfg.loss.u_a
    t_start, step_at_start = time.perf_counter(), step

    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        classifier.train()
        if cfg.model.freeze_bn:
            for module in backbone.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        epoch_mags, epoch_keys = [], []
        sums = {"loss": 0.0, "accuracy": 0.0, "n": 0}
        window_t, window_samples = time.perf_counter(), 0
        timed_from, timed_samples = None, 0  # epoch throughput, from the end of the first step (warm-up)
        batches = shard.iter_torch_batches(
            batch_size=cfg.train.batch_size, drop_last=True,
            local_shuffle_buffer_size=cfg.data.local_shuffle_buffer if cfg.data.shuffle == "local" else None,
            local_shuffle_seed=None)
        for i, batch in enumerate(batches):
            if steps_cap is not None and i >= steps_cap:
                break
            faults.maybe_kill(rank=rank, step=step, kill_rank=cfg.train.fault_kill_rank,
                              kill_step=cfg.train.fault_kill_step,
                              marker=Path(rt.fault_marker) if rt.fault_marker else None,
                              settle=lambda: ray.train.get_all_reported_checkpoints(timeout_s=60))
            images = convention.apply(batch["image"].to(device, non_blocking=True))
            labels = batch["label"].to(device, non_blocking=True).long()
            if rt.keys_log_dir:
                epoch_keys.append(batch["key"].numpy().copy())
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                features = model(images)
            loss, metrics = classifier(features.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(backbone.parameters(), cfg.optim.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            window_samples += labels.shape[0] * world
            if timed_from is None:
                timed_from = time.perf_counter()
            else:
                timed_samples += labels.shape[0] * world

            if rank == 0:
                mags = features.detach().float().norm(dim=1).cpu().numpy()
                epoch_mags.append(mags)
                sums["loss"] += float(loss.detach())
                sums["accuracy"] += float(metrics["accuracy"])
                sums["n"] += 1
                if step % cfg.tracking.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    sps = window_samples / max(now - window_t, 1e-9)
                    window_t, window_samples = now, 0
                    stats = magnitude_stats(mags, l_a, u_a)
                    m = {"loss": float(loss.detach()), "ce": float(metrics["ce"]), "reg": float(metrics["reg"]),
                         "accuracy": float(metrics["accuracy"]), "lr": scheduler.get_last_lr()[0],
                         "samples_per_s": sps, "epoch": epoch, **stats}
                    # magnitudes start below l_a at initialisation: judge collapse from the second epoch on
                    warning = collapse_warning(stats) if cfg.loss.uses_magnitude and epoch > 0 else None
                    m["magnitude_collapse"] = float(warning is not None)
                    if warning:
                        print(f"[magface] WARNING {warning}", flush=True)
                    if tracker:
                        tracker.log_metrics(m, step=step)
                    done = step - step_at_start
                    eta = (total_steps - step) * (time.perf_counter() - t_start) / max(done, 1)
                    print(f"[magface] epoch {epoch + 1}/{cfg.train.epochs} step {step}/{total_steps} "
                          f"loss {m['loss']:.3f} acc {m['accuracy']:.3f} lr {m['lr']:.4g} "
                          f"|f| {stats['mag_mean']:.1f} ({stats['mag_p5']:.1f}-{stats['mag_p95']:.1f}) "
                          f"{sps:.1f} samples/s ETA {eta / 60:.1f} min", flush=True)

        # ---- end of epoch: checkpoint (all ranks), histogram (rank 0), report (barrier)
        if rt.keys_log_dir:
            os.makedirs(rt.keys_log_dir, exist_ok=True)
            keys = np.concatenate(epoch_keys) if epoch_keys else np.zeros(0, np.int64)
            np.save(os.path.join(rt.keys_log_dir, f"keys_epoch{epoch}_rank{rank}.npy"), keys)
        report = {"epoch": epoch + 1, "step": step, "resumed_from_step": step_at_start}
        if rank == 0 and sums["n"]:
            report.update(train_loss=sums["loss"] / sums["n"], train_acc=sums["accuracy"] / sums["n"])
            if timed_samples:
                report["samples_per_s"] = timed_samples / (time.perf_counter() - timed_from)
            mags = np.concatenate(epoch_mags)
            report.update({f"epoch_{k}": v for k, v in magnitude_stats(mags, l_a, u_a).items()})
            if tracker:
                tracker.log_metrics({"epoch_loss": report["train_loss"], "epoch_accuracy": report["train_acc"]},
                                    step=step)
                import matplotlib.pyplot as plt

                fig = _histogram_figure(mags, epoch + 1, l_a, u_a)
                tracker.log_figure(fig, f"magnitude/epoch_{epoch + 1:03d}.png")
                plt.close(fig)
        with tempfile.TemporaryDirectory(prefix="magface_ckpt_") as tmp:
            if rank == 0:
                save_model_file(tmp, cfg.model.backbone,
                                {"embedding_size": cfg.model.embedding_size, "input_size": cfg.data.image_size,
                                 **backbone_kwargs},
                                backbone.state_dict(), convention, cfg.to_dict(), epoch + 1, step)
            save_train_state(tmp, rank=rank, world_size=world, classifier=classifier, optimizer=optimizer,
                             scheduler=scheduler, scaler=scaler, epoch=epoch + 1, step=step)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_epoch{epoch + 1:03d}_step{step:08d}")
