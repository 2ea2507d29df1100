"""RBMixture_ELBO (NumPyro): unbiased and lower-variance gradients, model plumbing, errors."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

from numpyro_mixvi.distributions.cwm import ClassifierWeightedMixture, init_classifier_params
from numpyro_mixvi.elbos.rb_mixture import RBMixture_ELBO, path_log_prob, rb_mixture_elbo
from numpyro_mixvi.guides.base import FiniteMixture, unconstrained_log_joint
from numpyro_mixvi.guides.cwm import WEIGHT_STEP_SCALE, AutoCWM
from tests.properties import assert_close_in_mc_error

LOG_Z = -5.0  # an unnormalized target, as in VI (log evidence is never 0 in practice)


def target_log_prob_1d(x, log_z=LOG_Z):
    """Unnormalized bimodal 1-D target: 0.3 N(-2, 0.5) + 0.7 N(1.5, 1), times e^log_z."""
    comps = jnp.stack([math.log(0.3) + dist.Normal(-2.0, 0.5).log_prob(x),
                       math.log(0.7) + dist.Normal(1.5, 1.0).log_prob(x)], -1)
    return jax.nn.logsumexp(comps, -1) + log_z


def params_1d(seed=0):
    """Parameters of a 1-D CWM (K=3, one hidden layer) with a non-trivial classifier."""
    rng = np.random.default_rng(seed)
    dtype = jnp.zeros(()).dtype
    rand = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
    layers = init_classifier_params(random.key(seed), 1, 3, (6,), dtype)
    layers[-1] = (rand(6, 3), rand(3))
    return {"locs": rand(3, 1), "scale": jnp.exp(0.3 * rand(3, 1)) * 0.8, "logits": 0.5 * rand(3),
            "classifier_params": layers}


def cwm_from(params):
    return ClassifierWeightedMixture(params["locs"], scale=params["scale"],
                                     logits=params["logits"],
                                     classifier_params=params["classifier_params"])


def flat(tree):
    return jnp.concatenate([jnp.ravel(t) for t in jax.tree.leaves(tree)])


def exact_elbo_gradient(params):
    """Gradient of the ELBO by midpoint quadrature on [-15, 15] (20000 cells; error < 1e-6)."""
    grid = jnp.linspace(-15, 15, 20001)
    mid = (0.5 * (grid[1:] + grid[:-1]))[:, None]

    def elbo(params):
        log_q = cwm_from(params).log_prob(mid)
        integrand = jnp.exp(log_q) * (target_log_prob_1d(mid[:, 0]) - log_q)
        return integrand.sum() * (grid[1] - grid[0])

    return flat(jax.grad(elbo)(params))


@partial(jax.jit, static_argnums=(2, 4))
def rb_gradients(params, keys, num_particles, log_z=LOG_Z, sticking_the_landing=False):
    def estimate(params, key):
        cwm = cwm_from(params)
        x, log_weights = cwm.sample_components(key, (num_particles,))
        log_q = path_log_prob(cwm, x) if sticking_the_landing else cwm.log_prob(x)
        terms = rb_mixture_elbo(target_log_prob_1d(x[..., 0], log_z), log_q, log_weights)
        return terms.mean()

    return jax.vmap(lambda key: flat(jax.grad(estimate)(params, key)))(keys)


@partial(jax.jit, static_argnums=(2,))
def score_function_gradients(params, keys, num_samples):
    """The score-function (REINFORCE) gradient from ``num_samples`` ancestral draws."""
    def estimate(params, key):
        cwm = cwm_from(params)
        x = jax.lax.stop_gradient(cwm.sample(key, (num_samples,)))
        log_q = cwm.log_prob(x)
        f = jax.lax.stop_gradient(target_log_prob_1d(x[..., 0]) - log_q)
        return (log_q * f).mean()

    return jax.vmap(lambda key: flat(jax.grad(estimate)(params, key)))(keys)


def test_sticking_the_landing_gradient_is_unbiased(x64):
    """Dropping grad_theta log q at fixed x keeps the RB gradient unbiased (E_q of it is 0)."""
    params = params_1d()
    exact = np.asarray(exact_elbo_gradient(params), np.float64)
    estimates = np.asarray(rb_gradients(params, random.split(random.key(0), 400), 8, LOG_Z,
                                        True), np.float64)
    # same budget and false-alarm rate as test_rb_gradient_is_unbiased.
    assert_close_in_mc_error(estimates, exact, num_sd=4.5)


def test_sticking_the_landing_has_zero_gradient_at_the_exact_posterior(x64):
    """When the target is q itself, every particle's STL gradient is 0; the plain one is not."""
    params = params_1d()

    def elbo(params, log_q_fn):
        cwm = cwm_from(params)
        x, log_weights = cwm.sample_components(random.key(1), (4,))
        log_p = cwm_from(jax.lax.stop_gradient(params)).log_prob(x)  # target = q, fixed
        return rb_mixture_elbo(log_p, log_q_fn(cwm, x), log_weights).sum()

    stl = flat(jax.grad(elbo)(params, path_log_prob))
    plain = flat(jax.grad(elbo)(params, lambda cwm, x: cwm.log_prob(x)))
    tol = 1e-9 if x64 else 1e-4
    np.testing.assert_allclose(stl, 0.0, atol=tol)
    assert float(jnp.abs(plain).max()) > 1e-3  # the score term grad log q(x) is not 0


def test_rb_gradient_is_unbiased(x64):
    params = params_1d()
    exact = np.asarray(exact_elbo_gradient(params), np.float64)
    estimates = np.asarray(rb_gradients(params, random.split(random.key(0), 400), 8), np.float64)
    # 400 i.i.d. estimates per coordinate: the mean is within 4.5 standard errors of the exact
    # gradient (about 40 coordinates, so a false alarm has probability < 3e-4).
    assert_close_in_mc_error(estimates, exact, num_sd=4.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rb_gradient_has_lower_variance_than_score_function(seed):
    """Equal model evaluations: one RB particle (K points) vs K ancestral score-function draws.

    The score function's variance grows with (log p - log q)^2, hence with (log Z)^2, while the
    RB gradient does not depend on log Z (next test). At log Z = 0 the two are comparable; at
    log Z = -5 RB wins.
    """
    params = params_1d(seed)
    keys = random.split(random.key(seed), 200)
    rb = np.asarray(rb_gradients(params, keys, 1), np.float64)
    sf = np.asarray(score_function_gradients(params, keys, 3), np.float64)
    # total variance from 200 draws has a relative sd of about sqrt(2/200) = 10% (more for the
    # heavy-tailed score function); observed ratios are 0.1-0.3, far below 1.
    ratio = rb.var(0).sum() / sf.var(0).sum()
    assert ratio < 0.6, ratio


def test_rb_gradient_does_not_depend_on_log_z(x64):
    """``sum_k grad w_k = 0``, so adding a constant to log p leaves the RB gradient unchanged."""
    params = params_1d()
    keys = random.split(random.key(0), 4)
    a, b = (rb_gradients(params, keys, 4, log_z) for log_z in (0.0, 50.0))
    np.testing.assert_allclose(a, b, atol=1e-9 if x64 else 1e-3, rtol=1e-6 if x64 else 1e-3)


def test_exact_guide_gives_log_evidence_with_zero_variance(x64):
    """When q equals the posterior, every RB particle equals log Z (constrained site included)."""
    loc_x, scale_x = jnp.array([[-1.0, 0.5], [2.0, -1.0]]), jnp.array([[0.6, 0.9], [0.4, 0.7]])
    logits_x, logits_s = jnp.array([0.2, -0.3]), jnp.array([-0.5, 0.4])
    loc_s, scale_s = jnp.array([-0.5, 1.0]), jnp.array([0.3, 0.5])
    mix_x = dist.MixtureSameFamily(dist.Categorical(logits=logits_x),
                                   dist.Normal(loc_x, scale_x).to_event(1))
    mix_s = dist.MixtureSameFamily(dist.Categorical(logits=logits_s), dist.Normal(loc_s, scale_s))
    wide = dist.Normal(0.0, 10.0)

    def model():  # posterior: x ~ mix_x and log(s) ~ mix_s, independent; evidence e^1.3
        x = numpyro.sample("x", wide.expand([2]).to_event(1))
        s = numpyro.sample("s", dist.LogNormal(0.0, 10.0))
        numpyro.factor("x_factor", mix_x.log_prob(x) - wide.log_prob(x).sum(-1))
        numpyro.factor("s_factor", mix_s.log_prob(jnp.log(s)) - wide.log_prob(jnp.log(s)))
        numpyro.factor("log_z", 1.3)

    guide = AutoCWM(model, num_components=4, hidden_dims=None)
    elbo = RBMixture_ELBO(num_particles=16)
    svi = SVI(model, guide, optax.adam(1e-2), elbo)
    params = svi.get_params(svi.init(random.key(0)))
    pairs = [(i, j) for i in range(2) for j in range(2)]  # product of two 2-mixtures
    params["auto_locs"] = jnp.stack([jnp.append(loc_x[i], loc_s[j]) for i, j in pairs])
    params["auto_scale"] = jnp.stack([jnp.append(scale_x[i], scale_s[j]) for i, j in pairs])
    params["auto_logits"] = jnp.stack([jax.nn.log_softmax(logits_x)[i]
                                       + jax.nn.log_softmax(logits_s)[j] for i, j in pairs]
                                      ) / WEIGHT_STEP_SCALE  # stored logits are scaled
    posterior = guide.get_posterior(params)
    x, _ = posterior.sample_components(random.key(1), (16,))
    log_p = jax.jit(lambda x: unconstrained_log_joint(
        model, guide, x.reshape(-1, 3), params, (), {}, rng_key=random.key(2)))(x).reshape(16, 4)
    tol = 1e-9 if x64 else 2e-4
    np.testing.assert_allclose(log_p - posterior.log_prob(x), jnp.full((16, 4), 1.3), atol=tol)
    loss = jax.jit(lambda params: elbo.loss(random.key(3), params, model, guide))(params)
    assert abs(float(loss) + 1.3) < tol


def test_unconstrained_log_joint_matches_manual_computation(x64):
    """Plates, observed sites, subsample scaling and the Jacobian of a constrained site."""
    data = jnp.linspace(-1.0, 1.0, 10)

    def model():
        scale = numpyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with numpyro.plate("groups", 2):
            loc = numpyro.sample("loc", dist.Normal(0.0, 2.0))
        with numpyro.plate("data", 10, subsample_size=5):
            batch = numpyro.subsample(data, event_dim=0)
            numpyro.sample("obs", dist.Normal(loc.sum(-1), scale), obs=batch)

    guide = AutoCWM(model, num_components=2)
    elbo = RBMixture_ELBO()
    svi = SVI(model, guide, optax.adam(1e-2), elbo)
    params = svi.get_params(svi.init(random.key(0)))
    latent = random.normal(random.key(1), (7, 3))
    key = random.key(2)
    log_p = jax.jit(lambda latent: unconstrained_log_joint(model, guide, latent, params, (), {},
                                                           rng_key=key))(latent)
    # the same minibatch for every point: recover it by tracing the model with the same key.
    _, key_model = random.split(key)
    tr = numpyro.handlers.trace(numpyro.handlers.seed(model, key_model)).get_trace()
    batch = tr["obs"]["value"]
    log_scale, loc = latent[:, 0], latent[:, 1:]
    scale = jnp.exp(log_scale)
    manual = (dist.LogNormal(0.0, 1.0).log_prob(scale) + log_scale  # Jacobian of exp
              + dist.Normal(0.0, 2.0).log_prob(loc).sum(-1)
              + 2.0 * dist.Normal(loc.sum(-1, keepdims=True), scale[:, None])
              .log_prob(batch).sum(-1))
    tol = 1e-9 if x64 else 1e-4
    np.testing.assert_allclose(log_p, manual, atol=tol, rtol=tol)


def test_svi_lowers_the_loss_to_zero_on_a_gaussian():
    def model():
        numpyro.sample("x", dist.Normal(jnp.array([3.0, -2.0]), jnp.array([1.0, 0.5]))
                       .to_event(1))

    guide = AutoCWM(model, num_components=3, init_scale=0.1)  # starts > 1 nat from exact
    elbo = RBMixture_ELBO(num_particles=8)
    result = SVI(model, guide, optax.adam(5e-2), elbo).run(random.key(0), 300,
                                                            progress_bar=False)
    first, last = result.losses[:5].mean(), result.losses[-20:].mean()
    assert last < first - 1.0 and abs(last) < 0.2  # exact posterior reachable: loss -> 0
    assert isinstance(guide.get_posterior(result.params), FiniteMixture)


def test_bad_guides_and_arguments_raise():
    def model():
        numpyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="num_particles"):
        RBMixture_ELBO(num_particles=0)
    for guide, match in ((AutoNormal(model), "AutoContinuous"),
                         (AutoDiagonalNormal(model), "sample_components")):
        svi = SVI(model, guide, optax.adam(1e-2), RBMixture_ELBO())
        state = svi.init(random.key(0))
        with pytest.raises(TypeError, match=match):
            svi.update(state)
