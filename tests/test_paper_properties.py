"""The MagFace paper's claims about the per-sample loss in the magnitude a, checked numerically in float64.

Theorem (paper, Sec. 3.2): with lambda_g above the feasibility bound and theta_y + m(a) <= pi/2 on all of
[l_a, u_a] (cos theta_y >= sin(u_m) = 0.717 for the defaults), L(a) is strictly convex with a unique
minimiser a*, and a* grows as the sample gets easier (cos theta_y up, other classes' cosines down).
"""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from magface.losses import magface_per_sample_loss

PAPER = dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, easy_margin=False)
GRID = np.linspace(10.0, 110.0, 2001)


def loss_in_a(cos_y, others, a):
    """L(a) for fixed cosines: class 0 is the target, `others` the remaining classes."""
    a = torch.as_tensor(np.atleast_1d(a), dtype=torch.float64)
    cos = torch.tensor([[cos_y, *others]], dtype=torch.float64).expand(len(a), -1)
    labels = torch.zeros(len(a), dtype=torch.long)
    return magface_per_sample_loss(cos, a, labels, **PAPER).numpy()


def minimiser(cos_y, others):
    res = minimize_scalar(lambda x: loss_in_a(cos_y, others, x)[0], bounds=(10.0, 110.0), method="bounded",
                          options={"xatol": 1e-10})
    return res.x


PREMISE_COS = [math.sin(0.8), 0.75, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0]
OTHERS = [[0.3] * 100, [0.5] * 300, [0.6] * 500, list(np.linspace(-0.4, 0.7, 50))]


@pytest.mark.parametrize("cos_y", PREMISE_COS)
@pytest.mark.parametrize("others", OTHERS, ids=["100x0.3", "300x0.5", "500x0.6", "50xspread"])
def test_strictly_convex_with_unique_minimiser_under_premise(cos_y, others):
    assert cos_y >= math.sin(PAPER["u_m"]) - 1e-15
    v = loss_in_a(cos_y, others, GRID)
    second = v[2:] - 2 * v[1:-1] + v[:-2]
    assert (second > 0).all(), second.min()
    # strict convexity on a grid: the sequence of first differences is increasing, so the grid minimum is one
    # point and the loss strictly decreases towards it from both sides
    first = np.diff(v)
    k = int(np.argmin(v))
    assert (first[:k] < 0).all() and (first[k:] > 0).all()


def test_minimiser_increases_with_target_cosine():
    others = [0.3] * 100
    cos_ys = [0.72, 0.75, 0.8, 0.85, 0.9, 0.93]
    a_star = [minimiser(c, others) for c in cos_ys]
    assert all(10.0 < a < 110.0 for a in a_star), a_star  # interior optima: a real trade-off
    assert np.all(np.diff(a_star) > 0.5), a_star


def test_minimiser_increases_as_other_cosines_decrease():
    a_star = [minimiser(0.9, [c] * 100) for c in (0.5, 0.45, 0.4, 0.35, 0.3)]
    assert all(10.0 < a < 110.0 for a in a_star), a_star
    assert np.all(np.diff(a_star) > 0.5), a_star


def test_minimiser_is_a_stationary_point_of_the_autograd_gradient():
    a = torch.tensor([minimiser(0.85, [0.3] * 100)], dtype=torch.float64, requires_grad=True)
    cos = torch.tensor([[0.85] + [0.3] * 100], dtype=torch.float64)
    magface_per_sample_loss(cos, a, torch.zeros(1, dtype=torch.long), **PAPER).sum().backward()
    assert abs(a.grad.item()) < 1e-6


def test_not_convex_outside_the_premise():
    """cos theta_y = 0.6 < sin(u_m): theta_y + m(a) passes pi/2 for a > ~48. There the target logit
    s*cos(theta_y + m(a)) is concave in m, the cross-entropy inherits the concavity, and near u_a it beats
    lambda_g * g''(a) = 2 lambda_g / a^3 (small at large a): the second difference turns negative. (Harder
    negatives can hide it: with others at -0.3 the same target stays convex, so the premise is sufficient,
    not necessary.)"""
    v = loss_in_a(0.6, [0.3] * 10, GRID)
    second = v[2:] - 2 * v[1:-1] + v[:-2]
    assert second.min() < 0
    concave_a = GRID[1:-1][second < 0]
    theta = math.acos(0.6)
    m_at = lambda a: 0.45 + 0.35 * (a - 10) / 100  # noqa: E731
    assert all(theta + m_at(a) > math.pi / 2 for a in concave_a)
    assert concave_a.min() > 90
