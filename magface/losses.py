"""One margin head for every loss: a loss is a choice of margin m(a) and regulariser g(a).

Every supported loss replaces the target cosine cos(theta_y) by the combined-margin form

    t(theta_y, a) = cos(m1 * theta_y + m2(a)) - m3(a)

and adds lambda_g * g(a) per sample, with a = ||f|| clamped to [l_a, u_a]:

    kind          m1   m2(a)        m3(a)   g(a)
    magface       1    m(a)         0       1/a + a/u_a^2     m(a) linear from (l_a, l_m) to (u_a, u_m)
    mag_cosface   1    0            m(a)    1/a + a/u_a^2
    arcface       1    m            0       0
    cosface       1    0            m       0
    combined      m1   m2           m3      0
    softmax       1    0            0       0                 (normalised softmax)

Logits are s * cos, with the target replaced as above. The margin math runs in float32 even under
autocast (float64 inputs stay float64, for the property tests).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

KINDS = ("magface", "mag_cosface", "arcface", "cosface", "combined", "softmax")
DEFAULT_MARGIN = {"arcface": 0.5, "cosface": 0.35}  # the papers' values, used when LossConfig.m is None
MAG_KINDS = ("magface", "mag_cosface")


def feasible_lambda_g_min(s: float, l_a: float, u_a: float, l_m: float, u_m: float) -> float:
    """Smallest lambda_g for which the MagFace loss has a unique optimum in a (paper, Thm. 1 premise).

    lambda_g >= s * K / (-g'(l_a)) with K = max m'(a) = (u_m - l_m) / (u_a - l_a) for the linear margin and
    -g'(l_a) = 1/l_a^2 - 1/u_a^2. For the paper's defaults (s=64, l_a=10, u_a=110, l_m=0.45, u_m=0.8) this is
    0.224 / 0.0099173... = 22.5867.
    """
    k = (u_m - l_m) / (u_a - l_a)
    return s * k / (1.0 / l_a**2 - 1.0 / u_a**2)


@dataclass
class LossConfig:
    """Which loss, and its hyper-parameters. Defaults are the MagFace paper's."""

    kind: str = "magface"
    s: float = 64.0
    # arcface / cosface fixed margin; None: the value of the paper each loss comes from, ArcFace m = 0.5
    # (Deng et al. 2019) and CosFace m = 0.35 (Wang et al. 2018)
    m: Optional[float] = None
    m1: float = 1.0  # combined margin cos(m1*theta + m2) - m3
    m2: float = 0.3
    m3: float = 0.2
    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0
    easy_margin: bool = False  # angular margin only where cos(theta) > 0; else ArcFace's linear fallback
    allow_infeasible: bool = False  # accept lambda_g below the feasibility bound (ablations only)

    @property
    def fixed_margin(self) -> float:
        """`m`, or the paper default of this kind (ArcFace 0.5, CosFace 0.35)."""
        if self.m is not None:
            return float(self.m)
        return DEFAULT_MARGIN.get(self.kind, 0.5)

    def validate(self) -> "LossConfig":
        """Raise ValueError naming the offending field; return self for chaining."""
        if self.kind not in KINDS:
            raise ValueError(f"LossConfig.kind: unknown loss {self.kind!r}; choose one of {KINDS}")
        if not self.s > 0:
            raise ValueError(f"LossConfig.s: scale must be > 0, got {self.s}")
        if self.kind in ("arcface", "cosface") and not 0 <= self.fixed_margin < math.pi / 2:
            raise ValueError(f"LossConfig.m: margin must be in [0, pi/2), got {self.m}")
        if self.kind == "combined" and not self.m1 > 0:
            raise ValueError(f"LossConfig.m1: must be > 0, got {self.m1}")
        if self.kind in MAG_KINDS:
            if not 0 < self.l_a < self.u_a:
                raise ValueError(f"LossConfig.l_a/u_a: need 0 < l_a < u_a, got l_a={self.l_a}, u_a={self.u_a}")
            if not 0 <= self.l_m < self.u_m:
                raise ValueError(f"LossConfig.l_m/u_m: need 0 <= l_m < u_m, got l_m={self.l_m}, u_m={self.u_m}")
            if self.kind == "magface" and self.u_m >= math.pi / 2:
                raise ValueError(f"LossConfig.u_m: angular margin must be < pi/2, got {self.u_m}")
            if self.lambda_g < 0:
                raise ValueError(f"LossConfig.lambda_g: must be >= 0, got {self.lambda_g}")
            bound = feasible_lambda_g_min(self.s, self.l_a, self.u_a, self.l_m, self.u_m)
            if self.lambda_g < bound and not self.allow_infeasible:
                raise ValueError(
                    f"LossConfig.lambda_g: {self.lambda_g} is below the feasibility bound "
                    f"s*K/(1/l_a^2 - 1/u_a^2) = {bound:.4f} (K = (u_m-l_m)/(u_a-l_a)); raise lambda_g to at "
                    f"least {bound:.4f} or set allow_infeasible=True"
                )
        return self

    @property
    def uses_magnitude(self) -> bool:
        return self.kind in MAG_KINDS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LossConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LossConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def clamp_magnitude(magnitude: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    return magnitude.clamp(cfg.l_a, cfg.u_a)


def margin_of(a: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The paper's linear margin m(a) (a already clamped)."""
    return (cfg.u_m - cfg.l_m) / (cfg.u_a - cfg.l_a) * (a - cfg.l_a) + cfg.l_m


def regulariser(magnitude: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """g(a) = 1/a + a/u_a^2 per sample for the MagFace kinds (a clamped), zeros otherwise."""
    if not cfg.uses_magnitude:
        return torch.zeros_like(magnitude)
    a = clamp_magnitude(magnitude, cfg)
    return 1.0 / a + a / cfg.u_a**2


def _margins(magnitude: torch.Tensor, cfg: LossConfig):
    """(m1, m2, m3) for the combined form; m2/m3 are per-sample tensors or floats."""
    if cfg.kind == "magface":
        return 1.0, margin_of(clamp_magnitude(magnitude, cfg), cfg), 0.0
    if cfg.kind == "mag_cosface":
        return 1.0, 0.0, margin_of(clamp_magnitude(magnitude, cfg), cfg)
    if cfg.kind == "arcface":
        return 1.0, cfg.fixed_margin, 0.0
    if cfg.kind == "cosface":
        return 1.0, 0.0, cfg.fixed_margin
    if cfg.kind == "combined":
        return cfg.m1, cfg.m2, cfg.m3
    return 1.0, 0.0, 0.0


def _sin_from_cos(c: torch.Tensor) -> torch.Tensor:
    # sqrt'(0) is infinite; clamping 1 - c^2 away from 0 keeps values and gradients finite at cos = +-1
    # (the clamp's gradient is 0 there, so no inf * 0).
    tiny = torch.finfo(c.dtype).tiny ** 0.5
    return (1.0 - c * c).clamp_min(tiny).sqrt()


def target_cosine(cos_y: torch.Tensor, magnitude: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Margin-adjusted target cosine t(theta_y, a), computed in float32 (or float64) outside autocast.

    cos_y, magnitude: N. The angular margin uses cos(theta + m2) = cos(theta)cos(m2) - sin(theta)sin(m2) (no
    acos, so gradients stay finite at cos = +-1). Where theta + m2 would pass pi, cos(theta + m2) stops being
    decreasing in theta: ``easy_margin`` keeps cos(theta) where cos(theta) <= 0; otherwise ArcFace's fallback
    cos(theta) - m2 sin(m2) is used where theta > pi - m2. A combined margin with m1 != 1 goes through acos on a
    clamped cosine and uses no fallback.
    """
    device_type = cos_y.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        dtype = torch.float64 if cos_y.dtype == torch.float64 else torch.float32
        c = cos_y.to(dtype)
        a = magnitude.to(dtype)
        m1, m2, m3 = _margins(a, cfg)
        if isinstance(m2, float) and m2 == 0.0 and m1 == 1.0:
            return c - m3
        m2 = torch.as_tensor(m2, dtype=dtype, device=c.device)
        if m1 != 1.0:
            eps = torch.finfo(dtype).eps
            return torch.cos(m1 * torch.acos(c.clamp(-1 + eps, 1 - eps)) + m2) - m3
        shifted = c * torch.cos(m2) - _sin_from_cos(c) * torch.sin(m2)
        if cfg.easy_margin:
            shifted = torch.where(c > 0, shifted, c)
        else:
            # theta + m2 > pi  <=>  cos(theta) < cos(pi - m2)
            shifted = torch.where(c > torch.cos(math.pi - m2), shifted, c - m2 * torch.sin(m2))
        return shifted - m3


def margin_logits(cos_theta: torch.Tensor, magnitude: torch.Tensor, labels: torch.Tensor, cfg: LossConfig):
    """s * cos with the target column (labels >= 0) replaced by s * t(theta_y, a). Rows with label -1 (target not
    in this set of columns, e.g. another shard) get no margin. Returns float32/float64 N x C."""
    device_type = cos_theta.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        dtype = torch.float64 if cos_theta.dtype == torch.float64 else torch.float32
        cos = cos_theta.to(dtype)
        rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
        cols = labels[rows]
        target = target_cosine(cos[rows, cols], magnitude[rows], cfg)
        logits = cos.index_put((rows, cols), target)
        return logits * cfg.s


def per_sample_loss(cos_theta: torch.Tensor, magnitude: torch.Tensor, labels: torch.Tensor, cfg: LossConfig):
    """Cross-entropy on margin logits plus lambda_g * g(a), one value per sample (N)."""
    logits = margin_logits(cos_theta, magnitude, labels, cfg)
    ce = torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None])[:, 0]
    if cfg.uses_magnitude:
        ce = ce + cfg.lambda_g * regulariser(magnitude.to(ce.dtype), cfg)
    return ce


def magface_per_sample_loss(cos_theta, magnitude, labels, *, s, l_a, u_a, l_m, u_m, lambda_g, easy_margin=False):
    """The MagFace per-sample loss as a pure function (float64 inputs stay float64):
    -log softmax(s * [cos(theta_y + m(a)), cos(theta_j)])_y + lambda_g * g(a), a = clamp(magnitude, l_a, u_a).
    Feasibility is not checked here so that the property tests can probe outside the feasible region."""
    cfg = LossConfig("magface", s=s, l_a=l_a, u_a=u_a, l_m=l_m, u_m=u_m, lambda_g=lambda_g, easy_margin=easy_margin)
    return per_sample_loss(cos_theta, magnitude, labels, cfg)


def cosine_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cos(theta) between rows of features (N x d) and class centres (C x d). The matmul may run in the autocast
    dtype (it dominates the cost); the result is returned in float32 (float64 stays float64)."""
    cos = F.linear(F.normalize(features, dim=1), F.normalize(weight, dim=1))
    return cos if cos.dtype == torch.float64 else cos.float()
