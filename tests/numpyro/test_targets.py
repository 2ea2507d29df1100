"""NumPyro targets: normalized, exact samplers, entropies, moments, conjugate models."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density
from scipy import integrate, stats

from numpyro_mixvi.targets import (
    CONJUGATE_MODELS,
    TARGETS,
    AMFBanana,
    CorrelatedGaussian,
    Funnel,
    GaussianMixture,
    TwoMoons,
    target_model,
)
from tests.properties import (
    assert_close_in_mc_error,
    assert_normalized_2d,
    assert_samples_match_density_2d,
)

# One name per constructor: "amf_rings" is "rings" (same class), tested once.
UNIQUE = [name for name, make in TARGETS.items() if list(TARGETS.values()).index(make)
          == list(TARGETS).index(name)]
TWO_D = [name for name in UNIQUE if TARGETS[name]().dim == 2 and TARGETS[name]().bounds]
# Numeric entropies are documented to 5e-4 nats (grid quadrature); exact ones carry 0.
ENTROPY_ERROR = 5e-4


def numpy_log_prob(target, chunk=16384):
    """numpy -> numpy log density (input cast to the default float), in equal padded chunks so
    the target's compiled ``log_prob`` is reused."""

    def call(points):
        x = np.asarray(points, dtype=jnp.result_type(float))
        padded = np.concatenate([x, np.repeat(x[:1], -len(x) % chunk, 0)])
        parts = [target.log_prob(jnp.asarray(padded[i:i + chunk]))
                 for i in range(0, len(padded), chunk)]
        return np.asarray(jnp.concatenate(parts), dtype=np.float64)[:len(x)]

    return call


@pytest.fixture
def f64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def float_dtype():
    return jnp.result_type(float)


@pytest.mark.parametrize("name", TWO_D)
def test_normalized(name, x64):
    target = TARGETS[name]()
    # bounds hold all but < 1e-3 of the mass; midpoint rule at 300 cells/side resolves the
    # narrowest feature (sd 0.1, h <= 0.022) to O((h/sd)^2/24) < 2e-3.
    assert_normalized_2d(numpy_log_prob(target), target.bounds, num=300, atol=5e-3)


@pytest.mark.parametrize("name", TWO_D)
def test_samples_match_density(name, x64):
    target = TARGETS[name]()
    x = target.sample(jax.random.PRNGKey(0), (20000,))
    assert x.shape == (20000, 2) and x.dtype == float_dtype()
    assert_samples_match_density_2d(np.asarray(x, np.float64), numpy_log_prob(target),
                                    target.bounds)


@pytest.mark.parametrize("name", UNIQUE)
def test_entropy_matches_monte_carlo(name, f64):
    target = TARGETS[name]()
    # 20000 draws: the shapes of the sample test, so the compiled sampler is reused.
    nll = -np.asarray(target.log_prob(target.sample(jax.random.PRNGKey(1), (20000,))))
    entropy = float(target.entropy())
    # MC error from the sample standard deviation (4 SE) plus the documented numeric error.
    se = float(nll.std()) / math.sqrt(len(nll))
    assert abs(float(nll.mean()) - entropy) < 4 * se + ENTROPY_ERROR, (float(nll.mean()), entropy)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_shapes_and_dtype(name, x64):
    target = TARGETS[name]()
    x = target.sample(jax.random.PRNGKey(0), (2, 3))
    assert x.shape == (2, 3, target.dim) and x.dtype == float_dtype()
    assert target.log_prob(x).shape == (2, 3) and target.log_prob(x).dtype == float_dtype()
    assert target.event_shape == (target.dim,) and target.batch_shape == ()


@pytest.mark.parametrize("name", ["banana", "x_shape", "rings", "two_moons", "amf_banana",
                                  "funnel", "correlated_gaussian"])
def test_target_is_a_jittable_pytree(name):
    """Each target class passes through ``jit`` as a pytree (one compile per class)."""
    target = TARGETS[name]()
    x = target.sample(jax.random.PRNGKey(0), (4,))
    jitted = jax.jit(lambda d, v: d.log_prob(v))(target, x)
    np.testing.assert_allclose(jitted, target.log_prob(x), rtol=1e-5)
    draws = jax.jit(lambda d, k: d.sample(k, (4,)))(target, jax.random.PRNGKey(1))
    assert draws.shape == (4, target.dim)


def test_banana_is_gaussian_in_y(x64):
    target = TARGETS["banana"]()
    x = np.asarray(target.sample(jax.random.PRNGKey(0), (100,)), np.float64)
    y = np.stack([x[..., 0], x[..., 0] ** 2 + x[..., 1] + 1], -1)
    expected = stats.multivariate_normal([0, 0], [[1.0, 0.9], [0.9, 1.0]]).logpdf(y)
    np.testing.assert_allclose(target.log_prob(jnp.asarray(x, float_dtype())), expected,
                               rtol=1e-5 if x64 else 1e-3, atol=1e-5 if x64 else 1e-3)


def test_two_moons_quadrature_against_dense_rule(f64):
    target = TwoMoons()
    points = np.random.default_rng(0).uniform([-1.7, -1.2], [2.7, 1.7], size=(40, 2))
    t = np.linspace(0, np.pi, 200001)  # trapezoid on 2e5 panels: error ~1e-10 relative

    def density(p):
        up = np.stack([np.cos(t), np.sin(t)], -1)
        low = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], -1)
        k = [np.exp(-0.5 * ((p - c) ** 2).sum(-1) / 0.01) / (2 * np.pi * 0.01) for c in (up, low)]
        return sum(integrate.trapezoid(kk, t) for kk in k) / (2 * np.pi)

    expected = np.array([density(p) for p in points])
    got = np.exp(np.asarray(target.log_prob(jnp.asarray(points))))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-300)


def test_amf_banana_quadrature_against_dense_rule(f64):
    target = AMFBanana()
    points = np.random.default_rng(1).uniform([-5, -3], [5, 10], size=(40, 2))
    u = np.linspace(-12, 12, 240001)  # the integrand over x1 has width >= 0.1: dense trapezoid

    def density(p):
        f = (stats.norm.pdf(u, 0, np.sqrt(2)) * stats.norm.pdf(p[0] - u, 0, 0.1)
             * stats.norm.pdf(p[1], u**2 / 4, np.sqrt(1.01)))
        return integrate.trapezoid(f, u)

    expected = np.array([density(p) for p in points])
    got = np.exp(np.asarray(target.log_prob(jnp.asarray(points))))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-300)
    noise_free = AMFBanana(noise=0.0)
    assert float(noise_free.entropy()) == pytest.approx(1 + math.log(2 * math.pi) + math.log(2) / 2)


def test_funnel_moments_and_density(x64):
    target = Funnel(5)
    x = np.asarray(target.sample(jax.random.PRNGKey(0), (20000,)), np.float64)
    assert_close_in_mc_error(x[:, 0], 0.0)
    assert_close_in_mc_error(x[:, 0] ** 2, 9.0)
    z = x[:, 1:] * np.exp(-x[:, :1] / 2)  # standardized given x1: i.i.d. N(0, 1)
    assert stats.kstest(z.ravel()[:20000], "norm").pvalue > 1e-3
    y = x[:7]
    expected = (stats.norm(0, 3).logpdf(y[:, 0])
                + stats.norm(0, np.exp(y[:, :1] / 2)).logpdf(y[:, 1:]).sum(-1))
    np.testing.assert_allclose(target.log_prob(jnp.asarray(y, float_dtype())), expected,
                               rtol=1e-5)
    assert float(target.variance[1]) == pytest.approx(math.exp(4.5), rel=1e-6)


def test_correlated_gaussian_moments(x64):
    target = CorrelatedGaussian(4, 0.8)
    draws = jax.jit(lambda d, key: d.sample(key, (40000,)))(target, jax.random.PRNGKey(0))
    x = np.asarray(draws, np.float64)
    cov = np.cov(x.T)
    # sampling sd of a covariance entry: sqrt((1 + rho^2) / n) <= 0.0071; 5 sd.
    np.testing.assert_allclose(cov, 0.2 * np.eye(4) + 0.8, atol=0.036)
    assert target.covariance_matrix.dtype == float_dtype()


def test_gaussian_mixture_matches_scipy_any_dim(f64):
    rng = np.random.default_rng(0)
    locs, a = rng.normal(size=(3, 4)), rng.normal(size=(3, 4, 4))
    covs = a @ a.transpose(0, 2, 1) + np.eye(4)
    w = np.array([0.2, 0.3, 0.5])
    gmm = GaussianMixture(jnp.asarray(locs), jnp.asarray(covs), jnp.asarray(w))
    x = rng.normal(size=(10, 4))
    expected = np.log(sum(wk * stats.multivariate_normal(m, c).pdf(x)
                          for wk, m, c in zip(w, locs, covs, strict=True)))
    np.testing.assert_allclose(gmm.log_prob(jnp.asarray(x)), expected, rtol=1e-10)
    draws = np.asarray(gmm.sample(jax.random.PRNGKey(0), (40000,)))
    mean = (w[:, None] * locs).sum(0)
    se = draws.std(0) / math.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(0) - mean) < 4.5 * se)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GaussianMixture(jnp.zeros(3), jnp.eye(3)), "locs must have shape"),
        (lambda: GaussianMixture(jnp.zeros((2, 3)), jnp.eye(3)), "covariances must have"),
        (lambda: GaussianMixture(jnp.zeros((2, 1)), jnp.ones((2, 1, 1)), -jnp.ones(2)),
         "weights must be positive"),
        (lambda: Funnel(1), "dim must be >= 2"),
        (lambda: CorrelatedGaussian(3, -0.6), "rho must lie in"),
        (lambda: TwoMoons(0.0), "noise must be > 0"),
        (lambda: target_model("banana"), "target must be a NumPyro Distribution"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_target_model_posterior_is_target():
    target = TARGETS["rings"]()
    trace = handlers.trace(handlers.seed(target_model(target), 0)).get_trace()
    assert trace["x"]["fn"] is target
    value = trace["x"]["value"]
    log_joint, _ = log_density(target_model(target), (), {}, {"x": value})
    np.testing.assert_allclose(log_joint, target.log_prob(value), rtol=1e-6)


def _log_joint_on_grid(case, site, grid):
    """``log p(data, z)`` at each grid value of the one latent site, from the model's own trace."""
    model = handlers.condition(case.model, {site: grid[:, None]})
    trace = handlers.trace(handlers.seed(model, 0)).get_trace(*case.args, **case.kwargs)
    sites = [s for s in trace.values() if s["type"] == "sample"]
    return sum(s["fn"].log_prob(s["value"]).reshape(len(grid), -1).sum(-1) for s in sites)


@pytest.mark.parametrize("name", sorted(CONJUGATE_MODELS))
def test_conjugate_posterior_and_evidence(name, f64):
    case = CONJUGATE_MODELS[name]()
    (site, posterior), = case.posterior.items()
    # Integrate prior x likelihood over the latent's support (truncated beyond 12-20 posterior sd)
    # (Gauss-Legendre, 400 nodes in 40 panels: error far below 1e-8 for these smooth densities).
    mean, sd = float(posterior.mean), float(posterior.variance) ** 0.5
    ranges = {"loc": (mean - 12 * sd, mean + 12 * sd), "p": (0.0, 1.0)}
    lo, hi = ranges.get(site, (0.0, mean + 20 * sd))
    x, w = np.polynomial.legendre.leggauss(10)
    edges = np.linspace(lo, hi, 41)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    nodes = jnp.asarray((edges[:-1, None] + half * (x + 1)).ravel())
    log_w = jnp.asarray(np.log((half * w).ravel()))
    log_joint = jax.jit(lambda grid: _log_joint_on_grid(case, site, grid))(nodes)
    log_evidence = float(jax.nn.logsumexp(log_joint + log_w, 0))
    assert log_evidence == pytest.approx(case.log_evidence, abs=1e-8)
    post = np.exp(np.asarray(log_joint) - log_evidence)
    np.testing.assert_allclose(post, np.exp(posterior.log_prob(nodes)), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["banana", "two_moons", "funnel", "correlated_gaussian"])
def test_target_model_takes_an_svi_step(name):
    """``target_model`` is a model an autoguide fits (one model per target class kind)."""
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    model = target_model(TARGETS[name]())
    svi = SVI(model, AutoNormal(model), numpyro.optim.Adam(0.01), Trace_ELBO(num_particles=4))
    state = svi.init(jax.random.PRNGKey(0))
    _, loss = svi.update(state)
    assert math.isfinite(float(loss))
