"""The final feature BatchNorm's scale decides whether MagFace's magnitude can move (issue 11).

Frozen at 1 (arcface_torch), in training mode every output dimension has batch mean 0 and variance ~1 before
the bias, so the batch mean of ||f||^2 is d + ||bias||^2 whatever the loss: the mean magnitude is pinned
near sqrt(d). Trainable (official MagFace), MagFace's regulariser lifts it towards [l_a, u_a]."""

import math
from functools import lru_cache

import pytest
import torch

from magface.config import Config
from magface.losses import LossConfig, feasible_lambda_g_min
from magface.models import get_backbone
from magface.sharded_fc import ShardedClassifier

D, CLASSES, SIZE = 32, 8, 16  # sqrt(D) = 5.66
L_A, U_A = 3.0, 20.0  # l_a below sqrt(D): below l_a the clamped magnitude gets no gradient from the loss


def _data(n_per_class=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(CLASSES, SIZE, SIZE, 3, generator=g)
    x = protos.repeat_interleave(n_per_class, 0) + 0.15 * torch.randn(CLASSES * n_per_class, SIZE, SIZE, 3,
                                                                       generator=g)
    y = torch.arange(CLASSES).repeat_interleave(n_per_class)
    return (x.clamp(0, 1) * 2 - 1).permute(0, 3, 1, 2).contiguous(), y


@lru_cache(maxsize=None)
def _train(kind: str, trainable: bool, steps: int = 40):
    torch.manual_seed(0)
    net = get_backbone("small", embedding_size=D, input_size=SIZE, width=8, trainable_feature_scale=trainable)
    if kind == "magface":
        lam = 1.5 * feasible_lambda_g_min(32.0, L_A, U_A, 0.45, 0.8)
        loss_cfg = LossConfig(kind="magface", s=32.0, l_a=L_A, u_a=U_A, lambda_g=lam)
    else:
        loss_cfg = LossConfig(kind=kind, s=32.0)
    head = ShardedClassifier(D, CLASSES, loss_cfg)
    opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    x, y = _data()
    g = torch.Generator().manual_seed(1)
    net.train()
    for _ in range(steps):
        idx = torch.randperm(len(y), generator=g)[:32]
        loss, _ = head(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        f = net(x[:64])  # training mode: batch statistics, as during training
    bn = net.head.features
    return f, bn


@pytest.mark.parametrize("kind", ["arcface", "magface"])
def test_frozen_scale_pins_the_batch_mean_of_squared_magnitude(kind):
    f, bn = _train(kind, trainable=False)
    assert not bn.weight.requires_grad and torch.all(bn.weight == 1)
    mean_sq = (f.norm(dim=1) ** 2).mean().item()
    pinned = D + (bn.bias.detach() ** 2).sum().item()
    # exact up to BatchNorm's eps (the batch variance is var / (var + eps) < 1 per dimension)
    assert mean_sq == pytest.approx(pinned, rel=2e-3)


def test_trainable_scale_lets_magface_move_the_magnitude_away_from_sqrt_d():
    f_mag, bn = _train("magface", trainable=True)
    f_arc, _ = _train("arcface", trainable=False)
    mag, arc = f_mag.norm(dim=1).mean().item(), f_arc.norm(dim=1).mean().item()
    assert bn.weight.requires_grad and not torch.allclose(bn.weight, torch.ones_like(bn.weight))
    frozen, _ = _train("magface", trainable=False)
    # MagFace's regulariser lifts the magnitudes; with the scale frozen (MagFace or ArcFace) they stay at
    # sqrt(d) (+ the small bias term)
    assert mag > math.sqrt(D) + 1.5, (mag, arc)
    assert abs(arc - math.sqrt(D)) < 0.5 and abs(frozen.norm(dim=1).mean().item() - math.sqrt(D)) < 0.5, arc


def test_the_setting_follows_the_loss_and_can_be_forced():
    def cfg(**sections):
        return Config.from_dict({"data": {"num_classes": 10}, **sections})

    magface, arcface = cfg(loss={"kind": "magface"}), cfg(loss={"kind": "arcface"})
    assert magface.model.resolved_feature_scale(magface.loss) is True
    assert arcface.model.resolved_feature_scale(arcface.loss) is False
    forced = cfg(loss={"kind": "arcface"}, model={"trainable_feature_scale": True})
    assert forced.model.resolved_feature_scale(forced.loss) is True
