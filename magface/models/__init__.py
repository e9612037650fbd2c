"""Backbones: `get_backbone(name, embedding_size=512, input_size=112, **kw)`."""

from __future__ import annotations

from torch import nn

from magface.models.iresnet import STAGES, iresnet
from magface.models.small import SmallNet

BACKBONES = tuple(STAGES) + ("small",)


def get_backbone(name: str, embedding_size: int = 512, input_size: int = 112, **kwargs) -> nn.Module:
    """An un-normalised embedding network for `input_size` x `input_size` RGB input (N x 3 x H x W)."""
    if name in STAGES:
        return iresnet(name, embedding_size=embedding_size, input_size=input_size, **kwargs)
    if name == "small":
        return SmallNet(embedding_size=embedding_size, input_size=input_size, **kwargs)
    raise ValueError(f"unknown backbone {name!r}; known: {list(BACKBONES)}")
