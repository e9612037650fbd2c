"""Learning-rate schedules as a multiplier of the base lr per optimizer step (for torch's LambdaLR).

Per-step rather than per-epoch, so a resumed run lands on exactly the same lr and warmup is smooth:
- "step": the MagFace paper's recipe, x gamma at each milestone epoch (10/18/22 over 25 epochs);
- "poly": insightface arcface_torch's, linear warmup then (1 - progress)^power down to 0.
Also what a step and an epoch are when the number of workers changes (`batch_split`, `epoch_steps`).
"""

from __future__ import annotations

from bisect import bisect_right


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, schedule: str = "step",
              milestones=(10, 18, 22), gamma: float = 0.1, warmup_epochs: float = 0.0,
              power: float = 2.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "step":
        return gamma ** bisect_right(list(milestones), step / steps_per_epoch)
    if schedule == "poly":
        total = max(epochs * steps_per_epoch - warmup_steps, 1)
        progress = min((step - warmup_steps) / total, 1.0)
        return (1.0 - progress) ** power
    raise ValueError(f"unknown lr schedule {schedule!r}; expected 'step' or 'poly'")


def build_scheduler(optimizer, optim_cfg, *, steps_per_epoch: int, epochs: int):
    """A LambdaLR stepping once per optimizer step; its state_dict is saved with the train state."""
    import torch

    def factor(step: int) -> float:
        return lr_factor(step, steps_per_epoch=steps_per_epoch, epochs=epochs, schedule=optim_cfg.schedule,
                         milestones=optim_cfg.milestones, gamma=optim_cfg.gamma,
                         warmup_epochs=optim_cfg.warmup_epochs, power=optim_cfg.power)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_split(global_batch: int, world_size: int) -> list[int]:
    """Every rank's batch under the batch policy: the global batch is fixed whatever the number of workers,
    and split so that sizes differ by at most one (the first global_batch % W ranks take one more)."""
    if not 0 < world_size <= global_batch:
        raise ValueError(f"a global batch of {global_batch} cannot be split across {world_size} workers")
    base, extra = divmod(global_batch, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def epoch_steps(num_images: int, global_batch: int, min_workers: int, max_workers: int) -> int:
    """Optimizer steps per epoch, the same for every worker count in [min_workers, max_workers], so the step
    counter and the lr schedule mean the same thing after a resize. Ray Data's split gives each of W workers
    floor(N / W) rows, and the largest per-worker batch is ceil(G / W); the epoch is as many steps as the
    tightest worker count allows (with a fixed worker count: floor(floor(N / W) / (G / W)))."""
    return min((num_images // w) // -(-global_batch // w) for w in range(min_workers, max_workers + 1))
