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
