"""FlowMixture (JAX): mixture density and sampling, EMA weights, diverging experts."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flowjax.distributions import Normal

from numpyro_mixvi.distributions.flow_mixture import (
    FlowMixture,
    ema_weights_init,
    ema_weights_step,
    fit_weights,
)
from tests.properties import assert_normalized_2d, assert_samples_match_density_2d


def test_integrates_to_one_and_samples_match(x64):
    experts = [Normal(jnp.array([-1.0, 0.0]), jnp.array([0.5, 1.0])),
               Normal(jnp.array([1.5, 1.0]), jnp.array([1.0, 0.4]))]
    mixture = FlowMixture(experts, jnp.array([0.3, 0.7]))
    log_prob = eqx.filter_jit(mixture.log_prob)
    density = lambda pts: np.asarray(log_prob(jnp.asarray(pts)))
    # Midpoint rule, 300^2 cells on a box > 6 sd around every expert: error << 0.01.
    assert_normalized_2d(density, (-6, 7, -6, 7), atol=0.01)
    x = eqx.filter_jit(mixture.sample)(jax.random.key(0), (3000,))
    assert x.shape == (3000, 2)
    # Chi-square of 3000 draws against the density on a 12x12 grid, alpha = 1e-3.
    assert_samples_match_density_2d(np.asarray(x), density, (-4, 5, -4, 5))
    assert mixture.component_log_probs(x[:5]).shape == (5, 2)


def test_ema_converges_to_softmax_of_negative_cross_entropy(x64):
    experts = [Normal(jnp.zeros(1), jnp.ones(1)), Normal(jnp.zeros(1), 2 * jnp.ones(1))]
    ce = jnp.array([0.5 * math.log(2 * math.pi) + 0.5, 0.5 * math.log(8 * math.pi) + 1 / 8])
    batches = lambda key: jax.random.normal(key, (2000, 1))
    weights = fit_weights(jax.random.key(1), experts, batches, num_steps=150, progress_bar=False)
    # EMA of ~19 batch softmaxes with sd ~0.005 each: 0.01 is > 3 sd (as in the torch test).
    assert jnp.allclose(weights, jax.nn.softmax(-ce), atol=0.01), weights


def test_responsibility_variant_finds_ml_weights(x64):
    experts = [Normal(jnp.array([-5.0]), jnp.ones(1)), Normal(jnp.array([5.0]), jnp.ones(1))]

    def batches(key):
        k1, k2 = jax.random.split(key)
        left = jax.random.uniform(k1, (2000, 1)) < 0.3
        return jax.random.normal(k2, (2000, 1)) + jnp.where(left, -5.0, 5.0)

    ml = fit_weights(jax.random.key(2), experts, batches, num_steps=150,
                     weight_update="responsibility", progress_bar=False)
    # Binomial sd 0.01 per batch, averaged by the EMA: 0.02 tolerance.
    assert jnp.allclose(ml, jnp.array([0.3, 0.7]), atol=0.02), ml


@pytest.mark.parametrize("bad", [math.nan, -math.inf], ids=["nan", "-inf"])
def test_diverging_expert_gets_zero_weight_without_nan(bad, x64):
    state = ema_weights_init(3)
    step = jax.jit(ema_weights_step)
    for i in range(200):
        log_lik = -jax.random.uniform(jax.random.key(i), (3, 50)) - jnp.array([[1.0], [0.0], [2.0]])
        state, info = step(state, log_lik.at[1].set(bad))
    assert jnp.isfinite(state.weights).all() and state.weights[1] < 1e-8
    assert jnp.isclose(state.weights.sum(), 1.0) and jnp.isfinite(info.n_eff)


def test_bad_arguments():
    state = ema_weights_init(2)
    with pytest.raises(ValueError, match="beta"):
        ema_weights_step(state, jnp.zeros((2, 3)), beta=1.0)
    with pytest.raises(ValueError, match="weight_update"):
        ema_weights_step(state, jnp.zeros((2, 3)), weight_update="em")
    with pytest.raises(ValueError, match="num_experts"):
        ema_weights_init(0)
    with pytest.raises(ValueError, match="weights must have shape"):
        FlowMixture([Normal(jnp.zeros(1), jnp.ones(1))], jnp.ones(2))
    broken = [Normal(jnp.zeros(1), jnp.ones(1))]
    with pytest.raises(FloatingPointError, match="non-finite"):
        fit_weights(jax.random.key(0), broken, lambda k: jnp.full((4, 1), jnp.nan),
                    num_steps=2, progress_bar=False)


SMALL_EXPERTS = {"maf": {"num_transforms": 2, "hidden_dims": (16,)},
                 "realnvp": {"num_transforms": 2, "hidden_dims": (16,)},
                 "rbig": {"max_layers": 4, "num_knots": 40}}


def _banana(key, n):
    """Standard normal with ``x_1 += 0.5 x_0^2``: skewed, so a Gaussian fits it badly."""
    x = jax.random.normal(key, (n, 2))
    return x.at[:, 1].add(0.5 * x[:, 0] ** 2)


# Fitting and checking a 3-expert mixture compiles for ~20 s of CPU per dtype, so the default
# run checks it in float32 and the float64 leg runs with the slow tests.
x64_fast_float32 = pytest.mark.parametrize(
    "x64", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["float32", "float64"],
    indirect=True,
)


@pytest.fixture
def small_fit(x64):
    """Stage 1 + 2 on 400 banana draws: 100 Adam steps per flow, 4 RBIG layers, 20 EMA steps."""
    train = _banana(jax.random.key(0), 400)
    mixture = FlowMixture.fit(jax.random.key(1), train, num_steps=100, batch_size=200, lr=1e-2,
                              num_weight_steps=20, weight_batch_size=200,
                              expert_kwargs=SMALL_EXPERTS, progress_bar=False)
    return mixture, train


@x64_fast_float32
def test_fit_integrates_to_one_samples_match_and_beats_gaussian(small_fit, x64):
    mixture, train = small_fit
    dtype = jnp.float64 if x64 else jnp.float32
    assert mixture.weights.dtype == dtype and jnp.isclose(mixture.weights.sum(), 1.0)
    assert 1.0 <= float(mixture.n_eff) <= 3.0 + 1e-5
    log_prob = eqx.filter_jit(mixture.log_prob)
    density = lambda pts: np.asarray(log_prob(jnp.asarray(pts, dtype)), np.float64)
    # Midpoint rule, 200^2 cells of 0.15 on a box > 5 sd of every expert's widest tail (the
    # O(h^2) error is < 0.005 for experts no narrower than 0.3).
    assert_normalized_2d(density, (-15, 15, -13, 17), num=200, atol=0.02)
    x = eqx.filter_jit(mixture.sample)(jax.random.key(2), (3000,))
    assert x.shape == (3000, 2) and x.dtype == dtype
    # Chi-square of 3000 draws against the density on a 12x12 grid, alpha = 1e-3.
    assert_samples_match_density_2d(np.asarray(x, np.float64), density, (-4, 4, -3, 6))
    # Held-out NLL against the moment-matched Gaussian: RBIG alone beats it by ~0.2 nats on this
    # target; the NLL sd over 4000 points is ~1.3 / sqrt(4000) = 0.02, so a 0.05 margin is > 2 sd.
    test = _banana(jax.random.key(3), 4000)
    gauss = Normal(train.mean(0), train.std(0))  # diagonal: the banana is uncorrelated
    gap = float(-gauss.log_prob(test).mean() + log_prob(test).mean())
    assert gap > 0.05, gap


def test_stage1_diverging_expert_is_downweighted(x64):
    """A factory expert whose loss is non-finite: warned, frozen, and weighted ~0 by stage 2."""
    x = jax.random.normal(jax.random.key(4), (300, 2))
    dtype = x.dtype
    healthy = lambda key, dim: Normal(jnp.zeros(dim, dtype), jnp.full(dim, 2.0, dtype))
    # The scale underflows to 0 in float32 (log q is NaN) and gives log q = -inf in float64.
    exploding = lambda key, dim: Normal(jnp.zeros(dim, dtype), jnp.full(dim, 1e-200, dtype))
    with pytest.warns(RuntimeWarning, match="expert 1: non-finite loss at step 0"):
        mixture = FlowMixture.fit(jax.random.key(5), x, experts=[healthy, exploding], num_steps=5,
                                  num_weight_steps=50, progress_bar=False)
    # -inf decays as beta^50 = 0.005 (of its start 0.5): below 1e-2; NaN gives exactly 0.
    assert bool(jnp.isfinite(mixture.weights).all()) and float(mixture.weights[1]) < 1e-2
    assert bool(jnp.isfinite(mixture.log_prob(x)).all())


def test_fit_bad_arguments():
    x = jax.random.normal(jax.random.key(0), (20, 2))
    with pytest.raises(ValueError, match="experts entries"):
        FlowMixture.fit(jax.random.key(0), x, experts=["nsf"], progress_bar=False)
    with pytest.raises(ValueError, match="samples"):
        FlowMixture.fit(jax.random.key(0), jnp.full((20, 2), jnp.inf), progress_bar=False)
    with pytest.raises(ValueError, match="samples"):
        FlowMixture.fit(jax.random.key(0), x[0], progress_bar=False)
    with pytest.raises(ValueError, match="num_steps"):
        FlowMixture.fit(jax.random.key(0), x, num_steps=0, progress_bar=False)
