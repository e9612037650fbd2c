"""iResNet backbones (Duta et al., as used by ArcFace/insightface and MagFace) for 112x112 aligned faces.

Stem: 3x3 stride-1 conv -> BN -> PReLU. IBasicBlock: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN,
with a 1x1 conv + BN shortcut where the shape changes; the first block of every stage has stride 2.
Head: BN2d -> Dropout -> Linear(512 * (input/16)^2, embedding) -> BN1d. The output is the un-normalised
embedding: its norm is MagFace's quality score. BN eps is a backbone setting (`bn_eps`, saved in checkpoints):
2e-5 as the MXNet originals and the official MagFace, 1e-5 in arcface_torch (imported weights keep theirs).

The final BN1d's scale: arcface_torch freezes it at 1, the official MagFace trains it. Frozen, the batch
mean of ||f||^2 in training mode is exactly d + ||bias||^2, which pins the mean magnitude near sqrt(d) and
leaves MagFace's magnitude term nothing to move; `trainable_feature_scale` chooses (saved in checkpoints).
"""

from __future__ import annotations

import torch
from torch import nn

BN_EPS = 2e-5
STAGES = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
WIDTHS = (64, 128, 256, 512)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, bn_eps: float = BN_EPS):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin, eps=bn_eps),
            conv3x3(cin, cout),
            nn.BatchNorm2d(cout, eps=bn_eps),
            nn.PReLU(cout),
            conv3x3(cout, cout, stride),
            nn.BatchNorm2d(cout, eps=bn_eps),
        )
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout, eps=bn_eps)
            )

    def forward(self, x):
        return self.body(x) + (x if self.shortcut is None else self.shortcut(x))


class EmbeddingHead(nn.Module):
    """BN2d -> Dropout -> flatten -> Linear -> BN1d; the BN1d scale starts at 1 and trains only if asked."""

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float,
                 trainable_feature_scale: bool = False, bn_eps: float = BN_EPS):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=bn_eps)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=bn_eps)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = bool(trainable_feature_scale)

    def forward(self, x):
        return self.features(self.fc(torch.flatten(self.dropout(self.bn(x)), 1)))


class IResNet(nn.Module):
    def __init__(self, layers, embedding_size: int = 512, input_size: int = 112, dropout: float = 0.4,
                 trainable_feature_scale: bool = False, bn_eps: float = BN_EPS):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"IResNet: input_size must be a multiple of 16, got {input_size}")
        if not 0 < bn_eps < 1:
            raise ValueError(f"IResNet: bn_eps must be in (0, 1), got {bn_eps}")
        self.stem = nn.Sequential(conv3x3(3, 64), nn.BatchNorm2d(64, eps=bn_eps), nn.PReLU(64))
        stages, cin = [], 64
        for n, width in zip(layers, WIDTHS):
            blocks = [IBasicBlock(cin, width, 2, bn_eps)] + [IBasicBlock(width, width, 1, bn_eps) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.head = EmbeddingHead(WIDTHS[-1], input_size // 16, embedding_size, dropout, trainable_feature_scale,
                                  bn_eps)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def iresnet(name: str, embedding_size: int = 512, input_size: int = 112, dropout: float = 0.4,
            trainable_feature_scale: bool = False, bn_eps: float = BN_EPS) -> IResNet:
    return IResNet(STAGES[name], embedding_size=embedding_size, input_size=input_size, dropout=dropout,
                   trainable_feature_scale=trainable_feature_scale, bn_eps=bn_eps)
