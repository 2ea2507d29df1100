"""AutoSIVI and SIVI_ELBO (Pyro): autoguide contract, path gradient, errors."""

import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam

from pyro_mixvi._sivi import SPREAD_INIT_DRAWS, ConditionalNormalGenerator
from pyro_mixvi.elbos.sivi import SIVI_ELBO
from pyro_mixvi.guides.sivi import AutoSIVI


def constrained_model():
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    with pyro.plate("n", 3):
        pyro.sample("w", dist.Normal(loc, scale))


@pytest.mark.parametrize("proposal", ["flow", "prior"])
def test_sampling_predictive_and_particle_dims(dtype, proposal):
    guide = AutoSIVI(constrained_model, mixing_dim=2, proposal=proposal, hidden_dims=(16,))
    draws = guide()
    assert draws["scale"] > 0 and draws["w"].shape == (3,) and draws["w"].dtype == dtype
    posterior = guide.get_posterior()
    assert posterior.sample((4, 5)).shape == (4, 5, 5)
    assert posterior.log_prob(torch.zeros(7, 5)).shape == (7,)
    samples = Predictive(constrained_model, guide=guide, num_samples=11)()
    assert samples["w"].shape == (11, 3) and bool((samples["scale"] > 0).all())
    elbo = SIVI_ELBO(num_particles=6, vectorize_particles=True, num_importance_samples=8)
    loss = elbo.loss(constrained_model, guide)
    assert math.isfinite(loss)
    median = guide.median()
    quantiles = guide.quantiles([0.25, 0.75])
    assert median["w"].shape == (3,) and quantiles["w"].shape == (2, 3)
    assert bool((quantiles["w"][0] <= quantiles["w"][1]).all())


def test_save_load_round_trip(dtype):
    guide = AutoSIVI(constrained_model, mixing_dim=2, hidden_dims=(8,))
    svi = SVI(constrained_model, guide, Adam({"lr": 1e-2}), SIVI_ELBO(num_importance_samples=4))
    for _ in range(3):
        svi.step()
    buffer = io.BytesIO()
    torch.save(guide.state_dict(), buffer)
    fresh = AutoSIVI(constrained_model, mixing_dim=2, hidden_dims=(8,))
    fresh()  # build the parameters lazily, then load
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    pyro.set_rng_seed(3)
    a = guide.get_posterior().sample((5,))
    pyro.set_rng_seed(3)
    b = fresh.get_posterior().sample((5,))
    torch.testing.assert_close(a, b)


def test_every_parameter_gets_a_gradient_and_loss_is_honest(dtype):
    guide = AutoSIVI(constrained_model, mixing_dim=2, hidden_dims=(8,))
    svi = SVI(constrained_model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step()  # first step moves the zero-initialized output layer off zero
    elbo = SIVI_ELBO(num_particles=4, num_importance_samples=8)
    loss = elbo.differentiable_loss(constrained_model, guide)
    loss.backward()
    for name, param in guide.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name
    # The reported value is -(log p - log q_hat), not a surrogate: recompute it from a trace.
    pyro.set_rng_seed(5)
    reported = SIVI_ELBO(num_importance_samples=8).loss(constrained_model, guide)
    pyro.set_rng_seed(5)
    guide_trace = pyro.poutine.trace(guide).get_trace()
    model_trace = pyro.poutine.trace(
        pyro.poutine.replay(constrained_model, trace=guide_trace)
    ).get_trace()
    latent = guide_trace.nodes["_AutoSIVI_latent"]
    log_q = latent["fn"].log_prob(latent["value"].detach())
    jac = sum(s["fn"].log_prob(s["value"]) for n, s in guide_trace.nodes.items()
              if s["type"] == "sample" and n != "_AutoSIVI_latent").sum()
    expected = -(model_trace.log_prob_sum() - jac - log_q).item()
    # Same draws except the k importance draws, which are fresh: agree within the IS spread.
    assert abs(reported - expected) < 1.0


def gaussian_setup(dtype):
    """Gaussian target and an affine AutoSIVI: the exact ELBO and its gradient are closed form."""
    target_loc = torch.tensor([0.5, -1.0])
    target_cov = torch.tensor([[1.0, 0.6], [0.6, 2.0]])

    def model():
        pyro.sample("x", dist.MultivariateNormal(target_loc, target_cov))

    guide = AutoSIVI(model, mixing_dim=2, hidden_dims=(), proposal="prior", init_scale=0.7)
    guide()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        matrix = torch.randn(2, 2, generator=gen)
        guide.generator.net[0].weight.copy_(matrix / guide.generator.output_multiplier)
        guide.generator.loc.copy_(torch.randn(2, generator=gen))
    return model, guide, dist.MultivariateNormal(target_loc, target_cov)


def exact_elbo(guide, target):
    # mu(eps) = loc + (W eps + b) * output_multiplier for the affine generator.
    multiplier = guide.generator.output_multiplier
    weight = guide.generator.net[0].weight * multiplier
    sigma = torch.nn.functional.softplus(guide.generator.raw_scale)
    cov = weight @ weight.T + torch.diag(sigma**2)
    q = dist.MultivariateNormal(guide.generator.loc + guide.generator.net[0].bias * multiplier, cov)
    # E_q log p for Gaussians + entropy of q.
    prec = target.precision_matrix
    diff = q.loc - target.loc
    e_log_p = (-0.5 * (torch.trace(prec @ cov) + diff @ prec @ diff)
               - 0.5 * torch.logdet(2 * math.pi * target.covariance_matrix))
    return e_log_p + q.entropy()


def test_path_gradient_is_unbiased_against_closed_form(dtype):
    model, guide, target = gaussian_setup(dtype)
    params = dict(guide.named_parameters())
    exact = torch.autograd.grad(-exact_elbo(guide, target), list(params.values()))
    elbo = SIVI_ELBO(num_particles=1000, vectorize_particles=True, num_importance_samples=2048)
    reps = []
    for _ in range(12):
        loss = elbo.differentiable_loss(model, guide)
        grads = torch.autograd.grad(loss, list(params.values()))
        reps.append(torch.cat([g.flatten() for g in grads]))
    reps = torch.stack(reps).double()
    truth = torch.cat([g.flatten() for g in exact]).double()
    mean, stderr = reps.mean(0), reps.std(0) / math.sqrt(len(reps))
    # Unbiased up to the O(1/k) bias of self-normalized IS (BSIVI puts the draw's own eps
    # among the k): at k = 2048 it is below the MC error of 12 x 1000 particles; 5 s.e. + 1e-3.
    assert torch.all((mean - truth).abs() <= 5 * stderr + 1e-3), (mean, truth, stderr)


def test_trace_elbo_trains_the_flow_proposal(dtype):
    # A stock ELBO differentiates score_parts: the guide gets the path gradient, and the flow
    # proposal gets the forward-KL gradient in the same step.
    guide = AutoSIVI(constrained_model, mixing_dim=2, hidden_dims=(8,))
    guide()
    loss = Trace_ELBO(num_particles=3).differentiable_loss(constrained_model, guide)
    loss.backward()
    grads = [p.grad for p in guide.proposal_flow.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_prior_override_skips_the_flow(dtype):
    guide = AutoSIVI(constrained_model, mixing_dim=2, hidden_dims=(8,))
    guide()
    loss = SIVI_ELBO(proposal="prior").differentiable_loss(constrained_model, guide)
    loss.backward()
    assert all(p.grad is None for p in guide.proposal_flow.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mixing_dim": 0}, "mixing_dim must be an integer >= 1"),
        ({"num_importance_samples": 0}, "num_importance_samples must be an integer >= 1"),
        ({"proposal": "mcmc"}, "proposal must be one of"),
        ({"init_scale": 0.0}, "init_scale must be > 0"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"proposal_batch_size": 0}, "proposal_batch_size must be an integer >= 1"),
        ({"init_mixing_fraction": 1.0}, "init_mixing_fraction must be in"),
    ],
)
def test_bad_guide_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoSIVI(constrained_model, **kwargs)


def test_bad_elbo_options_and_guides_raise():
    with pytest.raises(ValueError, match="num_importance_samples must be an integer >= 1"):
        SIVI_ELBO(num_importance_samples=0)
    with pytest.raises(ValueError, match="proposal must be one of"):
        SIVI_ELBO(proposal="mcmc")
    with pytest.raises(TypeError, match="SIVI_ELBO needs an AutoSIVI guide"):
        SIVI_ELBO().loss(constrained_model, AutoNormal(constrained_model))
    guide = AutoSIVI(constrained_model, proposal="prior")
    with pytest.raises(ValueError, match="needs a guide built with"):
        SIVI_ELBO(proposal="flow").loss(constrained_model, guide)


def test_discrete_and_empty_models_raise():
    def discrete():
        pyro.sample("c", dist.Bernoulli(0.5))

    def empty():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ValueError, match="discrete sample site 'c'"):
        AutoSIVI(discrete)()
    with pytest.raises(RuntimeError, match="no latent variables"):
        AutoSIVI(empty)()


def test_hidden_layers_take_adam_steps_relative_to_their_size(dtype):
    # Adam's first step moves every stored parameter by lr * sign(grad) (|grad| >> its eps);
    # hidden layers store weight / multiplier, so an effective weight moves by
    # lr * multiplier = lr / sqrt(fan_in): lr relative to torch's init size, at any width.
    torch.manual_seed(0)
    generator = ConditionalNormalGenerator(3, torch.zeros(2), (50, 40), init_scale=0.5,
                                           init_mixing_fraction=0.5)
    layers = [generator.net[0], generator.net[2]]
    before = [(layer.weight * layer.multiplier).detach().clone() for layer in layers]
    for layer, effective in zip(layers, before, strict=True):
        assert layer.multiplier == pytest.approx(1 / math.sqrt(layer.in_features))
        assert effective.abs().max() <= 1 / math.sqrt(layer.in_features)  # torch's init range
    lr = 1e-2
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
    loc, _ = generator(torch.randn(64, 3))
    loc.pow(2).sum().backward()
    optimizer.step()
    for layer, effective in zip(layers, before, strict=True):
        change = (layer.weight * layer.multiplier).detach() - effective
        moved = layer.weight.grad.abs() > 1e-4
        assert moved.float().mean() > 0.3
        expected = -lr * layer.multiplier * layer.weight.grad[moved].sign()
        assert torch.allclose(change[moved], expected, rtol=1e-3, atol=0)


def test_default_start_has_the_claimed_moments(dtype):
    # q starts with mean init_loc and per-coordinate variance init_scale^2, half of it the
    # spread of mu(eps). Tolerance: 5 Monte Carlo standard errors of the 40000-draw moments
    # plus the rescaling's own error (mean and sd of the spread fixed on SPREAD_INIT_DRAWS
    # draws: relative error ~ 1 / sqrt(2 * 4096) on the sd, 1 / sqrt(4096) on the mean).
    torch.manual_seed(1)
    init_loc, init_scale, fraction = torch.tensor([1.0, -2.0, 0.5]), 0.4, 0.5
    generator = ConditionalNormalGenerator(2, init_loc, (32, 32), init_scale=init_scale,
                                           init_mixing_fraction=fraction)
    num = 40000
    with torch.no_grad():
        eps = torch.randn(num, 2)
        loc, scale = generator(eps)
        z = loc + scale * torch.randn_like(loc)
    spread_var = fraction * init_scale**2
    mean_tol = 5 * (init_scale / math.sqrt(num) + math.sqrt(spread_var / SPREAD_INIT_DRAWS))
    assert torch.allclose(z.mean(0), init_loc, atol=mean_tol, rtol=0)
    centered = z - z.mean(0)
    var = centered.pow(2).mean(0)
    var_se = ((centered.pow(4).mean(0) - var**2) / num).sqrt()
    var_tol = 5 * (var_se + 2 * spread_var / math.sqrt(2 * SPREAD_INIT_DRAWS))
    assert bool(((var - init_scale**2).abs() < var_tol).all()), (var, var_tol)
    assert torch.allclose(scale[0], torch.full_like(scale[0], init_scale * math.sqrt(1 - fraction)))
