"""Product-of-experts math and its NUTS sampler (numpyro_mixvi.multimodal.poe)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions import MultivariateNormal, Normal

from numpyro_mixvi.multimodal import JNF, gaussian_product_of_experts, product_of_experts_log_prob
from numpyro_mixvi.multimodal.poe import sample_product_of_experts
from tests.jnf_oracles import LinearGaussian, gaussian_log_prob
from tests.properties import assert_samples_match_density_2d, grid_2d


@pytest.mark.parametrize("subset", [(0, 1), (0, 1, 2), (0, 2, 3), (0, 1, 2, 3)])
def test_prior_power_is_subset_size_minus_one(x64, subset):
    # PoE of exact conditionals / p(z)^(|S|-1) is the exact joint: log ratio constant in z.
    rng = np.random.default_rng(1)
    oracle = LinearGaussian.make(rng, 2, [3, 4, 2, 3], diagonal=False)
    _, xs = oracle.sample(rng, 1)
    z = rng.normal(size=(50, 1, 2))
    experts = [jnp.asarray(gaussian_log_prob(z, *oracle.posterior([j], xs))) for j in subset]
    prior = jnp.asarray(gaussian_log_prob(z, np.zeros(2), np.eye(2)))
    exact = gaussian_log_prob(z, *oracle.posterior(subset, xs))
    ratio = np.asarray(product_of_experts_log_prob(experts, prior)) - exact
    tol = 1e-9 if x64 else 1e-4
    assert ratio.std() < tol * np.abs(exact).max()
    # MultiVae main's rule (divide once) is wrong as soon as |S| > 2.
    wrong = np.asarray(sum(experts) - prior) - exact
    assert (wrong.std() > 0.1) == (len(subset) > 2)


def test_jnf_log_prob_uses_power_subset_minus_one(x64):
    # Pin the JNF class itself: with exact unimodal experts plugged in, its subset density is the
    # exact joint posterior up to a constant, for a 3-modality subset.
    rng = np.random.default_rng(2)
    oracle = LinearGaussian.make(rng, 2, [3, 3, 3], diagonal=False)
    _, xs = oracle.sample(rng, 4)
    jnf = JNF([3, 3, 3], latent_dim=2, hidden_dims=(4,))
    jnf.init_networks(jax.random.key(0))

    def exact_unimodal(j, z, x, networks=None):
        precision = np.eye(2) + oracle.loadings[j].T @ oracle.loadings[j] / oracle.noise[j] ** 2
        cov = np.linalg.inv(precision)
        mean = x @ jnp.asarray(oracle.loadings[j] / oracle.noise[j] ** 2 @ cov)
        return MultivariateNormal(mean, jnp.asarray(cov)).log_prob(z)

    jnf.unimodal_log_prob = exact_unimodal
    z = jnp.asarray(rng.normal(size=(30, 4, 2)))
    log_prob = np.asarray(jnf.log_prob(z, [jnp.asarray(x) for x in xs]))
    ratio = log_prob - gaussian_log_prob(np.asarray(z), *oracle.posterior([0, 1, 2], xs))
    assert (ratio.std(0) < (1e-8 if x64 else 1e-4)).all()


def test_gaussian_product_of_experts_closed_form(x64):
    rng = np.random.default_rng(3)
    oracle = LinearGaussian.make(rng, 3, [4, 5, 3], diagonal=True)
    _, xs = oracle.sample(rng, 6)
    locs, scales = [], []
    for j in range(3):
        mean, cov = oracle.posterior([j], xs)
        locs.append(jnp.asarray(mean))
        scales.append(jnp.broadcast_to(jnp.asarray(np.sqrt(np.diag(cov))), (6, 3)))
    loc, scale = gaussian_product_of_experts(locs, scales, prior_power=-2.0)
    mean, cov = oracle.posterior([0, 1, 2], xs)
    tol = 1e-10 if x64 else 1e-4
    assert np.allclose(loc, mean, atol=tol) and np.allclose(scale, np.sqrt(np.diag(cov)), atol=tol)
    assert loc.dtype == (jnp.float64 if x64 else jnp.float32)


def test_gaussian_product_of_experts_errors():
    one = jnp.ones(2)
    with pytest.raises(ValueError, match="equal length"):
        gaussian_product_of_experts([one], [], prior_power=1.0)
    with pytest.raises(ValueError, match="not normalizable"):
        gaussian_product_of_experts([one, one], [one * 2, one * 2], prior_power=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        product_of_experts_log_prob([], one)


def _target(z, shift):
    """One observation: a Gaussian-mixture expert shifted by `shift`, times a Gaussian expert,
    divided once by the N(0, I) prior (|S| = 2). Maps (..., 2) to (...)."""
    u = z - shift
    cov_a = jnp.array([[0.4, 0.15], [0.15, 0.3]], z.dtype)
    cov_b = jnp.array([[0.3, -0.1], [-0.1, 0.5]], z.dtype)
    a = MultivariateNormal(jnp.array([-1.0, 0.5], z.dtype), cov_a).log_prob(u) + np.log(0.4)
    b = MultivariateNormal(jnp.array([1.2, -0.3], z.dtype), cov_b).log_prob(u) + np.log(0.6)
    gaussian = MultivariateNormal(jnp.array([0.3, 0.0], z.dtype), 2.0 * jnp.eye(2, dtype=z.dtype))
    prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
    return product_of_experts_log_prob([jnp.logaddexp(a, b), gaussian.log_prob(u)], prior)


@pytest.mark.parametrize(
    "num_samples", [800, pytest.param(4000, marks=pytest.mark.slow)], ids=["fast", "long"]
)
def test_nuts_draws_from_the_product_of_experts(x64, num_samples):
    # One adapted NUTS chain per observation (vmapped), against 2-D quadrature of each PoE
    # density. Draws are thinned by 4 for the chi-square test, which assumes independence.
    shifts = jnp.array([[0.0, 0.0], [0.8, -0.6]])
    draws = sample_product_of_experts(
        jax.random.key(0),
        _target,
        jnp.zeros((2, 2)),
        shifts,
        num_samples=num_samples,
        num_warmup=200,
    )
    assert draws.shape == (num_samples, 2, 2)
    assert draws.dtype == (jnp.float64 if x64 else jnp.float32)
    kept = num_samples // 4
    bounds = (-4.0, 4.0, -4.0, 4.0)
    for b in range(2):

        def log_prob(points, b=b):
            return np.asarray(_target(jnp.asarray(points), shifts[b]), dtype=np.float64)

        sample = np.asarray(draws[::4, b], dtype=np.float64)
        assert_samples_match_density_2d(sample, log_prob, bounds, bins=10)
        # Mean against quadrature within 5 standard errors of `kept` near-independent draws.
        points, area = grid_2d(bounds, 200)
        weights = np.exp(log_prob(points)) * area
        weights /= weights.sum()
        mean = weights @ points
        sd = np.sqrt(weights @ (points - mean) ** 2)
        assert (np.abs(sample.mean(0) - mean) < 5 * sd / np.sqrt(kept)).all()


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        sample_product_of_experts(jax.random.key(0), lambda z, o: z.sum(), jnp.zeros(3))
    with pytest.raises(ValueError, match="num_samples"):
        sample_product_of_experts(
            jax.random.key(0), lambda z, o: z.sum(), jnp.zeros((1, 2)), num_samples=0
        )
