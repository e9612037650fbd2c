"""The Tune search space: every sampled trial lies in the paper's feasible region."""

import math

import numpy as np
import pytest

from magface.tuning import RAW_KEYS, Range, SearchSpace, feasible_lambda_g_min, to_loss_params


def test_bound_for_paper_defaults():
    # K = 0.35/100; -g'(l_a) = 1/100 - 1/12100 => 64*0.0035/0.00991735... = 22.5866
    bound = feasible_lambda_g_min(64, 10, 110, 0.45, 0.8)
    assert bound == pytest.approx(64 * (0.35 / 100) / (1 / 100 - 1 / 110**2), rel=1e-12)
    assert bound == pytest.approx(22.5867, abs=1e-4)


@pytest.mark.parametrize("s", [16.0, 32.0, 64.0])
def test_every_sampled_trial_is_feasible(s):
    space = SearchSpace()
    domains = space.param_space()
    rng = np.random.RandomState(0)
    samples = {k: np.asarray(domains[k].sample(size=5000, random_state=rng)) for k in RAW_KEYS}
    for i in range(5000):
        p = to_loss_params({k: samples[k][i] for k in RAW_KEYS}, s)
        assert p["l_a"] < p["u_a"] and p["l_m"] < p["u_m"]
        assert 0 <= p["l_m"] and p["u_m"] < math.pi / 2
        # Independent form of the bound: lambda_g * (-g'(l_a)) >= s * max m'(a)
        slope = (p["u_m"] - p["l_m"]) / (p["u_a"] - p["l_a"])
        assert p["lambda_g"] * (1 / p["l_a"] ** 2 - 1 / p["u_a"] ** 2) >= s * slope * (1 - 1e-12)


def test_samples_cover_the_configured_ranges():
    space = SearchSpace.from_dict({"l_a": {"low": 2, "high": 4, "log": True}, "lambda_ratio": [1.0, 1.2]})
    rng = np.random.RandomState(1)
    la = np.asarray(space.param_space()["l_a"].sample(size=2000, random_state=rng))
    assert la.min() >= 2 and la.max() <= 4 and la.min() < 2.1 and la.max() > 3.9
    # log-uniform: the median sits at the geometric mean
    assert np.median(la) == pytest.approx(math.sqrt(8), rel=0.05)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"l_a": [5, 5]}, "low"),
        ({"a_width": [-1, 10]}, "a_width"),
        ({"lambda_ratio": [0.5, 2]}, "feasibility bound"),
        ({"l_m": [0.3, 1.2], "m_width": [0.1, 0.5]}, "pi/2"),
        ({"lamda_ratio": [1, 2]}, "unknown"),
    ],
)
def test_bad_search_space_is_refused_with_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace.from_dict(bad)


def test_range_objects_are_accepted():
    assert SearchSpace.from_dict({"l_a": Range(1, 3)}).l_a == Range(1, 3)
