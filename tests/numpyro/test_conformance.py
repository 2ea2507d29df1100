"""Conformance suite: every NumPyro guide mixvi ships behaves like a NumPyro autoguide.

Each guide registers one line in ``CASES``; every test below runs on every case. The checks
follow the contract a user relies on when swapping ``AutoNormal`` for a mixvi guide
(``ecosystem.md`` §2 and §6): median and quantiles, ``Predictive``, pickling the guide and
its params and sampling from the loaded guide without the training data, leading sample
dimensions, constrained sites of every common support, helpful errors, float32 and float64,
and the ArviZ bridge.

Register a guide::

    GuideCase("AutoCWM", partial(AutoCWM, num_components=3), RBMixture_ELBO, has_quantiles=False)
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.infer import SVI, Predictive, Trace_ELBO, log_likelihood  # noqa: E402
from numpyro.infer.autoguide import (  # noqa: E402
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_median,
)
from numpyro.infer.util import log_density  # noqa: E402
from numpyro.optim import Adam  # noqa: E402

from numpyro_mixvi import (  # noqa: E402
    SIVI_ELBO,
    AutoCWM,
    AutoFlowMixture,
    AutoSIVI,
    RBMixture_ELBO,
    to_arviz,
)


class GuideCase(NamedTuple):
    """One guide under test.

    Attributes:
        id: Test id.
        guide: ``(model, *, init_loc_fn) -> guide``.
        elbo: ``(*, num_particles) -> ELBO`` (``Trace_ELBO``-like).
        has_median: The guide implements ``median(params)``.
        has_quantiles: The guide implements ``quantiles(params, qs)``.
        picklable: The guide object pickles (upstream ``AutoIAFNormal`` holds stax lambdas).
        raises_no_latent: The guide raises ``RuntimeError`` on a model without latent sites
            (``AutoContinuous`` does; upstream ``AutoNormal`` does not).
        num_steps: SVI steps for the short conjugate fit.
        lr: Initial Adam step size for that fit (decays to 1/10 of it by the last step).
    """

    id: str
    guide: Callable[..., Any]
    elbo: Callable[..., Any] = Trace_ELBO
    has_median: bool = True
    has_quantiles: bool = True
    picklable: bool = True
    raises_no_latent: bool = True
    num_steps: int = 500
    lr: float = 0.05


CASES = [
    GuideCase("AutoNormal", AutoNormal, raises_no_latent=False),
    GuideCase("AutoDiagonalNormal", AutoDiagonalNormal),
    GuideCase("AutoMultivariateNormal", AutoMultivariateNormal),
    GuideCase("AutoLowRankMultivariateNormal", partial(AutoLowRankMultivariateNormal, rank=1)),
    GuideCase(
        "AutoIAFNormal",
        AutoIAFNormal,
        has_median=False,
        has_quantiles=False,
        picklable=False,
        lr=0.01,
    ),
    GuideCase(
        "AutoCWM",
        partial(AutoCWM, num_components=3, hidden_dims=(8,)),
        RBMixture_ELBO,
        has_median=False,
        has_quantiles=False,
    ),
    GuideCase(
        "AutoCWM-flows",
        partial(AutoCWM, num_components=3, hidden_dims=(8,), flow_layers=2),
        RBMixture_ELBO,
        has_median=False,
        has_quantiles=False,
    ),
    GuideCase(
        "AutoFlowMixture",
        partial(AutoFlowMixture, experts=("maf", "realnvp"),
                expert_kwargs={"maf": {"num_transforms": 2, "hidden_dims": (8,)},
                               "realnvp": {"num_transforms": 2, "hidden_dims": (8,)}}),
        RBMixture_ELBO,
        has_median=False,
        has_quantiles=False,
        lr=0.01,
    ),
    GuideCase(
        "AutoSIVI",
        partial(AutoSIVI, hidden_dims=(16,), proposal_hidden_dims=(16, 16),
                num_importance_samples=32),
        SIVI_ELBO,
        picklable=False,
        lr=0.01,
    ),
]

case_param = pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])

# Conjugate model: mu ~ N(0, I), y_i | mu ~ N(mu, I); posterior N(sum(y) / (N + 1), I / (N + 1)).
# Two dims: NumPyro's IAF/BNAF refuse a one-dimensional latent.
NUM_DATA = 20


def conjugate_model(y=None, num_data=None):
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    with numpyro.plate("data", y.shape[0] if num_data is None else num_data):
        numpyro.sample("obs", dist.Normal(mu, 1.0).to_event(1), obs=y)


def conjugate_data():
    y = np.array([0.7, -0.3]) + np.random.default_rng(0).normal(size=(NUM_DATA, 2))
    return jnp.asarray(y, dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def exact_posterior(y):
    return dist.Normal(y.sum(0) / (len(y) + 1), (len(y) + 1.0) ** -0.5)


def constrained_model(y):
    """One latent of each common support, one of them local to a plate."""
    zero = jnp.zeros((), y.dtype)
    loc = numpyro.sample("loc", dist.Normal(zero, 1.0))  # real
    scale = numpyro.sample("scale", dist.LogNormal(zero, 0.5))  # positive
    numpyro.sample("p", dist.Beta(zero + 2.0, zero + 2.0))  # unit interval
    numpyro.sample("u", dist.Uniform(zero - 1.0, zero + 2.0))  # interval
    numpyro.sample("w", dist.Dirichlet(jnp.ones(3, y.dtype)))  # simplex
    numpyro.sample("L", dist.LKJCholesky(3, zero + 1.0))  # correlation Cholesky
    base = dist.Normal(jnp.zeros(3, y.dtype), 1.0).to_event(1)
    numpyro.sample("c", dist.TransformedDistribution(base, dist.transforms.OrderedTransform()))
    with numpyro.plate("data", y.shape[-1]):
        tau = numpyro.sample("tau", dist.HalfNormal(zero + 1.0))  # positive, local
        numpyro.sample("obs", dist.Normal(loc, scale * tau), obs=y)


CONSTRAINED_SITES = {"loc", "scale", "p", "u", "w", "L", "c", "tau"}


def discrete_model():
    numpyro.sample("z", dist.Bernoulli(0.5))
    numpyro.sample("x", dist.Normal(0.0, 1.0))


def observed_only_model(y):
    numpyro.sample("obs", dist.Normal(0.0, 1.0), obs=y)


def make_guide(case, model):
    return case.guide(model, init_loc_fn=init_to_median)


def fit(case, model, *args, num_steps=None):
    """``(guide, params)`` after a short SVI run with a decaying step size (none: just init)."""
    guide = make_guide(case, model)
    num_steps = case.num_steps if num_steps is None else num_steps
    optim = Adam(lambda step: case.lr * 0.1 ** (step / max(num_steps, 1)))
    svi = SVI(model, guide, optim, case.elbo(num_particles=8))
    if num_steps == 0:
        return guide, svi.get_params(svi.init(jax.random.PRNGKey(0), *args))
    result = svi.run(jax.random.PRNGKey(0), num_steps, *args, progress_bar=False)
    assert math.isfinite(float(result.losses[-1])), f"{case.id}: non-finite loss"
    return guide, result.params


_FITS = {}


def fit_cached(case, model, num_steps=None):
    """``fit`` on the default data, once per case, model, step count and dtype."""
    key = (case.id, model.__name__, num_steps, jax.config.jax_enable_x64)
    if key not in _FITS:
        y = conjugate_data() if model is conjugate_model else conjugate_data()[:, 0]
        _FITS[key] = (*fit(case, model, y, num_steps=num_steps), y)
    return _FITS[key]


def float_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


@case_param
def test_median(case, x64):
    if not case.has_median:
        pytest.skip(f"{case.id} defines no median")
    guide, params, y = fit_cached(case, conjugate_model)
    median = guide.median(params)["mu"]
    posterior = exact_posterior(y)
    assert median.dtype == float_dtype() and median.shape == (2,)
    # The decaying step size leaves ~0.1 posterior sd of optimiser error; allow 0.5 sd.
    assert float(jnp.abs(median - posterior.mean).max()) < 0.5 * float(posterior.scale[0])


@case_param
def test_quantiles(case, x64):
    if not case.has_quantiles:
        pytest.skip(f"{case.id} defines no quantiles")
    guide, params, y = fit_cached(case, conjugate_model)
    probs = [0.1, 0.5, 0.9]
    quantiles = guide.quantiles(params, probs)["mu"]
    assert quantiles.shape == (3, 2) and quantiles.dtype == float_dtype()
    assert bool((quantiles[1:] > quantiles[:-1]).all())
    posterior = exact_posterior(y)
    exact = posterior.icdf(jnp.asarray(probs, y.dtype)[:, None])
    # Gaussian guides hold the exact posterior; the short fit leaves ~0.1 sd of error.
    assert float(jnp.abs(quantiles - exact).max()) < 0.5 * float(posterior.scale[0])


@case_param
def test_posterior_draws_match_exact_posterior(case, x64):
    guide, params, y = fit_cached(case, conjugate_model)
    mu = guide.sample_posterior(jax.random.PRNGKey(1), params, sample_shape=(2000,))["mu"]
    assert mu.shape == (2000, 2) and mu.dtype == float_dtype()
    posterior = exact_posterior(y)
    sd = float(posterior.scale[0])
    # Monte Carlo error of the mean is sd / sqrt(2000) ~ 0.02 sd; the fit error dominates.
    assert float(jnp.abs(mu.mean(0) - posterior.mean).max()) < 0.5 * sd
    assert bool(((mu.std(0) / sd > 0.6) & (mu.std(0) / sd < 1.5)).all())


@case_param
def test_predictive(case, x64):
    guide, params, y = fit_cached(case, conjugate_model)
    predictive = Predictive(
        conjugate_model, guide=guide, params=params, num_samples=7, return_sites=["mu", "obs"]
    )
    samples = predictive(jax.random.PRNGKey(2), None, NUM_DATA)  # posterior predictive, no y
    assert samples["mu"].shape == (7, 2)
    assert samples["obs"].shape == (7, NUM_DATA, 2) and samples["obs"].dtype == float_dtype()
    # The replicated data scatter around each draw of mu with unit noise (5 sd of their mean).
    assert float(jnp.abs(samples["obs"].mean(1) - samples["mu"]).max()) < 5 / NUM_DATA**0.5


# Setting up a guide on constrained_model compiles for ~18 s of CPU (LKJ, ordered, simplex...),
# so the default run checks it in float32 and the float64 leg runs with the slow tests.
x64_fast_float32 = pytest.mark.parametrize(
    "x64",
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["float32", "float64"],
    indirect=True,
)


@case_param
@x64_fast_float32
def test_pickle_round_trip_samples_without_data(case, x64):
    if not case.picklable:
        pytest.skip(f"upstream {case.id} does not pickle")
    guide, params, y = fit_cached(case, constrained_model, num_steps=0)
    key = jax.random.PRNGKey(4)
    expected = guide.sample_posterior(key, params, sample_shape=(5,))
    loaded_guide, loaded_params = pickle.loads(pickle.dumps((guide, params)))
    actual = loaded_guide.sample_posterior(key, loaded_params, sample_shape=(5,))  # no data
    assert set(actual) >= CONSTRAINED_SITES
    for name in CONSTRAINED_SITES:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, err_msg=name)


@case_param
def test_leading_sample_dims(case, x64):
    guide, params, y = fit_cached(case, conjugate_model)
    samples = guide.sample_posterior(jax.random.PRNGKey(5), params, sample_shape=(3, 2))
    assert samples["mu"].shape == (3, 2, 2)
    log_lik = log_likelihood(conjugate_model, samples, y, batch_ndims=2)["obs"]
    assert log_lik.shape == (3, 2, NUM_DATA) and bool(jnp.isfinite(log_lik).all())
    # The ELBO vmaps the guide over particles.
    loss = case.elbo(num_particles=4).loss(jax.random.PRNGKey(6), params, conjugate_model, guide, y)
    assert math.isfinite(float(loss))


@case_param
@x64_fast_float32
def test_constrained_sites(case, x64):
    guide, params, y = fit_cached(case, constrained_model, num_steps=0)
    loss = case.elbo(num_particles=2).loss(
        jax.random.PRNGKey(8), params, constrained_model, guide, y
    )
    assert math.isfinite(float(loss))
    samples = guide.sample_posterior(jax.random.PRNGKey(7), params, sample_shape=(50,))
    assert set(samples) >= CONSTRAINED_SITES
    assert samples["tau"].shape == (50, NUM_DATA)
    trace = handlers.trace(handlers.seed(constrained_model, 0)).get_trace(y)
    for name in CONSTRAINED_SITES:
        value = samples[name]
        assert value.dtype == float_dtype(), name
        assert bool(trace[name]["fn"].support(value).all()), f"{name} leaves its support"

    def log_joint(draw):
        return log_density(constrained_model, (y,), {}, draw)[0]

    draws = {name: samples[name] for name in CONSTRAINED_SITES}
    assert bool(jnp.isfinite(jax.vmap(log_joint)(draws)).all())


@case_param
def test_discrete_latent_error_names_site(case):
    pytest.importorskip("funsor", reason="NumPyro reaches its helpful error through funsor")
    guide = make_guide(case, discrete_model)
    with pytest.raises(ValueError, match="'z'"):
        handlers.seed(guide, 0)()


@case_param
def test_no_latent_sites_error(case):
    if not case.raises_no_latent:
        pytest.skip(f"upstream {case.id} accepts a model without latent sites")
    guide = make_guide(case, observed_only_model)
    with pytest.raises(RuntimeError, match="latent"):
        handlers.seed(guide, 0)(jnp.ones(()))


@case_param
@x64_fast_float32
def test_to_arviz(case, x64):
    guide, params, y = fit_cached(case, conjugate_model)
    num_samples = 400
    data = to_arviz(
        jax.random.PRNGKey(9), params, conjugate_model, guide, y, num_samples=num_samples
    )
    assert data.posterior["mu"].shape == (1, num_samples, 2)
    assert data.log_likelihood["obs"].shape == (1, num_samples, NUM_DATA)
    log_w = data.sample_stats["log_p"].values - data.sample_stats["log_q"].values
    assert log_w.shape == (1, num_samples) and np.isfinite(log_w).all()
    posterior = exact_posterior(y)
    sd = float(posterior.scale[0])
    # Fit error (< 0.5 sd, test_posterior_draws...) plus Monte Carlo error 4 sd / sqrt(400).
    gap = np.abs(data.posterior["mu"].values[0].mean(0) - np.asarray(posterior.mean))
    assert gap.max() < 0.7 * sd
