"""The per-worker training loop. It talks to Ray only through `ray.train.*`, so the same function runs under
TorchTrainer (any number of workers), under Tune, and in a 1-worker test.

Per step: uint8 batch -> PixelConvention -> backbone (DDP, autocast) -> ShardedClassifier (own shard, not in
DDP; margin math in fp32) -> backward (GradScaler for fp16) -> clip the backbone gradient -> SGD -> per-step lr.
Per epoch (and every train.checkpoint_every_steps): every rank writes its train state into one temporary
checkpoint folder (rank 0 also `model.pt`), and `ray.train.report` merges the ranks' files into one checkpoint
directory in storage. The number of workers may change between attempts (elastic runs): the global batch and
the steps per epoch stay fixed, each (re)start splits the batch across the workers it got and re-shards the
classifier from the checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from magface.config import Config
from magface.train import faults, resume
from magface.train.interrupt import StopPoller
from magface.train.schedule import batch_split, build_scheduler
from magface.train.state import checkpoint_files, load_train_state, restore_train_state, save_train_state

log = logging.getLogger(__name__)

RUNTIME_KEY = "runtime"  # driver-computed values passed next to the config sections
# Rank 0 keeps its last training samples (features, labels) of the final epoch in the final checkpoint, as
# `last_samples.npz`: the paper's Figure 3 (magnitude vs cos to the class centre) is drawn from them.
LAST_SAMPLES = 2048
LAST_SAMPLES_FILE = "last_samples.npz"


@dataclass
class Runtime:
    """What the driver works out before training and every worker needs."""

    steps_per_epoch: int
    global_batch_size: int | None = None  # None: the config's (Config.global_batch_size)
    tracking_uri: str | None = None
    run_id: str | None = None
    fault_marker: str | None = None
    keys_log_dir: str | None = None  # audit: each rank saves the sample keys it trained on, per epoch
    stop_flag: object = None  # magface.train.interrupt.StopFlag: the driver's Ctrl-C / SIGTERM
    resume_from: str | None = None  # the newest complete checkpoint in storage (magface.train.resume)
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


def _agree_on_overflow(shard_grad: torch.Tensor) -> None:
    """fp16 with several workers: each rank's GradScaler sees only its own classifier shard's gradient, so
    one rank could skip a step (inf/nan in its shard) while the others take it, and the replicas drift apart.
    One all-reduced flag, kept on the device (no host sync), marks every rank's shard non-finite when any is,
    so every rank's scaler skips the same steps and lowers its scale alike."""
    import torch.distributed as dist

    bad = (~torch.isfinite(shard_grad)).any().reshape(1).float()
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    shard_grad.masked_fill_(bad.bool(), float("inf"))


def apply_gradients(loss, optimizer, scaler, clip_params, grad_clip: float, after_scaled_backward=None) -> None:
    """Backward, optional gradient clipping of `clip_params`, optimizer step; with a GradScaler (fp16) the
    gradients are unscaled before clipping and `after_scaled_backward` runs between backward and unscaling."""
    if scaler is not None:
        scaler.scale(loss).backward()
        if after_scaled_backward is not None:
            after_scaled_backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(clip_params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _histogram_figure(mag: np.ndarray, epoch: int, l_a: float, u_a: float, model: str = ""):
    from magface.evaluation.plots import magnitude_histogram

    return magnitude_histogram(mag, bins=60, title=f"{model} epoch {epoch}: magnitudes (rank 0)".strip(),
                               bounds={"l_a": l_a, "u_a": u_a})


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    from magface.checkpoint import load_model_file, mark_complete, save_model_file
    from magface.models import get_backbone
    from magface.sharded_fc import ShardedClassifier
    from magface.tracking import Tracker

    config = dict(config)
    rt = Runtime(**config.pop(RUNTIME_KEY))
    cfg = Config.from_dict(config, where="train_loop_per_worker config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()  # may differ between attempts (elastic runs)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    global_batch = rt.global_batch_size or cfg.global_batch_size
    counts = batch_split(global_batch, world)  # batch policy: the global batch is fixed, split across workers
    spe = rt.steps_per_epoch  # the same for every worker count in the configured range

    # ---- model: backbone in DDP, classifier shard outside it
    backbone_kwargs = {"trainable_feature_scale": cfg.model.resolved_feature_scale(cfg.loss),
                       **cfg.model.backbone_kwargs}
    init_state = None
    if cfg.model.init_from and ray.train.get_checkpoint() is None:  # backbone-only start (e.g. imported weights)
        from magface.models.imported import init_source

        init_state, adopted = init_source(cfg.model.init_from, cfg)
        backbone_kwargs = {**adopted, **backbone_kwargs}  # the config's own settings win
    backbone = get_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                            input_size=cfg.data.image_size, **backbone_kwargs)
    if init_state is not None:
        backbone.load_state_dict(init_state)
        if rank == 0:
            print(f"[magface] backbone initialised from {cfg.model.init_from}", flush=True)
    if cfg.model.sync_bn and world > 1:
        if device.type == "cpu":
            raise ValueError("model.sync_bn needs GPUs (torch's SyncBatchNorm has no CPU kernel)")
        backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    backbone.to(device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    backbone.to(memory_format=memory_format)
    model = DistributedDataParallel(backbone, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else backbone
    if cfg.train.compile:
        model = torch.compile(model)
    classifier = ShardedClassifier(cfg.model.embedding_size, cfg.data.num_classes, cfg.loss, rank=rank,
                                   world_size=world, sample_rate=cfg.model.sample_rate, seed=cfg.train.seed)
    _init_classifier_shard(classifier, cfg.train.seed)
    classifier.to(device)

    optimizer = torch.optim.SGD(
        [{"params": backbone.parameters()}, {"params": classifier.parameters()}],
        lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=spe, epochs=cfg.train.epochs)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    agree_on_overflow = (lambda: _agree_on_overflow(classifier.weight.grad)) if world > 1 else None
    convention = cfg.data.convention

    # ---- resume: any worker count can load what any other wrote (magface.train.state)
    start_epoch, step, epoch_step = 0, 0, 0  # completed epochs, optimizer steps, steps done in start_epoch
    checkpoint = resume.pick(ray.train.get_checkpoint(), rt.resume_from)
    if checkpoint is not None:
        with checkpoint_files(checkpoint, rank=rank, world_size=world) as ckpt_dir:
            saved = load_model_file(ckpt_dir)
            backbone.load_state_dict(saved["state_dict"])
            state = load_train_state(ckpt_dir, rank=rank, world_size=world, map_location=device)
            start_epoch, step = restore_train_state(state, classifier=classifier, optimizer=optimizer,
                                                    scheduler=scheduler, scaler=scaler)
        epoch_step = state.get("extra", {}).get("epoch_step", 0)
        if epoch_step >= spe:  # the epoch length changed (other data or max_steps_per_epoch): it is over
            start_epoch, epoch_step = start_epoch + 1, 0
        if rank == 0:
            print(f"[magface] resumed from checkpoint: epoch {start_epoch}, step {step}"
                  + (f" ({epoch_step} of epoch {start_epoch + 1}'s {spe} steps done)" if epoch_step else "")
                  + f"; written by {state['world_size']} worker(s)", flush=True)
    if rank == 0:
        span = f" (elastic range {cfg.scaling.min_workers}-{cfg.scaling.max_workers})" if cfg.scaling.elastic else ""
        print(f"[magface] training on {world} worker(s){span}: global batch {global_batch} = "
              f"{' + '.join(map(str, counts)) if world <= 8 else f'{counts[-1]}-{counts[0]} per worker'}, "
              f"{spe} steps/epoch", flush=True)

    tracker = None
    if rank == 0 and cfg.tracking.enabled and rt.run_id:
        if rt.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = rt.tracking_uri
        tracker = Tracker(rt.run_id)

    shard = ray.train.get_dataset_shard("train")
    total_steps = spe * cfg.train.epochs
    l_a, u_a = cfg.loss.l_a, cfg.loss.u_a
    every = cfg.train.checkpoint_every_steps
    t_start, step_at_start = time.perf_counter(), step

    def save_checkpoint(completed: int, steps_into_epoch: int, report: dict) -> None:
        """Every rank writes its part into one temporary folder; `ray.train.report` (a barrier) merges the
        ranks' folders into one checkpoint directory in storage."""
        with tempfile.TemporaryDirectory(prefix="magface_ckpt_") as tmp:
            if rank == 0:
                save_model_file(tmp, cfg.model.backbone,
                                {"embedding_size": cfg.model.embedding_size, "input_size": cfg.data.image_size,
                                 **backbone_kwargs},
                                backbone.state_dict(), convention, cfg.to_dict(), completed, step)
            save_train_state(tmp, rank=rank, world_size=world, classifier=classifier, optimizer=optimizer,
                             scheduler=scheduler, scaler=scaler, epoch=completed, step=step,
                             extra={"epoch_step": steps_into_epoch, "steps_per_epoch": spe,
                                    "global_batch_size": global_batch})
            if rank == 0 and last_samples and completed == cfg.train.epochs:
                np.savez(os.path.join(tmp, LAST_SAMPLES_FILE),
                         features=torch.cat([f for f, _ in last_samples]).cpu().numpy(),
                         labels=torch.cat([y for _, y in last_samples]).cpu().numpy())
            if tracker:  # metrics logged up to this checkpoint survive a kill as the checkpoint does
                tracker.persist()
            mark_complete(tmp, rank=rank, world_size=world)  # last: readers trust only manifest-backed folders
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_epoch{completed:03d}_step{step:08d}")

    stopper = StopPoller(rt.stop_flag, world, device)
    for epoch in range(start_epoch, cfg.train.epochs):
        # A resumed epoch runs only its remaining steps, over a fresh pass (fresh shuffle) of the data.
        first = epoch_step if epoch == start_epoch else 0
        model.train()
        classifier.train()
        if cfg.model.freeze_bn:
            for module in backbone.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        # Metrics stay on the device (no per-step host sync): [loss, ce, reg, accuracy] summed per window and
        # per epoch, fetched every tracking.log_every steps; magnitudes are sampled from the logged steps.
        epoch_sums, window_sums = torch.zeros(4, device=device), torch.zeros(4, device=device)
        epoch_n, window_n, epoch_mags, epoch_keys = 0, 0, [], []
        last_samples = deque(maxlen=-(-LAST_SAMPLES // counts[rank]))  # (features, labels): Figure 3's samples
        window_t, window_samples = time.perf_counter(), 0
        timed_from, timed_samples = None, 0  # epoch throughput, from the end of the first step (warm-up)
        batches = shard.iter_torch_batches(
            batch_size=counts[rank], drop_last=True, device="cpu", pin_memory=device.type == "cuda",
            local_shuffle_buffer_size=cfg.data.local_shuffle_buffer if cfg.data.shuffle == "local" else None,
            local_shuffle_seed=None)
        i = first - 1
        for i, batch in zip(range(first, spe), batches):  # every rank takes exactly the same number of steps
            if stopper.requested(step):  # all ranks agree on the step
                break
            faults.maybe_kill(rank=rank, step=step, kill_rank=cfg.train.fault_kill_rank,
                              kill_step=cfg.train.fault_kill_step,
                              marker=Path(rt.fault_marker) if rt.fault_marker else None,
                              settle=lambda: ray.train.get_all_reported_checkpoints(timeout_s=60))
            images = convention.apply(batch["image"].to(device, non_blocking=True)) \
                .contiguous(memory_format=memory_format)
            labels = batch["label"].to(device, non_blocking=True).long()
            if rt.keys_log_dir:
                epoch_keys.append(batch["key"].numpy().copy())  # the key never leaves the host
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                features = model(images)
            if rank == 0 and epoch == cfg.train.epochs - 1:
                last_samples.append((features.detach().float(), labels))
            loss, metrics = classifier(features.float(), labels, counts)
            optimizer.zero_grad(set_to_none=True)
            apply_gradients(loss, optimizer, scaler, backbone.parameters(), cfg.optim.grad_clip, agree_on_overflow)
            scheduler.step()
            step += 1
            window_samples += global_batch
            if timed_from is None:
                timed_from = time.perf_counter()
            else:
                timed_samples += global_batch

            if rank == 0:
                values = torch.stack([loss.detach(), metrics["ce"], metrics["reg"], metrics["accuracy"]])
                epoch_sums += values
                window_sums += values
                epoch_n, window_n = epoch_n + 1, window_n + 1
                if step % cfg.tracking.log_every == 0 or step == total_steps:
                    mags = features.detach().float().norm(dim=1).cpu().numpy()
                    epoch_mags.append(mags)
                    w_loss, w_ce, w_reg, w_acc = (window_sums / window_n).tolist()  # the window's one sync
                    window_sums.zero_()
                    window_n = 0
                    now = time.perf_counter()
                    sps = window_samples / max(now - window_t, 1e-9)
                    window_t, window_samples = now, 0
                    stats = magnitude_stats(mags, l_a, u_a)
                    m = {"loss": w_loss, "ce": w_ce, "reg": w_reg, "accuracy": w_acc,
                         "lr": scheduler.get_last_lr()[0], "samples_per_s": sps, "epoch": epoch + 1,
                         "world_size": world, **stats}
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
                          f"|f| mean {stats['mag_mean']:.1f} (p5-p95 {stats['mag_p5']:.1f}-{stats['mag_p95']:.1f}) "
                          f"{sps:.1f} samples/s ETA {eta / 60:.1f} min", flush=True)
            if every and step % every == 0 and i + 1 < spe:  # inside the epoch; its end checkpoints anyway
                report = {"epoch": epoch, "step": step, "resumed_from_step": step_at_start, "world_size": world}
                if rank == 0:
                    loss_sum, _, _, acc_sum = epoch_sums.tolist()
                    report.update(train_loss=loss_sum / epoch_n, train_acc=acc_sum / epoch_n)
                save_checkpoint(epoch, i + 1, report)
        if stopper.stopped:  # the driver's Ctrl-C: abandon this epoch; the last checkpoint stands
            break
        if i + 1 < spe:
            raise RuntimeError(f"rank {rank}: the data ran out after {i + 1} of {spe} steps of epoch {epoch + 1} "
                               f"(data.num_images larger than the dataset?)")

        # ---- end of epoch: checkpoint (all ranks), histogram (rank 0), report (barrier)
        if rt.keys_log_dir:
            os.makedirs(rt.keys_log_dir, exist_ok=True)
            keys = np.concatenate(epoch_keys) if epoch_keys else np.zeros(0, np.int64)
            resumed = f"_from{first}" if first else ""
            np.save(os.path.join(rt.keys_log_dir, f"keys_epoch{epoch}{resumed}_rank{rank}.npy"), keys)
        report = {"epoch": epoch + 1, "step": step, "resumed_from_step": step_at_start, "world_size": world}
        if rank == 0 and epoch_n:
            loss_sum, _, _, acc_sum = epoch_sums.tolist()
            report.update(train_loss=loss_sum / epoch_n, train_acc=acc_sum / epoch_n)
            if timed_samples:
                report["samples_per_s"] = timed_samples / (time.perf_counter() - timed_from)
            if not epoch_mags:  # no log line this epoch: sample its last batch
                epoch_mags.append(features.detach().float().norm(dim=1).cpu().numpy())
            mags = np.concatenate(epoch_mags)
            report.update({f"epoch_{k}": v for k, v in magnitude_stats(mags, l_a, u_a).items()})
            if tracker:
                tracker.log_metrics({"epoch_loss": report["train_loss"], "epoch_accuracy": report["train_acc"]},
                                    step=step)
                fig = _histogram_figure(mags, epoch + 1, l_a, u_a, model=f"{cfg.model.backbone} {cfg.loss.kind} "
                                        f"({convention.name})")
                tracker.log_figure(fig, f"magnitude/epoch_{epoch + 1:03d}.png")
        save_checkpoint(epoch + 1, 0, report)
    if tracker:  # deliver what is queued (bounded wait; the rest stays in the spool, see magface.tracking)
        tracker.close(timeout_s=30)
