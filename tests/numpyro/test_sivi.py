"""AutoSIVI and SIVI_ELBO (NumPyro): autoguide contract, jit, path gradient, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers, optim
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_mixvi._sivi import (
    SPREAD_INIT_DRAWS,
    generator_apply,
    generator_init,
    hidden_multiplier,
    output_multiplier,
)
from numpyro_mixvi.elbos.sivi import SIVI_ELBO
from numpyro_mixvi.guides.sivi import AutoSIVI


def constrained_model(y=None):
    loc = numpyro.sample("loc", dist.Normal(0.0, 1.0))
    scale = numpyro.sample("scale", dist.LogNormal(0.0, 0.5))
    with numpyro.plate("n", 3):
        numpyro.sample("w", dist.Normal(loc, scale))
    numpyro.sample("y", dist.Normal(loc, 1.0), obs=y)


@pytest.mark.parametrize("proposal, progress_bar", [("flow", False), ("prior", True)])
def test_run_jits_and_samples(x64, proposal, progress_bar):
    guide = AutoSIVI(constrained_model, mixing_dim=2, proposal=proposal, hidden_dims=(16,),
                     proposal_hidden_dims=(16,), num_importance_samples=8)
    svi = SVI(constrained_model, guide, optim.Adam(1e-2),
              SIVI_ELBO(num_particles=4, num_importance_samples=8))
    result = svi.run(jax.random.key(0), 30, 0.5, progress_bar=progress_bar)
    assert np.all(np.isfinite(result.losses))
    draws = guide.sample_posterior(jax.random.key(1), result.params, sample_shape=(7,))
    assert draws["w"].shape == (7, 3) and bool((draws["scale"] > 0).all())
    assert draws["w"].dtype == (jnp.float64 if x64 else jnp.float32)
    posterior = guide.get_posterior(result.params, rng_key=jax.random.key(2))
    assert posterior.sample(jax.random.key(3), (4, 5)).shape == (4, 5, 5)
    assert posterior.log_prob(jnp.zeros((7, 5))).shape == (7,)
    pred = Predictive(constrained_model, guide=guide, params=result.params, num_samples=9)(
        jax.random.key(4), None
    )
    assert pred["y"].shape == (9,)
    median = guide.median(result.params)
    quantiles = guide.quantiles(result.params, [0.25, 0.75])
    assert median["w"].shape == (3,) and quantiles["w"].shape == (2, 3)
    assert bool((quantiles["w"][0] <= quantiles["w"][1]).all())


def test_log_prob_without_key_raises():
    guide = AutoSIVI(constrained_model, mixing_dim=2, hidden_dims=(4,))
    svi = SVI(constrained_model, guide, optim.Adam(1e-2), SIVI_ELBO())
    state = svi.init(jax.random.key(0), 0.5)
    with pytest.raises(ValueError, match="needs a key"):
        guide.get_posterior(svi.get_params(state)).log_prob(jnp.zeros(5))


def test_trace_elbo_trains_the_flow_proposal_and_loss_is_finite():
    guide = AutoSIVI(constrained_model, mixing_dim=2, hidden_dims=(8,), proposal_hidden_dims=(8,))
    svi = SVI(constrained_model, guide, optim.Adam(1e-2), Trace_ELBO(num_particles=3))
    state = svi.init(jax.random.key(0), 0.5)
    params = svi.optim.get_params(state.optim_state)

    def loss(p):
        return Trace_ELBO(num_particles=3).loss(
            jax.random.key(1), svi.constrain_fn(p), constrained_model, guide, 0.5
        )

    grads = jax.grad(loss)(params)
    proposal_leaves = jax.tree.leaves(grads["auto_proposal"])
    assert sum(float(jnp.abs(g).sum()) for g in proposal_leaves) > 0
    for name in ("auto_loc", "auto_raw_scale"):
        assert float(jnp.abs(grads[name]).sum()) > 0, name
    with guide.score_options(proposal="prior"):
        grads = jax.grad(loss)(params)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["auto_proposal"])) == 0


def gaussian_setup():
    target_loc = jnp.array([0.5, -1.0])
    target_cov = jnp.array([[1.0, 0.6], [0.6, 2.0]])

    def model():
        numpyro.sample("x", dist.MultivariateNormal(target_loc, target_cov))

    guide = AutoSIVI(model, mixing_dim=2, hidden_dims=(), proposal="prior", init_scale=0.7)
    with handlers.seed(rng_seed=0):
        params = handlers.trace(guide).get_trace()
    params = {k: v["value"] for k, v in params.items() if v["type"] == "param"}
    key_w, key_b = jax.random.split(jax.random.key(2))
    dtype = params["auto_loc"].dtype
    # generator_apply scales the last layer's output by output_multiplier(fan_in = 2).
    weight = jax.random.normal(key_w, (2, 2), dtype) / output_multiplier(2)
    params["auto_net"] = [(weight, jnp.zeros(2, dtype))]
    params["auto_loc"] = jax.random.normal(key_b, (2,), dtype)
    return model, guide, params, dist.MultivariateNormal(target_loc, target_cov)


def exact_neg_elbo(params, target):
    weight, bias = (value * output_multiplier(2) for value in params["auto_net"][0])
    sigma = jax.nn.softplus(params["auto_raw_scale"])
    cov = weight.T @ weight + jnp.diag(sigma**2)
    q = dist.MultivariateNormal(params["auto_loc"] + bias, cov)
    prec = target.precision_matrix
    diff = q.loc - target.loc
    e_log_p = (-0.5 * (jnp.trace(prec @ cov) + diff @ prec @ diff)
               - 0.5 * jnp.linalg.slogdet(2 * math.pi * target.covariance_matrix)[1])
    return -(e_log_p + q.entropy())


def test_path_gradient_is_unbiased_against_closed_form(x64):
    model, guide, params, target = gaussian_setup()
    exact = jax.grad(exact_neg_elbo)(params, target)
    elbo = SIVI_ELBO(num_particles=1000, num_importance_samples=2048)

    @jax.jit
    def sivi_grad(key):
        return jax.grad(lambda p: elbo.loss(key, p, model, guide))(params)

    reps = [sivi_grad(key) for key in jax.random.split(jax.random.key(3), 12)]
    names = ("auto_loc", "auto_raw_scale", "auto_net")
    flat = np.stack([np.concatenate([np.ravel(x) for n in names for x in jax.tree.leaves(r[n])])
                     for r in reps]).astype(np.float64)
    truth = np.concatenate([np.ravel(x) for n in names for x in jax.tree.leaves(exact[n])])
    mean, stderr = flat.mean(0), flat.std(0, ddof=1) / math.sqrt(len(flat))
    # Unbiased up to the O(1/k) bias of self-normalized IS (BSIVI puts the draw's own eps
    # among the k): at k = 2048 it is below the MC error of 12 x 1000 particles; 5 s.e. + 1e-3.
    assert np.all(np.abs(mean - truth) <= 5 * stderr + 1e-3), (mean, truth, stderr)


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
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="SIVI_ELBO needs an AutoSIVI guide"):
        SIVI_ELBO().loss(key, {}, constrained_model, AutoNormal(constrained_model), 0.5)
    guide = AutoSIVI(constrained_model, proposal="prior")
    svi = SVI(constrained_model, guide, optim.Adam(1e-2), SIVI_ELBO())
    params = svi.get_params(svi.init(key, 0.5))
    with pytest.raises(ValueError, match="needs a guide built with"):
        SIVI_ELBO(proposal="flow").loss(key, params, constrained_model, guide, 0.5)


def test_discrete_and_empty_models_raise():
    def discrete():
        numpyro.sample("c", dist.Bernoulli(0.5))

    def empty():
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=0.0)

    for model, error, match in ((discrete, Exception, "discrete"),
                                (empty, RuntimeError, "no latent variables")):
        svi = SVI(model, AutoSIVI(model), optim.Adam(1e-2), SIVI_ELBO())
        with pytest.raises(error, match=match):
            svi.init(jax.random.key(0))


def test_hidden_layers_take_adam_steps_relative_to_their_size(x64):
    # Adam's first step moves every stored parameter by lr * sign(grad) (|grad| >> its eps);
    # hidden layers are stored divided by hidden_multiplier, so an effective weight moves by
    # lr / sqrt(fan_in): lr relative to the torch-style init size, at any width.
    dtype = jnp.float64 if x64 else jnp.float32
    params = generator_init(jax.random.key(0), 3, jnp.zeros(2, dtype), (50, 40), init_scale=0.5,
                            init_mixing_fraction=0.5)
    eps = jax.random.normal(jax.random.key(1), (64, 3), dtype)

    def loss(params):
        return (generator_apply(params, eps)[0] ** 2).sum()

    grads = jax.grad(loss)(params)
    lr = 1e-2
    optimizer = optax.adam(lr)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    for index in range(2):
        weight, grad, moved_weight = (p["net"][index][0] for p in (params, grads, new))
        fan_in = weight.shape[0]
        assert hidden_multiplier(fan_in) == pytest.approx(1 / math.sqrt(fan_in))
        effective = weight * hidden_multiplier(fan_in)
        assert float(jnp.abs(effective).max()) <= 1 / math.sqrt(fan_in)  # torch's init range
        change = np.asarray((moved_weight - weight) * hidden_multiplier(fan_in))
        moved = np.abs(np.asarray(grad)) > 1e-4
        assert moved.mean() > 0.3
        expected = -lr * hidden_multiplier(fan_in) * np.sign(np.asarray(grad))[moved]
        np.testing.assert_allclose(change[moved], expected, rtol=1e-3 if x64 else 1e-2)


def test_default_start_has_the_claimed_moments(x64):
    # q starts with mean init_loc and per-coordinate variance init_scale^2, half of it the
    # spread of mu(eps). Tolerance: 5 Monte Carlo standard errors of the 40000-draw moments
    # plus the rescaling's own error (mean and sd of the spread fixed on SPREAD_INIT_DRAWS
    # draws: relative error ~ 1 / sqrt(2 * 4096) on the sd, 1 / sqrt(4096) on the mean).
    dtype = jnp.float64 if x64 else jnp.float32
    init_loc, init_scale, fraction = jnp.array([1.0, -2.0, 0.5], dtype), 0.4, 0.5
    params = generator_init(jax.random.key(2), 2, init_loc, (32, 32), init_scale=init_scale,
                            init_mixing_fraction=fraction)
    num = 40000
    eps_key, noise_key = jax.random.split(jax.random.key(3))
    loc, scale = generator_apply(params, jax.random.normal(eps_key, (num, 2), dtype))
    z = np.asarray(loc + scale * jax.random.normal(noise_key, loc.shape, dtype), np.float64)
    spread_var = fraction * init_scale**2
    mean_tol = 5 * (init_scale / math.sqrt(num) + math.sqrt(spread_var / SPREAD_INIT_DRAWS))
    np.testing.assert_allclose(z.mean(0), np.asarray(init_loc), atol=mean_tol, rtol=0)
    centered = z - z.mean(0)
    var = (centered**2).mean(0)
    var_se = np.sqrt(((centered**4).mean(0) - var**2) / num)
    var_tol = 5 * (var_se + 2 * spread_var / math.sqrt(2 * SPREAD_INIT_DRAWS))
    assert np.all(np.abs(var - init_scale**2) < var_tol), (var, var_tol)
    np.testing.assert_allclose(np.asarray(scale[0]), init_scale * math.sqrt(1 - fraction),
                               rtol=1e-5)
