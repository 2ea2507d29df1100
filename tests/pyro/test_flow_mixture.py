"""FlowMixture (torch): exact mixture density and sampling, EMA weights, diverging experts."""

import math

import pytest
import torch
from torch.distributions import Distribution, Independent, Normal, constraints

from pyro_mixvi.distributions.flow_mixture import (
    FlowMixture,
    ema_weights_init,
    ema_weights_step,
    fit_weights,
)
from tests.properties import assert_normalized_2d, assert_samples_match_density_2d


def _gaussian(loc, scale):
    loc = torch.as_tensor(loc, dtype=torch.get_default_dtype())
    return lambda: Independent(Normal(loc, torch.full_like(loc, scale)), 1)


class _Broken(Distribution):
    """An expert gone wrong: NaN (e.g. NaN parameters) or -inf log-likelihood everywhere."""

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, dim, value):
        super().__init__(torch.Size(), torch.Size([dim]), validate_args=False)
        self.value = value

    def log_prob(self, x):
        return x.sum(-1) * 0.0 + self.value


@pytest.fixture
def small_mixture(dtype):
    """A 2-D mixture of a fitted RBIG, and randomly initialized MAF and RealNVP."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=gen)
    x[:, 1] += 0.5 * x[:, 0] ** 2
    return FlowMixture.fit(
        x, num_steps=30, num_weight_steps=5, weight_batch_size=200, generator=gen,
        expert_kwargs={"maf": {"num_transforms": 2, "hidden_dims": (16,)},
                       "realnvp": {"num_transforms": 2, "hidden_dims": (16,)},
                       "rbig": {"max_layers": 3, "num_knots": 40}},
        progress_bar=False,
    )


def test_integrates_to_one_and_samples_match(small_mixture, dtype):
    mixture = small_mixture
    assert mixture.weights.dtype == dtype and torch.isclose(mixture.weights.sum(), torch.ones(()))
    with torch.no_grad():
        log_prob = lambda pts: mixture.log_prob(torch.as_tensor(pts, dtype=dtype)).numpy()
        # Midpoint rule, 300^2 cells of 0.1 on a box > 5 sd of every expert's widest tail.
        assert_normalized_2d(log_prob, (-15, 15, -13, 17), num=300, atol=0.02)
        x = mixture.sample((3000,))
        # Chi-square of 3000 draws against the density on a 12x12 grid, alpha = 1e-3.
        assert_samples_match_density_2d(x.numpy(), log_prob, (-4, 4, -3, 6))


def test_fused_and_shapes(small_mixture, dtype):
    x, log_q = small_mixture.rsample_and_log_prob((2, 5))
    assert x.shape == (2, 5, 2) and log_q.shape == (2, 5) and x.dtype == dtype
    assert torch.allclose(small_mixture.log_prob(x), log_q)
    assert small_mixture.component_log_probs(x).shape == (2, 5, 3)
    assert 1.0 <= small_mixture.n_eff.item() <= 3.0


def test_ema_converges_to_softmax_of_negative_cross_entropy(dtype):
    """Data N(0, 1); experts N(0, 1) and N(0, 2^2): pi -> softmax(-CE), not ML weights."""
    gen = torch.Generator().manual_seed(1)
    experts = [_gaussian([0.0], 1.0), _gaussian([0.0], 2.0)]
    ce = torch.tensor([0.5 * math.log(2 * math.pi) + 0.5,
                       0.5 * math.log(2 * math.pi * 4) + 1 / 8])
    expected = torch.softmax(-ce, 0)
    batches = lambda: torch.randn(2000, 1, generator=gen)
    weights = fit_weights(experts, batches, num_steps=150, progress_bar=False)
    # After 150 steps 0.9^150 ~ 1e-7 of the uniform start remains; the EMA averages ~19 batch
    # softmaxes whose sd (from the batch-mean sd ~0.02 nats) is ~0.005: 0.01 is > 3 sd.
    assert torch.allclose(weights, expected.to(dtype), atol=0.01), (weights, expected)


def test_responsibility_variant_finds_ml_weights(dtype):
    """Data 0.3 N(-5, 1) + 0.7 N(5, 1) with exact experts: EM weights (0.3, 0.7); EMA ~(0, 1)."""
    gen = torch.Generator().manual_seed(2)
    experts = [_gaussian([-5.0], 1.0), _gaussian([5.0], 1.0)]

    def batches():
        left = torch.rand(2000, 1, generator=gen) < 0.3
        return torch.randn(2000, 1, generator=gen) + torch.where(left, -5.0, 5.0)

    ml = fit_weights(experts, batches, num_steps=150, weight_update="responsibility",
                     progress_bar=False)
    # Binomial sd of a 2000-point share is 0.01, averaged over ~19 batches by the EMA: 0.02 tol.
    assert torch.allclose(ml, torch.tensor([0.3, 0.7]), atol=0.02), ml
    paper = fit_weights(experts, batches, num_steps=150, progress_bar=False)
    assert paper[0] < 1e-6  # exp(-CE) gap is ~35 nats


@pytest.mark.parametrize("bad", [math.nan, -math.inf], ids=["nan", "-inf"])
@pytest.mark.parametrize("weight_update", ["ema", "responsibility"])
def test_diverging_expert_gets_zero_weight_without_nan(weight_update, bad, dtype):
    gen = torch.Generator().manual_seed(3)
    experts = [_gaussian([0.0, 0.0], 1.0), lambda: _Broken(2, bad), _gaussian([0.0, 0.0], 1.5)]
    batches = lambda: torch.randn(500, 2, generator=gen)
    weights = fit_weights(experts, batches, num_steps=200, weight_update=weight_update,
                          progress_bar=False)
    assert torch.isfinite(weights).all()
    # NaN: switched off exactly; -inf: decays as 0.9^200 ~ 7e-10.
    assert weights[1] < 1e-8 and torch.isclose(weights.sum(), torch.ones(()))
    mixture = FlowMixture(experts, weights)
    assert torch.isfinite(mixture.log_prob(torch.zeros(3, 2))).all()
    assert mixture.n_eff.item() < 2.0 + 1e-6


def test_stage1_diverging_expert_is_downweighted(dtype):
    """A factory expert whose training blows up: warned, frozen, and weighted ~0 by stage 2."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 2, generator=gen)

    class Exploding(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.log_scale = torch.nn.Parameter(torch.full((dim,), -800.0))  # scale underflows to 0

        def forward(self):
            scale = self.log_scale.exp()
            return Independent(Normal(torch.zeros_like(scale), scale, validate_args=False), 1)

    with pytest.warns(RuntimeWarning, match="expert 1: non-finite"):
        mixture = FlowMixture.fit(
            x, experts=["rbig", Exploding], num_steps=5, num_weight_steps=50, generator=gen,
            expert_kwargs={"rbig": {"max_layers": 2}}, progress_bar=False,
        )
    assert torch.isfinite(mixture.weights).all() and mixture.weights[1] < 1e-2
    assert torch.isfinite(mixture.log_prob(x)).all()


def test_bad_arguments():
    state = ema_weights_init(2)
    with pytest.raises(ValueError, match="beta"):
        ema_weights_step(state, torch.zeros(2, 3), beta=1.0)
    with pytest.raises(ValueError, match="weight_update"):
        ema_weights_step(state, torch.zeros(2, 3), weight_update="em")
    with pytest.raises(FloatingPointError, match="every expert"):
        ema_weights_step(state, torch.full((2, 3), math.nan))
    with pytest.raises(ValueError, match="num_experts"):
        ema_weights_init(0)
    with pytest.raises(ValueError, match="experts entries"):
        FlowMixture.fit(torch.randn(20, 2), experts=["nsf"], progress_bar=False)
    with pytest.raises(ValueError, match="samples"):
        FlowMixture.fit(torch.full((20, 2), math.inf), progress_bar=False)
    with pytest.raises(ValueError, match="weights must have shape"):
        FlowMixture([_gaussian([0.0], 1.0)], torch.ones(2))
