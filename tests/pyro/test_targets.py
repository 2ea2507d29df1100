"""Targets: normalized, exact samplers, entropies, funnel/Gaussian moments, conjugate models."""

import math

import numpy as np
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from scipy import integrate, stats

from pyro_mixvi.targets import (
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


def numpy_log_prob(target, dtype, chunk=4096):
    """numpy -> numpy log density, evaluated in chunks so the quadrature targets stay small."""

    def log_prob(points):
        x = torch.as_tensor(points, dtype=dtype)
        with torch.no_grad():
            return torch.cat([target.log_prob(c) for c in x.split(chunk)]).double().numpy()

    return log_prob


@pytest.mark.parametrize("name", TWO_D)
def test_normalized(name, dtype):
    target = TARGETS[name]()
    # bounds hold all but < 1e-3 of the mass; midpoint rule at 300 cells/side resolves the
    # narrowest feature (sd 0.1, h <= 0.022) to O((h/sd)^2/24) < 2e-3.
    assert_normalized_2d(numpy_log_prob(target, dtype), target.bounds, num=300, atol=5e-3)


@pytest.mark.parametrize("name", TWO_D)
def test_samples_match_density(name, dtype):
    target = TARGETS[name]()
    x = target.sample((20000,))
    assert x.shape == (20000, 2) and x.dtype == dtype
    assert_samples_match_density_2d(x.double().numpy(), numpy_log_prob(target, dtype),
                                    target.bounds)


@pytest.mark.parametrize("name", UNIQUE)
def test_entropy_matches_monte_carlo(name):
    torch.set_default_dtype(torch.float64)
    target = TARGETS[name]()
    nll = -target.log_prob(target.sample((40000,)))
    entropy = float(target.entropy())
    # MC error from the sample standard deviation (4 SE) plus the documented numeric error.
    se = float(nll.std()) / math.sqrt(len(nll))
    assert abs(float(nll.mean()) - entropy) < 4 * se + ENTROPY_ERROR, (float(nll.mean()), entropy)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_shapes_and_dtype(name, dtype):
    target = TARGETS[name]()
    x = target.sample((2, 3))
    assert x.shape == (2, 3, target.dim) and x.dtype == dtype
    assert target.log_prob(x).shape == (2, 3)
    if not isinstance(target, CorrelatedGaussian):  # a torch MultivariateNormal: params' dtype
        assert target.log_prob(x.double()).dtype == torch.float64
    assert target.event_shape == (target.dim,) and target.batch_shape == ()


def test_banana_is_gaussian_in_y(dtype):
    target = TARGETS["banana"]()
    x = target.sample((100,))
    y = torch.stack([x[..., 0], x[..., 0] ** 2 + x[..., 1] + 1], -1)
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    expected = torch.distributions.MultivariateNormal(torch.zeros(2), cov).log_prob(y)
    torch.testing.assert_close(target.log_prob(x), expected)


def test_two_moons_quadrature_against_dense_rule():
    torch.set_default_dtype(torch.float64)
    target = TwoMoons()
    points = np.random.default_rng(0).uniform([-1.7, -1.2], [2.7, 1.7], size=(40, 2))
    t = np.linspace(0, np.pi, 200001)  # trapezoid on 2e5 panels: error ~1e-10 relative

    def density(p):
        up = np.stack([np.cos(t), np.sin(t)], -1)
        low = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], -1)
        k = [np.exp(-0.5 * ((p - c) ** 2).sum(-1) / 0.01) / (2 * np.pi * 0.01) for c in (up, low)]
        return sum(integrate.trapezoid(kk, t) for kk in k) / (2 * np.pi)

    expected = np.array([density(p) for p in points])
    got = target.log_prob(torch.as_tensor(points)).exp().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-300)


def test_amf_banana_quadrature_against_dense_rule():
    torch.set_default_dtype(torch.float64)
    target = AMFBanana()
    points = np.random.default_rng(1).uniform([-5, -3], [5, 10], size=(40, 2))
    u = np.linspace(-12, 12, 240001)  # the integrand over x1 has width >= 0.1: dense trapezoid

    def density(p):
        f = (stats.norm.pdf(u, 0, np.sqrt(2)) * stats.norm.pdf(p[0] - u, 0, 0.1)
             * stats.norm.pdf(p[1], u**2 / 4, np.sqrt(1.01)))
        return integrate.trapezoid(f, u)

    expected = np.array([density(p) for p in points])
    got = target.log_prob(torch.as_tensor(points)).exp().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-300)
    noise_free = AMFBanana(noise=0.0)
    assert float(noise_free.entropy()) == pytest.approx(1 + math.log(2 * math.pi) + math.log(2) / 2)


def test_funnel_moments_and_density(dtype):
    target = Funnel(5)
    x = target.sample((20000,)).double()
    assert_close_in_mc_error(x[:, 0].numpy(), 0.0)
    assert_close_in_mc_error((x[:, 0] ** 2).numpy(), 9.0)
    z = (x[:, 1:] * (-x[:, :1] / 2).exp()).numpy()  # standardized given x1: i.i.d. N(0, 1)
    assert stats.kstest(z.ravel()[:20000], "norm").pvalue > 1e-3
    y = target.sample((7,))
    expected = (torch.distributions.Normal(0.0, 3.0).log_prob(y[:, 0])
                + torch.distributions.Normal(0.0, (y[:, :1] / 2).exp()).log_prob(y[:, 1:]).sum(-1))
    torch.testing.assert_close(target.log_prob(y), expected)
    assert target.variance[1].item() == pytest.approx(math.exp(4.5))


def test_correlated_gaussian_moments(dtype):
    target = CorrelatedGaussian(4, 0.8)
    x = target.sample((40000,)).double().numpy()
    cov = np.cov(x.T)
    # sampling sd of a covariance entry: sqrt((1 + rho^2) / n) <= 0.0071; 5 sd.
    np.testing.assert_allclose(cov, 0.2 * np.eye(4) + 0.8, atol=0.036)
    assert target.covariance_matrix.dtype == dtype


def test_gaussian_mixture_matches_scipy_any_dim():
    torch.set_default_dtype(torch.float64)
    rng = np.random.default_rng(0)
    locs, a = rng.normal(size=(3, 4)), rng.normal(size=(3, 4, 4))
    covs = a @ a.transpose(0, 2, 1) + np.eye(4)
    w = np.array([0.2, 0.3, 0.5])
    gmm = GaussianMixture(torch.as_tensor(locs), torch.as_tensor(covs), torch.as_tensor(w))
    x = rng.normal(size=(10, 4))
    expected = np.log(sum(wk * stats.multivariate_normal(m, c).pdf(x)
                          for wk, m, c in zip(w, locs, covs, strict=True)))
    np.testing.assert_allclose(gmm.log_prob(torch.as_tensor(x)).numpy(), expected, rtol=1e-10)
    draws = gmm.sample((40000,)).numpy()
    mean = (w[:, None] * locs).sum(0)
    se = draws.std(0) / math.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(0) - mean) < 4.5 * se)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GaussianMixture(torch.zeros(3), torch.eye(3)), "locs must have shape"),
        (lambda: GaussianMixture(torch.zeros(2, 3), torch.eye(3)), "covariances must have"),
        (lambda: GaussianMixture(torch.zeros(2, 1), torch.ones(2, 1, 1), -torch.ones(2)),
         "weights must be positive"),
        (lambda: Funnel(1), "dim must be >= 2"),
        (lambda: CorrelatedGaussian(3, -0.6), "rho must lie in"),
        (lambda: TwoMoons(0.0), "noise must be > 0"),
        (lambda: target_model("banana"), "target must be a torch Distribution"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_target_model_posterior_is_target():
    target = TARGETS["rings"]()
    trace = poutine.trace(target_model(target)).get_trace()
    assert trace.nodes["x"]["fn"] is target
    torch.testing.assert_close(trace.log_prob_sum(), target.log_prob(trace.nodes["x"]["value"]))


def _log_joint_on_grid(case, site, grid):
    """``log p(data, z)`` at each grid value of the one latent site, from the model's own trace."""
    model = poutine.condition(case.model, {site: grid[:, None]})
    trace = poutine.trace(model).get_trace(*case.args, **case.kwargs)
    trace.compute_log_prob()
    sites = [n for n in trace.nodes.values() if "log_prob" in n and not site_is_subsample(n)]
    return sum(node["log_prob"].reshape(len(grid), -1).sum(-1) for node in sites)


@pytest.mark.parametrize("name", sorted(CONJUGATE_MODELS))
def test_conjugate_posterior_and_evidence(name):
    torch.set_default_dtype(torch.float64)
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
    nodes = torch.as_tensor((edges[:-1, None] + half * (x + 1)).ravel())
    log_w = torch.as_tensor(np.log((half * w).ravel()))
    log_joint = _log_joint_on_grid(case, site, nodes)
    log_evidence = float(torch.logsumexp(log_joint + log_w, 0))
    assert log_evidence == pytest.approx(case.log_evidence, abs=1e-8)
    post = (log_joint - log_evidence).exp()
    torch.testing.assert_close(post, posterior.log_prob(nodes).exp(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_model_takes_an_svi_step(name):
    """``target_model`` is a model an autoguide fits, with vectorized particles."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    model = target_model(TARGETS[name]())
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), elbo)
    assert math.isfinite(svi.step())
