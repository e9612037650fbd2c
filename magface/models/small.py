"""A small, fast CNN for CPU demos and tests, with the iResNet embedding head.

Stem 3x3 stride 2 -> stages of [conv3x3 stride 2 -> BN -> PReLU, conv3x3 -> BN -> PReLU] with a residual add
on the second conv; total downsampling 8, so any input size that is a multiple of 8 works (56, 64, 112).
"""

from __future__ import annotations

from torch import nn

from magface.models.iresnet import BN_EPS, EmbeddingHead


def conv_bn_act(cin: int, cout: int, stride: int = 1, bn_eps: float = BN_EPS) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout, eps=bn_eps), nn.PReLU(cout)
    )


class ResidualConv(nn.Module):
    def __init__(self, channels: int, bn_eps: float = BN_EPS):
        super().__init__()
        self.conv = conv_bn_act(channels, channels, bn_eps=bn_eps)

    def forward(self, x):
        return x + self.conv(x)


class SmallNet(nn.Module):
    def __init__(self, embedding_size: int = 256, input_size: int = 64, width: int = 32, dropout: float = 0.0,
                 trainable_feature_scale: bool = False, bn_eps: float = BN_EPS):
        super().__init__()
        if input_size % 8:
            raise ValueError(f"SmallNet: input_size must be a multiple of 8, got {input_size}")
        if not 16 <= embedding_size <= 1024:
            raise ValueError(f"SmallNet: embedding_size must be in [16, 1024], got {embedding_size}")
        w = width
        self.body = nn.Sequential(
            conv_bn_act(3, w, stride=2, bn_eps=bn_eps),
            conv_bn_act(w, 2 * w, stride=2, bn_eps=bn_eps),
            ResidualConv(2 * w, bn_eps),
            conv_bn_act(2 * w, 4 * w, stride=2, bn_eps=bn_eps),
            ResidualConv(4 * w, bn_eps),
        )
        self.head = EmbeddingHead(4 * w, input_size // 8, embedding_size, dropout, trainable_feature_scale, bn_eps)

    def forward(self, x):
        return self.head(self.body(x))
