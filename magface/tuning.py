"""The Tune search space for MagFace's five numbers, inside the paper's feasible region only.

Searchers sample *raw* coordinates that are unconstrained by construction, and `to_loss_params` maps
them onto (l_a, u_a, l_m, u_m, lambda_g):

    u_a = l_a + a_width          (a_width > 0  =>  l_a < u_a)
    u_m = l_m + m_width          (m_width > 0  =>  l_m < u_m)
    lambda_g = lambda_ratio * s*K / (1/l_a^2 - 1/u_a^2),   lambda_ratio >= 1

so every trial satisfies the feasibility bound whatever the searcher (random, Optuna, HyperOpt) proposes,
and no trial is wasted on a config the loss would refuse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from magface.losses import feasible_lambda_g_min  # noqa: F401 - re-exported: the bound the space respects

RAW_KEYS = ("l_a", "a_width", "l_m", "m_width", "lambda_ratio")


@dataclass(frozen=True)
class Range:
    """One searched coordinate: uniform or log-uniform on [low, high]."""

    low: float
    high: float
    log: bool = False

    def check(self, name: str, positive: bool = False) -> None:
        if not self.low < self.high:
            raise ValueError(f"tune.{name}: low ({self.low}) must be < high ({self.high})")
        if (positive or self.log) and self.low <= 0:
            raise ValueError(f"tune.{name}: low must be > 0 (got {self.low})")

    def tune_domain(self):
        from ray import tune

        return tune.loguniform(self.low, self.high) if self.log else tune.uniform(self.low, self.high)


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the raw coordinates. Defaults bracket the paper's values
    (l_a=10, u_a=110, l_m=0.45, u_m=0.8, lambda_g=35 i.e. about 1.55x its bound of 22.6 at s=64)."""

    l_a: Range = field(default_factory=lambda: Range(5.0, 20.0))
    a_width: Range = field(default_factory=lambda: Range(40.0, 150.0))
    l_m: Range = field(default_factory=lambda: Range(0.3, 0.6))
    m_width: Range = field(default_factory=lambda: Range(0.1, 0.5))
    lambda_ratio: Range = field(default_factory=lambda: Range(1.0, 2.5))

    def __post_init__(self):
        for f in fields(self):
            getattr(self, f.name).check(f.name, positive=f.name != "l_m")
        if self.l_m.low < 0:
            raise ValueError(f"tune.l_m: margins must be >= 0 (got low={self.l_m.low})")
        if self.lambda_ratio.low < 1.0:
            raise ValueError(
                f"tune.lambda_ratio: low must be >= 1 so every trial meets the feasibility bound "
                f"(got {self.lambda_ratio.low})")
        if self.l_m.high + self.m_width.high >= math.pi / 2:
            raise ValueError("tune: l_m.high + m_width.high must stay below pi/2 (an angular margin of 90 degrees "
                             "or more leaves no convex region for the loss)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SearchSpace":
        d = dict(d or {})
        unknown = set(d) - set(RAW_KEYS)
        if unknown:
            raise ValueError(f"unknown tune search-space keys {sorted(unknown)}; valid: {list(RAW_KEYS)}")
        kwargs = {}
        for k, v in d.items():
            if isinstance(v, Range):
                kwargs[k] = v
            elif isinstance(v, Mapping):
                kwargs[k] = Range(float(v["low"]), float(v["high"]), bool(v.get("log", False)))
            elif isinstance(v, (list, tuple)) and len(v) == 2:
                kwargs[k] = Range(float(v[0]), float(v[1]))
            else:
                raise ValueError(f"tune.{k}: expected {{low, high[, log]}} or [low, high], got {v!r}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)

    def param_space(self) -> dict:
        """Tune domains over the raw coordinates (works with random search, Optuna and HyperOpt)."""
        return {k: getattr(self, k).tune_domain() for k in RAW_KEYS}


def to_loss_params(raw: Mapping[str, float], s: float) -> dict[str, float]:
    """Map one sampled point of the raw space onto the loss's (l_a, u_a, l_m, u_m, lambda_g)."""
    l_a = float(raw["l_a"])
    u_a = l_a + float(raw["a_width"])
    l_m = float(raw["l_m"])
    u_m = l_m + float(raw["m_width"])
    lambda_g = float(raw["lambda_ratio"]) * feasible_lambda_g_min(s, l_a, u_a, l_m, u_m)
    return {"l_a": l_a, "u_a": u_a, "l_m": l_m, "u_m": u_m, "lambda_g": lambda_g}
