"""ClassifierWeightedMixture (density, sampling, EM, fit) and the AutoCWM guide (NumPyro)."""

import math
import pickle

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI, Predictive, Trace_ELBO, TraceGraph_ELBO

from numpyro_mixvi.distributions.cwm import (
    ClassifierWeightedMixture,
    init_classifier_params,
    init_component_flows,
)
from numpyro_mixvi.elbos.rb_mixture import RBMixture_ELBO
from numpyro_mixvi.guides.cwm import AutoCWM
from tests.properties import (
    assert_close_in_mc_error,
    assert_normalized_2d,
    assert_samples_match_density_2d,
    grid_2d,
)

BOUNDS = (-7.0, 7.0, -7.0, 7.0)


def random_cwm(covariance="diag", hidden_dims=(8, 8), num_components=4, dim=2, seed=0, *,
               max_scale=0.8, flow_layers=0, perturb=0.3):
    """A CWM with random parameters whose mass lies well inside ``BOUNDS`` in 2-D.

    Locations in [-2, 2], scales in [0.3, ``max_scale``] (|off-diagonal| <= 0.3): 7 is > 6 sd
    away. With ``flow_layers > 0`` each component gets a flow whose zero arrays (output layers
    and log-scale offsets) become N(0, perturb^2), so every coupling's log-scale is O(perturb).
    """
    rng = np.random.default_rng(seed)
    dtype = jnp.zeros(()).dtype  # float32, or float64 under x64
    u = lambda *shape, lo, hi: jnp.asarray(rng.uniform(lo, hi, shape), dtype)  # noqa: E731
    k, d = num_components, dim
    locs = u(k, d, lo=-2, hi=2)
    if covariance == "diag":
        scales = {"scale": u(k, d, lo=0.3, hi=max_scale)}
    else:
        tril = jnp.tril(u(k, d, d, lo=-0.3, hi=0.3), -1) + jax.vmap(jnp.diag)(
            u(k, d, lo=0.3, hi=max_scale))
        scales = {"scale_tril": tril}
    layers = init_classifier_params(random.key(seed), d, k, hidden_dims, dtype)
    if layers:  # a non-trivial last layer, so the weights really depend on z
        layers[-1] = (u(*layers[-1][0].shape, lo=-2, hi=2), u(k, lo=-1, hi=1))
    flows = None
    if flow_layers:

        def perturbed(a):
            if eqx.is_inexact_array(a) and not a.any():
                return jnp.asarray(perturb * rng.normal(size=a.shape), a.dtype)
            return a

        flows = jax.tree.map(
            perturbed, init_component_flows(random.key(seed + 1), d, k, flow_layers, dtype))
    return ClassifierWeightedMixture(locs, logits=u(k, lo=-1, hi=1), classifier_params=layers,
                                     flows=flows, **scales)


def numpy_log_prob(cwm):
    log_prob = jax.jit(cwm.log_prob)
    return lambda points: np.asarray(log_prob(jnp.asarray(points, cwm.locs.dtype)), np.float64)


@pytest.mark.parametrize("covariance", ["diag", "full"])
@pytest.mark.parametrize("hidden_dims", [None, (), (8, 8)], ids=["constant", "linear", "mlp"])
def test_log_prob_integrates_to_one(x64, covariance, hidden_dims):
    cwm = random_cwm(covariance, hidden_dims)
    assert cwm.log_prob(jnp.zeros(2)).dtype == (jnp.float64 if x64 else jnp.float32)
    # midpoint rule, 300 cells a side: O(h^2) error ~ 1e-4 for scales >= 0.3; tails < 1e-8.
    assert_normalized_2d(numpy_log_prob(cwm), BOUNDS, num=300, atol=5e-3)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_samples_match_log_prob(x64, covariance):
    cwm = random_cwm(covariance)
    samples = np.asarray(cwm.sample(random.key(1), (20000,)), np.float64)
    # chi-square two-sample test against grid probabilities, alpha = 1e-3.
    assert_samples_match_density_2d(samples, numpy_log_prob(cwm), BOUNDS, bins=12)


def test_rao_blackwellized_expectation_matches_quadrature(x64):
    cwm = random_cwm("full")
    points, area = grid_2d(BOUNDS, 300)
    density = np.exp(numpy_log_prob(cwm)(points)) * area
    h = lambda x: x[..., 0] ** 2 + np.sin(3 * x[..., 1])  # noqa: E731
    exact = float((density * h(points)).sum())
    x, log_weights = cwm.sample_components(random.key(2), (20000,))
    assert x.shape == (20000, 4, 2) and log_weights.shape == (20000, 4)
    terms = (np.exp(np.asarray(log_weights, np.float64)) * h(np.asarray(x, np.float64))).sum(-1)
    # each RB term is an i.i.d. unbiased estimate of E_q[h]: mean within 4 standard errors.
    assert_close_in_mc_error(terms, exact)


def test_constant_classifier_is_a_gaussian_mixture(x64):
    cwm = random_cwm("full", hidden_dims=None)
    gmm = dist.MixtureSameFamily(
        dist.Categorical(logits=cwm.logits),
        dist.MultivariateNormal(cwm.locs, scale_tril=cwm.scale_tril),
    )
    x = random.normal(random.key(3), (50, 2)) * 2
    tol = 1e-5 if x64 else 1e-4
    np.testing.assert_allclose(cwm.log_prob(x), gmm.log_prob(x), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(), (13,), (2, 3)])
def test_shapes(shape):
    cwm = random_cwm("full", num_components=3, dim=3)
    assert cwm.sample(random.key(0), shape).shape == shape + (3,)
    assert cwm.log_prob(jnp.zeros(shape + (3,))).shape == shape
    x, log_w = cwm.sample_components(random.key(0), shape)
    assert x.shape == shape + (3, 3) and log_w.shape == shape + (3,)
    np.testing.assert_allclose(jax.nn.logsumexp(log_w, -1), jnp.zeros(shape), atol=1e-5)


def test_component_maps_are_inverse(x64):
    cwm = random_cwm("full")
    z = random.normal(random.key(4), (7, 2))
    x = cwm.component_forward(z)  # (7, K, D)
    z_back = cwm.component_inverse(x.reshape(-1, 2)).reshape(7, 4, 4, 2)
    diagonal = jnp.moveaxis(jnp.diagonal(z_back, axis1=1, axis2=2), -1, 1)
    np.testing.assert_allclose(diagonal, jnp.broadcast_to(z[:, None], (7, 4, 2)), atol=1e-4)


def test_every_parameter_gets_a_gradient():
    cwm = random_cwm("full")

    def objective(cwm):
        x, log_w = cwm.sample_components(random.key(0), (16,))
        return (cwm.log_prob(x) * jnp.exp(log_w)).sum()

    grads = jax.jit(jax.grad(objective))(cwm)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 3 + 2 * len(cwm.classifier_params)
    assert all(jnp.isfinite(g).all() and jnp.abs(g).sum() > 0 for g in leaves)


def _cwm(**kwargs):
    return lambda: ClassifierWeightedMixture(jnp.zeros((3, 2)), **kwargs)


BAD_ARGS = {
    "K < 1": (lambda: ClassifierWeightedMixture(jnp.zeros((0, 2)), scale=jnp.ones((0, 2))),
              "K >= 1"),
    "scale shape": (_cwm(scale=jnp.ones((3, 3))), "scale must have shape"),
    "both scales": (_cwm(scale=jnp.ones((3, 2)), scale_tril=jnp.ones((3, 2, 2))),
                    "exactly one"),
    "scale_tril shape": (_cwm(scale_tril=jnp.eye(2)), "scale_tril must have shape"),
    "logits shape": (_cwm(scale=jnp.ones((3, 2)), logits=jnp.zeros(4)), "logits"),
    "classifier input": (_cwm(scale=jnp.ones((3, 2)),
                              classifier_params=[(jnp.zeros((5, 3)), jnp.zeros(3))]),
                         "classifier_params\\[0\\]"),
    "classifier output": (_cwm(scale=jnp.ones((3, 2)),
                               classifier_params=[(jnp.zeros((2, 4)), jnp.zeros(4))]), "K=3"),
    "from_samples K": (lambda: ClassifierWeightedMixture.from_samples(
        random.key(0), jnp.ones((10, 2)), 0), "num_components"),
    "from_samples nan": (lambda: ClassifierWeightedMixture.from_samples(
        random.key(0), jnp.array([[0.0, 1.0], [jnp.nan, 0.0], [1.0, 2.0]]), 2), "non-finite"),
    "from_samples ndim": (lambda: ClassifierWeightedMixture.from_samples(
        random.key(0), jnp.ones(10), 2), "shape"),
    "covariance": (lambda: ClassifierWeightedMixture.from_samples(
        random.key(0), jnp.ones((10, 2)), 2, covariance="dense"), "covariance"),
    "fit dim": (lambda: random_cwm().fit(random.key(0), jnp.ones((10, 3)), num_steps=1),
                "\\(N, 2\\)"),
    "fit inf": (lambda: random_cwm().fit(random.key(0), jnp.array([[0.0, jnp.inf]]),
                                         num_steps=1), "non-finite"),
    "AutoCWM K": (lambda: AutoCWM(lambda: None, num_components=0), "num_components"),
    "AutoCWM scale": (lambda: AutoCWM(lambda: None, init_scale=0.0), "init_scale"),
    "AutoCWM covariance": (lambda: AutoCWM(lambda: None, covariance="dense"), "covariance"),
    "AutoCWM hidden": (lambda: AutoCWM(lambda: None, hidden_dims=(0,)), "hidden_dims"),
}


@pytest.mark.parametrize("make,match", BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_bad_input_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_fit_raises_on_divergence():
    x = random.normal(random.key(0), (100, 2))
    cwm = ClassifierWeightedMixture.from_samples(random.key(1), x, 2, hidden_dims=(4,))
    with pytest.raises(FloatingPointError, match="step"):
        cwm.fit(random.key(2), x * 1e30, num_steps=5, progress_bar=False)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_em_recovers_a_gaussian_mixture(x64, covariance):
    key_label, key_x, key_em = random.split(random.key(1), 3)
    labels = random.uniform(key_label, (4000,)) < 0.3
    x = random.normal(key_x, (4000, 2)) * 0.5 + jnp.where(labels[:, None], 3.0, -1.0)
    cwm = ClassifierWeightedMixture.from_samples(key_em, x, 2, covariance=covariance,
                                                 em_steps=50)
    order = jnp.argsort(cwm.locs[:, 0])
    # mean of ~1200 points with sd 0.5: standard error 0.015; 0.1 is > 6 se.
    np.testing.assert_allclose(cwm.locs[order], [[-1.0, -1.0], [3.0, 3.0]], atol=0.1)
    # weight 0.3 from 4000 Bernoulli draws: sd 0.007.
    assert abs(float(jnp.exp(cwm.logits[order][1])) - 0.3) < 0.04


def test_fit_beats_the_em_gaussian_mixture(x64):
    """On a ring, ML fitting of the classifier beats the EM mixture with the same K (held out)."""
    key_a, key_r, key_em, key_fit = random.split(random.key(2), 4)
    angle = random.uniform(key_a, (6000,)) * 2 * math.pi
    radius = 2.0 + 0.15 * random.normal(key_r, (6000,))
    x = jnp.stack([radius * jnp.cos(angle), radius * jnp.sin(angle)], -1)
    train, test = x[:4000], x[4000:]
    em = ClassifierWeightedMixture.from_samples(key_em, train, 4, hidden_dims=None)
    cwm = ClassifierWeightedMixture.from_samples(key_em, train, 4, hidden_dims=(16, 16))
    gmm_fit, _ = em.fit(key_fit, train, num_steps=300, batch_size=512, lr=1e-2,
                        progress_bar=False)
    cwm_fit, losses = cwm.fit(key_fit, train, num_steps=300, batch_size=512, lr=1e-2,
                              progress_bar=False)
    assert losses.shape == (300,) and jnp.isfinite(losses).all()
    nll = {name: -np.asarray(d.log_prob(test), np.float64)
           for name, d in [("em", em), ("gmm", gmm_fit), ("cwm", cwm_fit)]}
    # paired held-out NLL differences: mean gap must exceed 4 standard errors.
    for baseline in ("em", "gmm"):
        diff = nll[baseline] - nll["cwm"]
        assert diff.mean() > 4 * diff.std(ddof=1) / math.sqrt(len(diff)), baseline


def constrained_model(data):
    scale = numpyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with numpyro.plate("groups", 3):
        loc = numpyro.sample("loc", dist.Normal(0.0, 2.0))
    with numpyro.plate("data", data.shape[0]):
        numpyro.sample("obs", dist.Normal(loc.sum(), scale), obs=data)


DATA = jnp.linspace(-1.0, 2.0, 20)


def test_autocwm_svi_run_jits_with_and_without_progress_bar(x64):
    covariance = "full" if x64 else "diag"  # both kinds, both dtypes, half the compilations
    guide = AutoCWM(constrained_model, num_components=3, covariance=covariance, hidden_dims=(8,))
    svi = SVI(constrained_model, guide, optax.adam(1e-2), RBMixture_ELBO(num_particles=4))
    for progress_bar in (False, True):
        result = svi.run(random.key(0), 20, DATA, progress_bar=progress_bar)
        assert result.losses.shape == (20,) and jnp.isfinite(result.losses).all()
    posterior = guide.get_posterior(result.params)
    assert isinstance(posterior, ClassifierWeightedMixture)
    assert posterior.locs.dtype == (jnp.float64 if x64 else jnp.float32)
    draws = guide.sample_posterior(random.key(1), result.params, sample_shape=(5, 2))
    assert draws["scale"].shape == (5, 2) and (draws["scale"] > 0).all()
    assert draws["loc"].shape == (5, 2, 3)
    predictive = Predictive(constrained_model, guide=guide, params=result.params, num_samples=30,
                            return_sites=["scale", "loc", "obs"])
    samples = predictive(random.key(2), DATA)
    assert samples["loc"].shape == (30, 3) and samples["obs"].shape == (30, 20)
    with pytest.raises(NotImplementedError, match="sample_posterior"):
        guide.median(result.params)
    with pytest.raises(NotImplementedError, match="sample_posterior"):
        guide.quantiles(result.params, [0.5])


def test_autocwm_initialization():
    guide = AutoCWM(constrained_model, num_components=5, init_scale=0.2)
    svi = SVI(constrained_model, guide, optax.adam(1e-2), RBMixture_ELBO())
    params = svi.get_params(svi.init(random.key(0), DATA))
    posterior = guide.get_posterior(params)
    np.testing.assert_allclose(posterior.locs.mean(0), guide._init_latent, atol=1e-6)
    gaps = jnp.abs(posterior.locs[None] - posterior.locs[:, None]).sum(-1) + jnp.eye(5)
    assert gaps.min() > 0  # components do not coincide
    np.testing.assert_allclose(posterior.scale, jnp.full((5, 4), 0.2), rtol=1e-6)
    weights = jnp.exp(posterior.log_weights(random.normal(random.key(1), (10, 4))))
    np.testing.assert_allclose(weights, jnp.full((10, 5), 0.2), rtol=1e-6)


def test_autocwm_pickle_round_trip():
    guide = AutoCWM(constrained_model, num_components=3, covariance="full")
    svi = SVI(constrained_model, guide, optax.adam(1e-2), RBMixture_ELBO(num_particles=2))
    params = svi.run(random.key(0), 3, DATA, progress_bar=False).params
    loaded_guide, loaded_params = pickle.loads(pickle.dumps((guide, params)))
    a = loaded_guide.sample_posterior(random.key(1), loaded_params, sample_shape=(4,))
    b = guide.sample_posterior(random.key(1), params, sample_shape=(4,))
    np.testing.assert_allclose(a["loc"], b["loc"])


@pytest.mark.parametrize("elbo", [Trace_ELBO(num_particles=3), TraceGraph_ELBO()],
                         ids=["Trace_ELBO", "TraceGraph_ELBO"])
def test_stock_elbos_raise_and_point_to_rb_mixture_elbo(elbo):
    """Differentiating through the ancestral draw would drop the index's gradient: refuse."""
    guide = AutoCWM(constrained_model, num_components=2)
    svi = SVI(constrained_model, guide, optax.adam(1e-2), elbo)
    state = svi.init(random.key(0), DATA)
    with pytest.raises(NotImplementedError, match="RBMixture_ELBO"):
        svi.update(state, DATA)


def test_discrete_latent_gets_the_helpful_error():
    def model():
        numpyro.sample("k", dist.Categorical(jnp.ones(3) / 3))

    guide = AutoCWM(model)
    with pytest.raises(ValueError, match="discrete"):
        SVI(model, guide, optax.adam(1e-2), RBMixture_ELBO()).init(random.key(0))


def test_no_latent_sites_raises():
    def model():
        numpyro.sample("obs", dist.Normal(0.0, 1.0), obs=0.0)

    with pytest.raises(RuntimeError, match="no latent"):
        SVI(model, AutoCWM(model), optax.adam(1e-2), RBMixture_ELBO()).init(random.key(0))
