"""to_arviz (NumPyro; ArviZ 1.x in .venv312): groups, shapes, constrained sites, plates, loo."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
az = pytest.importorskip("arviz")

import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoNormal  # noqa: E402
from numpyro.infer.util import log_density  # noqa: E402
from numpyro.optim import Adam  # noqa: E402

from mixvi.arviz_bridge import arviz_major  # noqa: E402
from numpyro_mixvi import to_arviz  # noqa: E402

NUM_DATA, NUM_GROUPS = 30, 3


def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_DATA, 2))
    y = x @ np.array([1.0, -0.5]) + 0.3 * rng.normal(size=NUM_DATA)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def model(x, y):
    """Regression with one latent of each common support, a nested plate and a deterministic."""
    zero = jnp.zeros((), x.dtype)
    sigma = numpyro.sample("sigma", dist.HalfNormal(zero + 1.0))  # positive
    numpyro.sample("w", dist.Dirichlet(jnp.ones(3, x.dtype)))  # simplex
    numpyro.sample("p", dist.Beta(zero + 2.0, zero + 2.0))  # unit interval
    numpyro.sample("L", dist.LKJCholesky(3, zero + 1.0))  # correlation Cholesky
    base = dist.Normal(jnp.zeros(3, x.dtype), 1.0).to_event(1)
    numpyro.sample("c", dist.TransformedDistribution(base, dist.transforms.OrderedTransform()))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(2, x.dtype), 1.0).to_event(1))
    numpyro.deterministic("beta_scaled", beta * sigma)
    with numpyro.plate("groups", NUM_GROUPS, dim=-2):
        offset = numpyro.sample("offset", dist.Normal(zero, 0.1))  # local, shape (3, 1)
    with numpyro.plate("data", x.shape[0], dim=-1):
        numpyro.sample("obs", dist.Normal(x @ beta + offset.mean(), sigma), obs=y)


SHAPES = {
    "sigma": (),
    "w": (3,),
    "p": (),
    "L": (3, 3),
    "c": (3,),
    "beta": (2,),
    "beta_scaled": (2,),
    "offset": (NUM_GROUPS, 1),
}
_FITS = {}
# Compiling SVI and the vmapped draws of this model costs ~15 s of CPU per dtype; the default
# run checks float32 and the float64 leg runs with the slow tests.
x64_fast_float32 = pytest.mark.parametrize(
    "x64",
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["float32", "float64"],
    indirect=True,
)


def fitted(guide_class, num_steps):
    key = (guide_class.__name__, num_steps, jax.config.jax_enable_x64)
    if key not in _FITS:
        x, y = make_data()
        guide = guide_class(model)
        svi = SVI(model, guide, Adam(0.05), Trace_ELBO())
        params = svi.run(jax.random.PRNGKey(0), num_steps, x, y, progress_bar=False).params
        _FITS[key] = guide, params, x, y
    return _FITS[key]


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoDiagonalNormal])
@x64_fast_float32
def test_groups_shapes_and_log_densities(guide_class, x64):
    guide, params, x, y = fitted(guide_class, 200)
    num_samples = 40
    data = to_arviz(
        jax.random.PRNGKey(1), params, model, guide, x, y, num_samples=num_samples, chunk_size=16
    )
    assert type(data).__name__ == ("InferenceData" if arviz_major() == 0 else "DataTree")
    for name, shape in SHAPES.items():
        assert data.posterior[name].shape == (1, num_samples, *shape), name
    draws = {name: data.posterior[name].values[0] for name in SHAPES}
    assert (draws["sigma"] > 0).all() and (draws["p"] < 1).all()
    tol = 1e-9 if x64 else 1e-4
    np.testing.assert_allclose(draws["w"].sum(-1), 1.0, atol=tol * 10)
    assert (np.diff(draws["c"], axis=-1) > 0).all()
    np.testing.assert_allclose(draws["beta_scaled"], draws["beta"] * draws["sigma"][:, None])
    np.testing.assert_array_equal(data.observed_data["obs"].values, np.asarray(y))
    log_lik = data.log_likelihood["obs"].values[0]
    assert log_lik.shape == (num_samples, NUM_DATA)
    log_p = data.sample_stats["log_p"].values[0]
    log_q = data.sample_stats["log_q"].values[0]
    assert log_p.shape == log_q.shape == (num_samples,) and np.isfinite(log_q).all()
    # Recompute log p(y, θ) and the pointwise log-likelihood at a few draws, one at a time.
    for s in (0, 17, num_samples - 1):
        values = {n: draws[n][s] for n in SHAPES if n != "beta_scaled"}
        expected, trace = log_density(model, (x, y), {}, values)
        assert abs(float(expected) - log_p[s]) < 10 * tol * max(1.0, abs(float(expected)))
        pointwise = trace["obs"]["fn"].log_prob(y)
        np.testing.assert_allclose(log_lik[s], pointwise, rtol=10 * tol, atol=10 * tol)


@x64_fast_float32
def test_summary_loo_and_loo_approximate_posterior(x64):
    guide, params, x, y = fitted(AutoDiagonalNormal, 1000)
    data = to_arviz(
        jax.random.PRNGKey(2), params, model, guide, x, y, num_samples=500, dims={"obs": ["N"]}
    )
    summary = az.summary(data, var_names=["sigma", "beta"], kind="stats")
    assert {"mean", "sd"} <= set(summary.columns) and len(summary) == 3
    loo = az.loo(data)
    # elpd is a sum of 30 finite log-predictive densities.
    assert np.isfinite(loo.elpd) if hasattr(loo, "elpd") else np.isfinite(loo["elpd_loo"])
    if arviz_major() >= 1:
        stats = data.sample_stats
        approx = az.loo_approximate_posterior(data, stats["log_p"], stats["log_q"])
        assert approx.approx_posterior and np.isfinite(approx.elpd)
        # Correcting for q changes elpd by O(MC error), not by orders of magnitude.
        assert abs(approx.elpd - loo.elpd) < 0.2 * abs(loo.elpd)
