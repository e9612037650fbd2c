"""Learning-rate schedules as a multiplier of the base lr per optimizer step (for torch's LambdaLR).

Per-step rather than per-epoch, so a resumed run lands on exactly the same lr and warmup is smooth:
- "step": the MagFace paper's recipe, x gamma at each milestone epoch (10/18/22 over 25 epochs);
- "poly": insightface arcface_torch's, linear warmup then (1 - progress)^power down to 0.
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
