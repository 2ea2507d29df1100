"""The numpy metrics shared by both backends' tests and benchmarks."""

import numpy as np
import pytest

from mixvi.metrics import (
    compare_to_reference,
    flatten_draws,
    mmd,
    monte_carlo_kl,
    sd_ratio,
    sliced_wasserstein,
    standardized_mean_error,
)


def test_flatten_draws_names_and_order():
    draws = {"b": np.zeros((5, 2, 3)), "a": np.ones(5)}
    flat, names = flatten_draws(draws)
    assert flat.shape == (5, 7)
    assert names[0] == "a" and names[1] == "b[1,1]" and names[-1] == "b[2,3]"
    np.testing.assert_array_equal(flat[:, 0], 1.0)


def test_mean_error_and_sd_ratio_recover_known_shift(rng):
    ref = rng.normal(size=(20000, 3))
    q = rng.normal(loc=[0.5, 0.0, -1.0], scale=[1.0, 2.0, 0.5], size=(20000, 3))
    # Monte Carlo sd of a mean over 20000 unit-sd draws ~ 0.007 (two samples: ~0.01).
    np.testing.assert_allclose(standardized_mean_error(q, ref), [0.5, 0.0, 1.0], atol=0.05)
    np.testing.assert_allclose(sd_ratio(q, ref), [1.0, 2.0, 0.5], rtol=0.03)


def test_sliced_w2_of_a_shift_equals_projected_shift(rng):
    # For y = x + delta, every 1-D projection is shifted by <u, delta>; E<u, delta>^2 = |delta|^2/D.
    x = rng.normal(size=(4000, 4))
    delta = np.array([1.0, 0.0, 0.0, 0.0])
    distance = sliced_wasserstein(x + delta, x, num_projections=2000, standardize=False)
    assert distance == pytest.approx(np.sqrt(1.0 / 4), rel=0.05)
    assert sliced_wasserstein(x, x) == 0.0


def test_sliced_w2_rejects_dimension_mismatch(rng):
    with pytest.raises(ValueError, match="dimension mismatch"):
        sliced_wasserstein(rng.normal(size=(10, 2)), rng.normal(size=(10, 3)))


def test_mmd_is_near_zero_for_same_law_and_positive_otherwise(rng):
    x, y = rng.normal(size=(1000, 2)), rng.normal(size=(1000, 2))
    z = rng.normal(loc=1.0, size=(1000, 2))
    # Unbiased MMD^2 under H0 has sd ~ O(1/n); 0.01 is > 5 sd here.
    assert abs(mmd(x, y)) < 0.01
    assert mmd(x, z) > 0.1


def test_monte_carlo_kl_gaussians(rng):
    # KL(N(0,1) || N(1,1)) = 1/2.
    x = rng.normal(size=20000)
    log_p = -0.5 * x**2
    log_q = -0.5 * (x - 1.0) ** 2
    estimate, stderr = monte_carlo_kl(log_p, log_q)
    assert abs(estimate - 0.5) < 4 * stderr


def test_compare_to_reference_keys(rng):
    ref = {"mu": rng.normal(size=4000), "beta": rng.normal(size=(4000, 2))}
    q = {"mu": rng.normal(size=4000), "beta": rng.normal(size=(4000, 2)), "extra": np.ones(4000)}
    report = compare_to_reference(q, ref)
    assert set(report) == {"max_mean_error", "mean_mean_error", "min_sd_ratio",
                           "max_sd_ratio", "sliced_w2"}
    assert report["max_mean_error"] < 0.1 and 0.9 < report["min_sd_ratio"] <= 1.1
    with pytest.raises(ValueError, match="share no site"):
        compare_to_reference({"a": np.ones(3)}, {"b": np.ones(3)})
