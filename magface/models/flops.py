"""Parameter and multiply-accumulate counts (the figure papers quote as "GFLOPs" is MACs of conv + linear)."""

from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (the fixed BN1d scale included), as published counts do."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int = 112) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one 3 x input_size x input_size image (meta device:
    no memory, no compute)."""
    total = 0

    def conv_hook(mod: nn.Conv2d, inp, out):
        nonlocal total
        kh, kw = mod.kernel_size
        total += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() * mod.in_features

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
