"""The margin head against independent float64 formulas, its config validation, and numerical safety."""

import math

import numpy as np
import pytest
import torch

from magface.losses import (
    LossConfig,
    cosine_logits,
    feasible_lambda_g_min,
    magface_per_sample_loss,
    per_sample_loss,
    target_cosine,
)

PAPER = dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0)


def reference_loss(cos, mag, labels, kind, s=64.0, m=0.5, m1=1.0, m2=0.3, m3=0.2, l_a=10.0, u_a=110.0,
                   l_m=0.45, u_m=0.8, lambda_g=35.0, easy_margin=False):
    """Per-sample loss written from the paper's formulas with numpy float64, one sample at a time."""
    out = []
    for c_row, f_norm, y in zip(np.asarray(cos, dtype=np.float64), np.asarray(mag, dtype=np.float64), labels):
        a = min(max(f_norm, l_a), u_a)
        ma = l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a)
        theta = math.acos(c_row[y])
        if kind in ("magface", "arcface"):
            mm = ma if kind == "magface" else m
            if easy_margin:
                t = math.cos(theta + mm) if c_row[y] > 0 else c_row[y]
            else:
                t = math.cos(theta + mm) if theta + mm <= math.pi else c_row[y] - mm * math.sin(mm)
        elif kind == "mag_cosface":
            t = c_row[y] - ma
        elif kind == "cosface":
            t = c_row[y] - m
        elif kind == "combined":
            t = math.cos(m1 * theta + m2) - m3
        else:
            t = c_row[y]
        z = s * c_row.copy()
        z[y] = s * t
        ce = np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[y]
        reg = lambda_g * (1 / a + a / u_a**2) if kind in ("magface", "mag_cosface") else 0.0
        out.append(ce + reg)
    return np.array(out)


def random_batch(n=64, c=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(n, c, generator=g, dtype=torch.float64) * 1.98 - 0.99
    mag = torch.rand(n, generator=g, dtype=torch.float64) * 130 + 2  # spans both clamp bounds
    labels = torch.randint(0, c, (n,), generator=g)
    return cos, mag, labels


@pytest.mark.parametrize(
    "kind,extra",
    [("magface", {}), ("magface", {"easy_margin": True}), ("arcface", {}), ("arcface", {"easy_margin": True}),
     ("cosface", {"m": 0.35}), ("combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}), ("softmax", {}),
     ("mag_cosface", {"l_m": 0.2, "u_m": 0.4, "lambda_g": 20.0})],
)
def test_loss_matches_independent_float64_formula(kind, extra):
    cos, mag, labels = random_batch()
    cfg = LossConfig(kind=kind, **extra).validate()
    got = per_sample_loss(cos, mag, labels, cfg)
    assert got.dtype == torch.float64
    want = reference_loss(cos.numpy(), mag.numpy(), labels.numpy(), kind, **extra)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-10)


def test_magface_pure_function_matches_formula_and_fallback_region():
    cos, mag, labels = random_batch(seed=1)
    cos[0, labels[0]] = -0.95  # theta + m(a) > pi: ArcFace's linear fallback
    got = magface_per_sample_loss(cos, mag, labels, easy_margin=False, **PAPER)
    np.testing.assert_allclose(got.numpy(), reference_loss(cos.numpy(), mag.numpy(), labels.numpy(), "magface"),
                               rtol=1e-12, atol=1e-10)


def test_feasibility_bound_value_and_refusal():
    k = (0.8 - 0.45) / (110 - 10)
    bound = 64 * k / (1 / 10**2 - 1 / 110**2)
    assert feasible_lambda_g_min(64, 10, 110, 0.45, 0.8) == pytest.approx(bound, rel=1e-12)
    assert bound == pytest.approx(22.5867, abs=1e-4)
    LossConfig().validate()  # paper defaults: lambda_g = 35 is feasible
    with pytest.raises(ValueError, match=r"lambda_g.*22\.5867"):
        LossConfig(lambda_g=20.0).validate()
    assert LossConfig(lambda_g=20.0, allow_infeasible=True).validate().lambda_g == 20.0
    LossConfig(kind="arcface", lambda_g=0.0).validate()  # no magnitude term, no bound


@pytest.mark.parametrize(
    "field,kwargs",
    [("kind", {"kind": "sphereface"}), ("l_a/u_a", {"l_a": 110.0, "u_a": 10.0}), ("l_m/u_m", {"l_m": 0.8, "u_m": 0.45}),
     ("s", {"s": 0.0}), ("m", {"kind": "arcface", "m": 2.0}), ("m1", {"kind": "combined", "m1": 0.0})],
)
def test_invalid_config_names_field(field, kwargs):
    with pytest.raises(ValueError, match=f"LossConfig.{field}"):
        LossConfig(**kwargs).validate()


def test_config_dict_round_trip_and_unknown_field():
    cfg = LossConfig(kind="arcface", m=0.4)
    assert LossConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="lambda"):
        LossConfig.from_dict({"lambda": 3})


@pytest.mark.parametrize("kind", ["magface", "arcface", "combined", "mag_cosface"])
@pytest.mark.parametrize("easy_margin", [False, True])
def test_no_nan_at_extreme_cosines_and_clamp_bounds(kind, easy_margin):
    cfg = LossConfig(kind=kind, easy_margin=easy_margin)
    cos = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [1.0, 0.3, 0.2], [-1.0, 0.0, 0.0]] * 2)
    mag = torch.tensor([10.0, 110.0, 5.0, 200.0, 10.0, 110.0, 10.0 + 1e-6, 110.0 - 1e-6])
    cos.requires_grad_(True)
    mag.requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0])
    loss = per_sample_loss(cos, mag, labels, cfg)
    loss.sum().backward()
    for t in (loss, cos.grad) + ((mag.grad,) if cfg.uses_magnitude else ()):
        assert torch.isfinite(t).all(), t
    # the magnitude gradient is live at the clamp bounds themselves and zero beyond them
    if cfg.uses_magnitude:
        assert mag.grad[0] != 0 and mag.grad[1] != 0
        assert mag.grad[2] == 0 and mag.grad[3] == 0


def test_margin_is_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(8, 16, generator=g) * 20
    w = torch.randn(5, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = cosine_logits(f, w)
        t = target_cosine(cos[:, 0].bfloat16(), f.norm(dim=1).bfloat16(), LossConfig())
    assert cos.dtype == torch.float32 and t.dtype == torch.float32
    # same as float32 math on the bf16-rounded inputs
    want = target_cosine(cos[:, 0].bfloat16().float(), f.norm(dim=1).bfloat16().float(), LossConfig())
    torch.testing.assert_close(t, want, rtol=0, atol=0)


def test_gradients_match_finite_differences_float64():
    g = torch.Generator().manual_seed(3)
    # features -> (direction, magnitude) -> loss: checks the whole head including the magnitude path
    feats = (torch.randn(6, 8, generator=g, dtype=torch.float64) * 10).requires_grad_(True)
    feats.data[:, 0] += 25  # magnitudes inside (l_a, u_a), away from the clamp kinks
    weight = torch.randn(5, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    for kind in ("magface", "mag_cosface", "arcface", "combined"):
        cfg = LossConfig(kind=kind)

        def head(f, w, cfg=cfg):
            return per_sample_loss(cosine_logits(f, w), f.norm(dim=1), labels, cfg)

        assert torch.autograd.gradcheck(head, (feats, weight), eps=1e-6, atol=1e-5)



def test_fixed_margin_defaults_are_the_papers():
    from magface.losses import LossConfig

    # CosFace (Wang et al. 2018) m = 0.35, ArcFace (Deng et al. 2019) m = 0.5; an explicit m wins
    assert LossConfig(kind="cosface").fixed_margin == 0.35 and LossConfig(kind="arcface").fixed_margin == 0.5
    assert LossConfig(kind="cosface", m=0.4).fixed_margin == 0.4
