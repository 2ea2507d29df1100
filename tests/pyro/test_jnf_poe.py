"""Product-of-experts math and its NUTS sampler (pyro_mixvi.multimodal.poe)."""

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from pyro_mixvi.multimodal import JNF, gaussian_product_of_experts, product_of_experts_log_prob
from pyro_mixvi.multimodal.poe import sample_product_of_experts
from tests.jnf_oracles import LinearGaussian
from tests.properties import assert_samples_match_density_2d, grid_2d


def _mvn(mean, cov):
    return MultivariateNormal(torch.as_tensor(mean), torch.as_tensor(cov))


def _exact_experts(oracle, xs, subset):
    """The exact unimodal posteriors p(z|x_j) of the linear-Gaussian oracle, as torch MVNs."""
    return [_mvn(*oracle.posterior([j], xs)) for j in subset]


@pytest.mark.parametrize("subset", [(0, 1), (0, 1, 2), (0, 2, 3), (0, 1, 2, 3)])
def test_prior_power_is_subset_size_minus_one(dtype, subset):
    # PoE of exact conditionals / p(z)^(|S|-1) is the exact joint: log ratio constant in z.
    rng = np.random.default_rng(1)
    oracle = LinearGaussian.make(rng, 2, [3, 4, 2, 3], diagonal=False)
    _, xs = oracle.sample(rng, 1)
    z = torch.as_tensor(rng.normal(size=(50, 1, 2)), dtype=dtype)
    experts = [e.log_prob(z.double()) for e in _exact_experts(oracle, xs, subset)]
    prior = Normal(0.0, 1.0).log_prob(z.double()).sum(-1)
    exact = _mvn(*oracle.posterior(subset, xs)).log_prob(z.double())
    ratio = product_of_experts_log_prob(experts, prior) - exact
    assert ratio.std() < 1e-8
    # MultiVae main's rule (divide once) is wrong as soon as |S| > 2.
    wrong = sum(experts) - prior - exact
    if len(subset) > 2:
        assert wrong.std() > 0.1
    else:
        assert wrong.std() < 1e-8


def test_jnf_log_prob_uses_power_subset_minus_one(dtype):
    # Pin the JNF class itself: with exact unimodal experts plugged in, its subset density is the
    # exact joint posterior up to a constant, for a 3-modality subset.
    rng = np.random.default_rng(2)
    oracle = LinearGaussian.make(rng, 2, [3, 3, 3], diagonal=False)
    _, xs = oracle.sample(rng, 4)
    jnf = JNF([3, 3, 3], latent_dim=2)

    class Exact(torch.nn.Module):
        def __init__(self, j):
            super().__init__()
            self.j = j

        def forward(self, x):
            mean, cov = oracle.posterior([self.j], [x.double().numpy()] * 3)
            return _mvn(mean, cov)

    jnf.context_nets = torch.nn.ModuleList(torch.nn.Identity() for _ in range(3))
    jnf.flows = torch.nn.ModuleList(Exact(j) for j in range(3))
    observed = [torch.as_tensor(x, dtype=dtype) for x in xs]
    z = torch.as_tensor(rng.normal(size=(30, 4, 2)))
    ratio = jnf.log_prob(z, observed) - _mvn(*oracle.posterior([0, 1, 2], xs)).log_prob(z)
    assert (ratio.std(0) < 1e-6).all()


def test_gaussian_product_of_experts_closed_form(dtype):
    # Diagonal experts: the JNF rule (prior_power = -(|S|-1)) on exact conditionals is the joint.
    rng = np.random.default_rng(3)
    oracle = LinearGaussian.make(rng, 3, [4, 5, 3], diagonal=True)
    _, xs = oracle.sample(rng, 6)
    locs, scales = [], []
    for j in range(3):
        mean, cov = oracle.posterior([j], xs)
        locs.append(torch.as_tensor(mean, dtype=dtype))
        scales.append(torch.as_tensor(np.sqrt(np.diag(cov)), dtype=dtype).expand(6, 3))
    loc, scale = gaussian_product_of_experts(locs, scales, prior_power=-2.0)
    mean, cov = oracle.posterior([0, 1, 2], xs)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert np.allclose(loc.numpy(), mean, atol=tol)
    assert np.allclose(scale.numpy(), np.sqrt(np.diag(cov)), atol=tol)
    assert loc.dtype == dtype


def test_gaussian_product_of_experts_errors():
    one = torch.ones(2)
    with pytest.raises(ValueError, match="equal length"):
        gaussian_product_of_experts([one], [], prior_power=1.0)
    with pytest.raises(ValueError, match="not normalizable"):
        gaussian_product_of_experts([one, one], [one * 2, one * 2], prior_power=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        product_of_experts_log_prob([], one)


def _target(z, shifts):
    """Two observations b: a Gaussian-mixture expert shifted by shifts[b], times a Gaussian
    expert, divided once by the N(0, I) prior (|S| = 2). Maps (..., B, 2) to (..., B)."""
    z = z - shifts
    cov_a = z.new_tensor([[0.4, 0.15], [0.15, 0.3]])
    cov_b = z.new_tensor([[0.3, -0.1], [-0.1, 0.5]])
    a = MultivariateNormal(z.new_tensor([-1.0, 0.5]), cov_a).log_prob(z) + np.log(0.4)
    b = MultivariateNormal(z.new_tensor([1.2, -0.3]), cov_b).log_prob(z) + np.log(0.6)
    mixture = torch.logaddexp(a, b)
    gaussian = MultivariateNormal(z.new_tensor([0.3, 0.0]), 2.0 * torch.eye(2, dtype=z.dtype))
    prior = Normal(z.new_zeros(()), z.new_ones(())).log_prob(z + shifts).sum(-1)
    return product_of_experts_log_prob([mixture, gaussian.log_prob(z)], prior)


@pytest.mark.parametrize(
    "num_samples", [400, pytest.param(2400, marks=pytest.mark.slow)], ids=["fast", "long"]
)
def test_nuts_draws_from_the_product_of_experts(dtype, num_samples):
    # Batched NUTS over B = 2 observations against 2-D quadrature of each PoE density. Draws are
    # thinned by 4 so that a chi-square test on 10x10 bins, which assumes independence, applies.
    shifts = torch.tensor([[0.0, 0.0], [0.8, -0.6]], dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    draws = sample_product_of_experts(
        lambda z: _target(z, shifts),
        torch.zeros(2, 2, dtype=dtype),
        num_samples=num_samples,
        num_warmup=150,
        generator=generator,
    )
    assert draws.shape == (num_samples, 2, 2) and draws.dtype == dtype
    kept = num_samples // 4
    bounds = (-4.0, 4.0, -4.0, 4.0)
    for b in range(2):

        def log_prob(points, b=b):
            z = torch.as_tensor(points, dtype=torch.float64)[:, None, :].expand(-1, 2, 2)
            return _target(z, shifts.double())[:, b].numpy()

        assert_samples_match_density_2d(draws[::4, b].double().numpy(), log_prob, bounds, bins=10)
        # Mean against quadrature; the MC error of `kept` near-independent draws is
        # ~sd/sqrt(kept), so 5 standard errors bounds it.
        points, area = grid_2d(bounds, 200)
        weights = np.exp(log_prob(points)) * area
        weights /= weights.sum()
        mean = weights @ points
        sd = np.sqrt(weights @ (points - mean) ** 2)
        error = np.abs(draws[::4, b].double().numpy().mean(0) - mean)
        assert (error < 5 * sd / np.sqrt(kept)).all(), (error, sd)


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        sample_product_of_experts(lambda z: z.sum(-1), torch.zeros(3))
    with pytest.raises(ValueError, match="num_samples"):
        sample_product_of_experts(lambda z: z.sum(-1), torch.zeros(1, 2), num_samples=0)
