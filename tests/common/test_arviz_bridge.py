"""numpy draws → ArviZ data on the installed major (0.x in the 3.11 leg, 1.x in the 3.12 leg)."""

import numpy as np
import pytest

az = pytest.importorskip("arviz")

from mixvi.arviz_bridge import arviz_major, from_draws  # noqa: E402


def _draws(rng, num_draws=400, num_obs=20):
    mu = rng.normal(size=num_draws)
    y = rng.normal(size=num_obs)
    log_lik = -0.5 * (y[None, :] - mu[:, None]) ** 2 - 0.5 * np.log(2 * np.pi)
    log_q = -0.5 * mu**2
    log_p = log_lik.sum(1) - 0.5 * mu**2
    return mu, y, log_lik, log_p, log_q


def test_from_draws_layout_and_summary(rng):
    mu, y, log_lik, log_p, log_q = _draws(rng)
    data = from_draws(
        {"mu": mu, "beta": np.stack([mu, mu], 1)},
        log_likelihood={"y": log_lik},
        observed_data={"y": y},
        log_p=log_p,
        log_q=log_q,
        dims={"beta": ["coef"], "y": ["obs"]},
        coords={"coef": ["a", "b"]},
    )
    assert data.posterior["mu"].shape == (1, 400)
    assert data.posterior["beta"].shape == (1, 400, 2)
    assert data.log_likelihood["y"].shape == (1, 400, 20)
    assert data.sample_stats["log_q"].shape == (1, 400)
    summary = az.summary(data, kind="stats")
    assert abs(float(summary.loc["mu", "mean"]) - mu.mean()) < 1e-2
    loo = az.loo(data)
    elpd = loo["elpd_loo"] if arviz_major() == 0 else loo.elpd
    assert np.isfinite(elpd)


def test_arviz_one_approximate_posterior_loo(rng):
    if arviz_major() == 0:
        pytest.skip("loo_approximate_posterior is ArviZ 1.x only")
    mu, y, log_lik, log_p, log_q = _draws(rng)
    data = from_draws({"mu": mu}, log_likelihood={"y": log_lik}, log_p=log_p, log_q=log_q)
    result = az.loo_approximate_posterior(
        data, log_p=data.sample_stats["log_p"], log_q=data.sample_stats["log_q"]
    )
    assert np.isfinite(result.elpd)
