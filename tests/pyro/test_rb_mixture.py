"""RBMixture_ELBO (Pyro): unbiased and lower-variance gradients, model plumbing, errors."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.optim import Adam

from pyro_mixvi.distributions.cwm import ClassifierWeightedMixture, init_classifier_params
from pyro_mixvi.elbos.rb_mixture import RBMixture_ELBO, rb_mixture_elbo
from pyro_mixvi.guides.base import FiniteMixture, path_log_prob, unconstrained_log_joint
from pyro_mixvi.guides.cwm import WEIGHT_STEP_SCALE, AutoCWM
from tests.properties import assert_close_in_mc_error

LOG_Z = -5.0  # an unnormalized target, as in VI (log evidence is never 0 in practice)


def target_log_prob_1d(x, log_z=LOG_Z):
    """Unnormalized bimodal 1-D target: 0.3 N(-2, 0.5) + 0.7 N(1.5, 1), times e^log_z."""
    comps = torch.stack([math.log(0.3) + dist.Normal(-2.0, 0.5).log_prob(x),
                         math.log(0.7) + dist.Normal(1.5, 1.0).log_prob(x)], -1)
    return comps.logsumexp(-1) + log_z


def leaves_1d(seed=0):
    """Parameters of a 1-D CWM (K=3, one hidden layer) with a non-trivial classifier."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    torch.manual_seed(seed)
    layers = init_classifier_params(1, 3, (6,), torch.zeros(1))
    layers[-1] = (rand(6, 3), rand(3))
    layers = [(w.to(dtype), b.to(dtype)) for w, b in layers]
    return [rand(3, 1), (0.3 * rand(3, 1)).exp() * 0.8, 0.5 * rand(3)] + [
        t for layer in layers for t in layer]


def cwm_from(leaves):
    locs, scale, logits, *flat = leaves
    layers = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    return ClassifierWeightedMixture(locs, scale=scale, logits=logits, classifier_params=layers)


def flat_grad(value, leaves):
    grads = torch.autograd.grad(value, leaves, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


def exact_elbo_gradient(leaves):
    """Gradient of the ELBO by midpoint quadrature on [-15, 15] (20000 cells; error < 1e-6)."""
    grid = torch.linspace(-15, 15, 20001, dtype=leaves[0].dtype)
    mid = (0.5 * (grid[1:] + grid[:-1]))[:, None]
    log_q = cwm_from(leaves).log_prob(mid)
    elbo = (log_q.exp() * (target_log_prob_1d(mid[:, 0]) - log_q)).sum() * (grid[1] - grid[0])
    return flat_grad(elbo, leaves)


def rb_gradient(leaves, num_particles, *, sticking_the_landing=False):
    cwm = cwm_from(leaves)
    x, log_weights = cwm.rsample_components((num_particles,))
    log_q = path_log_prob(cwm, x) if sticking_the_landing else cwm.log_prob(x)
    terms = rb_mixture_elbo(target_log_prob_1d(x[..., 0]), log_q, log_weights)
    return flat_grad(terms.mean(), leaves)


def score_function_gradient(leaves, num_samples):
    """The score-function (REINFORCE) gradient from ``num_samples`` ancestral draws."""
    cwm = cwm_from(leaves)
    x = cwm.sample((num_samples,))
    log_q = cwm.log_prob(x)
    f = (target_log_prob_1d(x[..., 0]) - log_q).detach()
    return flat_grad((log_q * f).mean(), leaves)


def test_rb_gradient_is_unbiased(dtype):
    leaves = [t.requires_grad_() for t in leaves_1d()]
    exact = exact_elbo_gradient(leaves).double().numpy()
    estimates = np.stack([rb_gradient(leaves, 8).double().numpy() for _ in range(400)])
    # 400 i.i.d. estimates per coordinate: the mean is within 4.5 standard errors of the exact
    # gradient (about 40 coordinates, so a false alarm has probability < 3e-4).
    assert_close_in_mc_error(estimates, exact, num_sd=4.5)


def test_sticking_the_landing_gradient_is_unbiased(dtype):
    """Dropping grad_theta log q at fixed x keeps the RB gradient unbiased (E_q of it is 0)."""
    leaves = [t.requires_grad_() for t in leaves_1d()]
    exact = exact_elbo_gradient(leaves).double().numpy()
    estimates = np.stack([rb_gradient(leaves, 8, sticking_the_landing=True).double().numpy()
                          for _ in range(400)])
    # same budget and false-alarm rate as test_rb_gradient_is_unbiased.
    assert_close_in_mc_error(estimates, exact, num_sd=4.5)


def test_sticking_the_landing_has_zero_gradient_at_the_exact_posterior():
    """When the target is q itself, every particle's STL gradient is 0; the plain one is not."""
    torch.set_default_dtype(torch.float64)
    leaves = [t.requires_grad_() for t in leaves_1d()]
    cwm = cwm_from(leaves)
    x, log_weights = cwm.rsample_components((4,))
    log_p = cwm_from([t.detach() for t in leaves]).log_prob(x)  # target = q, fixed parameters
    stl = flat_grad(rb_mixture_elbo(log_p, path_log_prob(cwm, x), log_weights).sum(), leaves)
    plain = flat_grad(rb_mixture_elbo(log_p, cwm.log_prob(x), log_weights).sum(), leaves)
    torch.testing.assert_close(stl, torch.zeros_like(stl), atol=1e-9, rtol=0)
    assert plain.abs().max() > 1e-3  # the score term grad log q(x) is not 0 per particle


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rb_gradient_has_lower_variance_than_score_function(dtype, seed):
    """Equal model evaluations: one RB particle (K points) vs K ancestral score-function draws.

    The score function's variance grows with (log p - log q)^2, hence with (log Z)^2, while the
    RB gradient does not depend on log Z (next test). At log Z = 0 the two are comparable
    (total-variance ratios 0.65-2.0 over five random parameter draws); at log Z = -5 RB wins.
    """
    leaves = [t.requires_grad_() for t in leaves_1d(seed)]
    k = 3
    rb = np.stack([rb_gradient(leaves, 1).double().numpy() for _ in range(200)])
    sf = np.stack([score_function_gradient(leaves, k).double().numpy() for _ in range(200)])
    # total variance from 200 draws has a relative sd of about sqrt(2/200) = 10% (more for the
    # heavy-tailed score function); observed ratios are 0.1-0.3, far below 1.
    ratio = rb.var(0).sum() / sf.var(0).sum()
    assert ratio < 0.6, ratio


def test_rb_gradient_does_not_depend_on_log_z():
    """``sum_k grad w_k = 0``, so adding a constant to log p leaves the RB gradient unchanged."""
    torch.set_default_dtype(torch.float64)
    leaves = [t.requires_grad_() for t in leaves_1d()]
    cwm = cwm_from(leaves)
    x, log_weights = cwm.rsample_components((4,))
    log_q = cwm.log_prob(x)
    grads = [flat_grad(rb_mixture_elbo(target_log_prob_1d(x[..., 0], log_z), log_q, log_weights)
                       .mean(), leaves) for log_z in (0.0, 50.0)]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=1e-9)


def test_exact_guide_gives_log_evidence_with_zero_variance(dtype):
    """When q equals the posterior, every RB particle equals log Z (constrained site included)."""
    loc_x, scale_x = torch.tensor([[-1.0, 0.5], [2.0, -1.0]]), torch.tensor([[0.6, 0.9],
                                                                               [0.4, 0.7]])
    logits_x, logits_s = torch.tensor([0.2, -0.3]), torch.tensor([-0.5, 0.4])
    loc_s, scale_s = torch.tensor([-0.5, 1.0]), torch.tensor([0.3, 0.5])

    mix_x = dist.MixtureSameFamily(dist.Categorical(logits=logits_x),
                                   dist.Normal(loc_x, scale_x).to_event(1))
    mix_s = dist.MixtureSameFamily(dist.Categorical(logits=logits_s), dist.Normal(loc_s, scale_s))
    wide = dist.Normal(0.0, 10.0)

    def model():  # posterior: x ~ mix_x and log(s) ~ mix_s, independent; evidence e^1.3
        x = pyro.sample("x", wide.expand([2]).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 10.0))
        pyro.factor("x_factor", mix_x.log_prob(x) - wide.log_prob(x).sum(-1))
        pyro.factor("s_factor", mix_s.log_prob(s.log()) - wide.log_prob(s.log()))
        pyro.factor("log_z", torch.tensor(1.3))

    guide = AutoCWM(model, num_components=4, hidden_dims=None)
    guide()
    pairs = [(i, j) for i in range(2) for j in range(2)]  # product of two 2-mixtures
    with torch.no_grad():
        guide.locs.copy_(torch.stack([torch.cat([loc_x[i], loc_s[j:j + 1]]) for i, j in pairs]))
        guide.scales = torch.stack([torch.cat([scale_x[i], scale_s[j:j + 1]]) for i, j in pairs])
        guide.logits.copy_(torch.stack([logits_x.log_softmax(0)[i] + logits_s.log_softmax(0)[j]
                                        for i, j in pairs]) / WEIGHT_STEP_SCALE)  # stored scaled
    elbo = RBMixture_ELBO(num_particles=16)
    posterior = guide.get_posterior()
    x, log_w = posterior.rsample_components((16,))
    log_p = unconstrained_log_joint(model, guide, x.reshape(-1, 3), (), {},
                                    max_plate_nesting=0).reshape(16, 4)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(log_p - posterior.log_prob(x), torch.full((16, 4), 1.3),
                               atol=tol, rtol=0)
    assert abs(elbo.loss(model, guide) + 1.3) < tol


def test_unconstrained_log_joint_matches_manual_computation(dtype):
    """Plates, observed sites, subsample scaling and the Jacobian of a constrained site."""
    data = torch.randn(10)

    def model():
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("groups", 2):
            loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
        with pyro.plate("data", 10, subsample_size=5) as idx:
            pyro.sample("obs", dist.Normal(loc.sum(-1, keepdim=True), scale), obs=data[idx])

    guide = AutoCWM(model, num_components=2)
    guide()
    latent = torch.randn(7, 3)
    pyro.set_rng_seed(3)
    log_p = unconstrained_log_joint(model, guide, latent, (), {}, max_plate_nesting=1)
    pyro.set_rng_seed(3)
    idx = torch.randperm(10)[:5]
    log_scale, loc = latent[:, 0], latent[:, 1:]
    scale = log_scale.exp()
    manual = (dist.LogNormal(0.0, 1.0).log_prob(scale) + log_scale  # Jacobian of exp
              + dist.Normal(0.0, 2.0).log_prob(loc).sum(-1)
              + 2.0 * dist.Normal(loc.sum(-1, keepdim=True), scale[:, None])
              .log_prob(data[idx]).sum(-1))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(log_p, manual, atol=tol, rtol=tol)


def test_num_particles_and_svi_step_lower_the_loss(dtype):
    def model():
        pyro.sample("x", dist.Normal(torch.tensor([3.0, -2.0]), torch.tensor([1.0, 0.5]))
                    .to_event(1))

    guide = AutoCWM(model, num_components=3, init_scale=0.1)  # starts > 1 nat from exact
    svi = SVI(model, guide, Adam({"lr": 5e-2}), RBMixture_ELBO(num_particles=8))
    first = np.mean([svi.evaluate_loss() for _ in range(5)])
    for _ in range(200):
        svi.step()
    last = np.mean([svi.evaluate_loss() for _ in range(5)])
    assert last < first - 1.0 and abs(last) < 0.2  # exact posterior reachable: loss -> 0
    assert isinstance(guide.get_posterior(), FiniteMixture)


def test_bad_guides_and_arguments_raise():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="num_particles"):
        RBMixture_ELBO(num_particles=0)
    with pytest.raises(TypeError, match="AutoContinuous"):
        RBMixture_ELBO().loss(model, AutoNormal(model))
    with pytest.raises(TypeError, match="rsample_components"):
        RBMixture_ELBO().loss(model, AutoDiagonalNormal(model))
