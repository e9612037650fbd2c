"""Backbones: published parameter / MAC counts, the iResNet structure, the small CPU net, the CLI."""

import pytest
import torch
from torch import nn

from magface.cli import main as cli_main
from magface.models import get_backbone
from magface.models.flops import count_macs, count_parameters
from magface.models.iresnet import IBasicBlock


def on_meta(name, **kw):
    with torch.device("meta"):  # counting needs shapes only
        return get_backbone(name, **kw)


@pytest.mark.parametrize(
    "name,params_m,gmacs",
    # published (insightface arcface_torch, MagFace): r50 43.6M params, 6.3 GFLOPs; r100 65.2M, 12.1 GFLOPs
    [("iresnet50", 43.6, 6.3), ("iresnet100", 65.2, 12.1)],
)
def test_published_parameter_and_mac_counts(name, params_m, gmacs):
    model = on_meta(name)
    assert count_parameters(model) / 1e6 == pytest.approx(params_m, abs=0.05)
    assert count_macs(model, 112) / 1e9 == pytest.approx(gmacs, abs=0.05)


def test_mac_counter_against_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    assert count_macs(model, 8) == 8 * 4 * 4 * 3 * 9 + 8 * 4 * 4 * 10
    assert count_parameters(model) == 8 * 27 + 8 + 128 * 10 + 10


@pytest.mark.parametrize("name,stages", [("iresnet50", [3, 4, 14, 3]), ("iresnet100", [3, 13, 30, 3]),
                                         ("iresnet200", [6, 26, 60, 6])])
def test_iresnet_structure(name, stages):
    model = on_meta(name)
    stem_conv = model.stem[0]
    assert stem_conv.kernel_size == (3, 3) and stem_conv.stride == (1, 1)
    assert [len(s) for s in model.stages] == stages
    for stage in model.stages:
        assert stage[0].body[4].stride == (2, 2) and all(b.body[4].stride == (1, 1) for b in stage[1:])
        kinds = [type(m) for m in stage[0].body]
        assert kinds == [nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d, nn.PReLU, nn.Conv2d, nn.BatchNorm2d]
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert bns and all(m.eps == 2e-5 for m in bns)
    head = model.head
    assert head.dropout.p == 0.4 and head.fc.in_features == 512 * 7 * 7 and head.fc.out_features == 512
    assert not head.features.weight.requires_grad
    assert sum(isinstance(m, IBasicBlock) for m in model.modules()) == sum(stages)


def test_iresnet18_forward_is_unnormalised_512d():
    torch.manual_seed(0)
    model = get_backbone("iresnet18").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512) and torch.isfinite(out).all()
    assert not torch.allclose(out.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("size", [56, 64, 112])
def test_small_net_sizes_train_step(size):
    torch.manual_seed(0)
    model = get_backbone("small", embedding_size=128, input_size=size)
    x = torch.randn(4, 3, size, size)
    out = model(x)
    assert out.shape == (4, 128)
    out.norm(dim=1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert count_macs(on_meta("small", embedding_size=128, input_size=64), 64) < 50e6


def test_bad_backbone_arguments():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'"):
        get_backbone("resnet9")
    with pytest.raises(ValueError, match="multiple of 8"):
        get_backbone("small", input_size=60)
    with pytest.raises(ValueError, match="multiple of 16"):
        get_backbone("iresnet18", input_size=120)


def test_cli_model_stats(capsys):
    assert cli_main(["model-stats", "--backbone", "iresnet100"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("iresnet100")][0]
    assert line.split()[1:] == ["112", "65.16", "12.090"]
