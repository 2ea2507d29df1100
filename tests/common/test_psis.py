"""Pareto-k̂: mixvi's numpy estimate against known tails and against ArviZ (both majors)."""

import numpy as np
import pytest

from mixvi.psis import pareto_khat


@pytest.mark.parametrize("true_k", [0.3, 0.7, 1.0])
def test_khat_recovers_pareto_tail(true_k):
    # log-weights of Pareto(shape 1/k) variables: the tail index is k. With M = 3*sqrt(S) = 300
    # tail draws the estimate has sd ~ (1 + k)/sqrt(M) ~ 0.1; average over seeds to tighten it.
    estimates = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        estimates.append(pareto_khat(np.log1p(rng.pareto(1 / true_k, size=10000))))
    assert np.mean(estimates) == pytest.approx(true_k, abs=0.1)


def test_khat_light_tail_is_small_and_inf_is_inf(rng):
    assert pareto_khat(0.1 * rng.normal(size=4000)) < 0.5
    log_weights = rng.normal(size=100)
    log_weights[3] = np.inf
    assert pareto_khat(log_weights) == np.inf


def test_khat_is_inf_when_a_few_draws_carry_all_the_weight(rng):
    # Weights exp(-1000) relative to the top one underflow: the tail cannot be fitted, and the
    # honest answer is an infinite k-hat, never NaN or a prior-dominated small value.
    for log_weights in (
        np.r_[0.0, np.full(999, -1000.0)],
        np.r_[np.zeros(5), np.full(995, -1000.0)],
        np.r_[0.0, -800.0 + rng.normal(size=999)],
    ):
        assert pareto_khat(log_weights) == np.inf


def test_khat_of_equal_weights_is_minus_inf(rng):
    # An exact guide gives log p - log q = log Z at every draw, up to rounding.
    for dtype in (np.float32, np.float64):
        log_weights = (-100.0 + 10 * np.finfo(dtype).eps * rng.normal(size=2000)).astype(dtype)
        assert pareto_khat(log_weights) == -np.inf


def test_khat_rejects_nan(rng):
    log_weights = rng.normal(size=100)
    log_weights[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pareto_khat(log_weights)


def test_khat_agrees_with_arviz_sign_convention(rng):
    pytest.importorskip("arviz")
    from mixvi.arviz_bridge import arviz_psis_khat

    log_weights = np.log1p(rng.pareto(1 / 0.8, size=4000))
    assert arviz_psis_khat(log_weights) == pytest.approx(pareto_khat(log_weights), abs=0.03)
