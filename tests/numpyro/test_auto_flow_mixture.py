"""AutoFlowMixture (NumPyro): the finite-mixture protocol, the fit's stages, broken experts, errors.

One small guide is fit per dtype and shared by the tests (JAX compile time dominates): a 2-D
two-component Gaussian-mixture posterior, MAF + RealNVP + RBIG experts with 2 layers of width 8.
"""

import math
import pickle

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from flowjax.bijections import Affine
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import Adam

from mixvi.metrics import sliced_wasserstein
from numpyro_mixvi import TARGETS, AutoFlowMixture, FlowMixture, target_model
from numpyro_mixvi.distributions.flow_mixture import partition_trainable
from tests.properties import assert_normalized_2d

SMALL = {"maf": {"num_transforms": 2, "hidden_dims": (8,)},
         "realnvp": {"num_transforms": 2, "hidden_dims": (8,)},
         "rbig": {"max_layers": 6, "num_knots": 40}}
FIT = {"num_steps": 200, "lr": 1e-2, "num_particles": 8, "num_rbig_draws": 512,
       "num_weight_steps": 20, "weight_batch_size": 256, "progress_bar": False}


def bimodal_model():
    """Equal mixture of N((-1.5, 0), 0.5^2 I) and N((1.5, 0.5), 0.5^2 I) on an unbounded latent."""
    locs = jnp.array([[-1.5, 0.0], [1.5, 0.5]])
    mix = dist.MixtureSameFamily(dist.Categorical(probs=jnp.array([0.5, 0.5])),
                                 dist.Normal(locs, 0.5).to_event(1))
    numpyro.sample("x", mix)


_FITS = {}


def fitted(x64):
    """``(guide, params, result)`` of the shared small fit, once per dtype."""
    if x64 not in _FITS:
        guide = AutoFlowMixture(bimodal_model, expert_kwargs=SMALL)  # init_scale 0.1
        params, result = guide.fit(jax.random.PRNGKey(0), **FIT)
        _FITS[x64] = (guide, params, result)
    return _FITS[x64]


def test_fit_result_and_protocol(x64):
    """Weights on the simplex, one loss array per expert, and E[sum_k w_k h(x_k)] = E_q[h]."""
    guide, params, result = fitted(x64)
    dtype = jnp.float64 if x64 else jnp.float32
    assert result.weights.shape == (3,) and result.weights.dtype == dtype
    assert math.isclose(float(result.weights.sum()), 1.0, rel_tol=1e-5)
    assert math.isclose(float(result.n_eff), float(1 / (result.weights**2).sum()), rel_tol=1e-5)
    assert [len(losses) for losses in result.expert_losses] == [FIT["num_steps"]] * 2 + [0]
    assert result.joint_losses.shape == (0,)
    # Stage 1 trains: each expert's KL(q_k || p) (log Z = 0) falls from its value at
    # initialization (scale 0.1 between the modes, ~3 nats) and stays >= 0; 4 standard errors.
    fresh = AutoFlowMixture(bimodal_model, expert_kwargs=SMALL)
    init = fresh.get_posterior(fresh._initial_params(jax.random.PRNGKey(7), (), {}))
    trained = guide.get_posterior(params)
    for k in (0, 1):
        (kl0, se0), (kl1, se1) = (_kl(q.experts[k], jax.random.key(8)) for q in (init, trained))
        assert kl1 < kl0 - 4 * math.hypot(se0, se1) and kl1 > -4 * se1, (kl0, kl1)
    posterior = guide.get_posterior(params)
    assert isinstance(posterior, FlowMixture) and len(posterior.experts) == 3
    n = 4000
    x, log_weights = posterior.sample_components(jax.random.PRNGKey(1), (n,))
    assert x.shape == (n, 3, 2) and log_weights.shape == (n, 3) and x.dtype == dtype
    assert jnp.allclose(jax.nn.logsumexp(log_weights, -1), 0.0, atol=1e-5)
    draws = eqx.filter_jit(posterior.sample)(jax.random.PRNGKey(2), (n,))
    w = jnp.exp(log_weights)[..., None]
    for h in (lambda v: v, lambda v: v**2):
        rb = (w * h(x)).sum(-2)  # (n, D), one RB estimate per particle
        direct = h(draws)
        # Independent estimates: the difference of the means has sd sqrt(var1/n + var2/n);
        # 4.5 sd over 4 coordinates x 2 functions keeps the false-alarm rate below 1e-4.
        se = jnp.sqrt(rb.var(0) / n + direct.var(0) / n)
        assert bool((jnp.abs(rb.mean(0) - direct.mean(0)) < 4.5 * se).all()), (rb.mean(0),
                                                                             direct.mean(0))


def test_pickled_fitted_guide_samples_the_same(x64):
    guide, params, _ = fitted(x64)
    key = jax.random.PRNGKey(6)
    expected = guide.sample_posterior(key, params, sample_shape=(5,))["x"]
    loaded_guide, loaded_params = pickle.loads(pickle.dumps((guide, params)))
    actual = loaded_guide.sample_posterior(key, loaded_params, sample_shape=(5,))["x"]
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_log_prob_integrates_to_one(x64):
    guide, params, _ = fitted(x64)
    log_prob = eqx.filter_jit(guide.get_posterior(params).log_prob)
    dtype = jnp.float64 if x64 else jnp.float32
    density = lambda pts: np.asarray(log_prob(jnp.asarray(pts, dtype)), np.float64)
    # Midpoint rule, 200^2 cells of 0.06 on a box > 6 posterior sd beyond both modes; the
    # experts are no narrower than ~0.3 there, so the O(h^2) error is < 0.005.
    assert_normalized_2d(density, (-6, 6, -5.5, 6.5), num=200, atol=0.02)


def test_mixture_elbo_is_at_least_the_weighted_expert_elbos(x64):
    """ELBO_mix = sum_k pi_k ELBO_k + sum_k pi_k KL(q_k || q_mix) >= sum_k pi_k ELBO_k, <= log Z.

    Estimated per draw from ``sample_components`` (4000 particles); the tolerance is 4 standard
    errors of the per-particle terms.
    """
    guide, params, _ = fitted(x64)
    posterior = guide.get_posterior(params)
    target = bimodal_model_exact()
    n = 4000
    x, log_weights = posterior.sample_components(jax.random.PRNGKey(3), (n,))
    pi = jnp.exp(log_weights[0])
    log_p = target.log_prob(x)  # (n, K)
    mix = ((log_p - posterior.log_prob(x)) * pi).sum(-1)
    own = jnp.stack([log_p[:, k] - e.log_prob(x[:, k])
                     for k, e in enumerate(posterior.experts)], -1)
    gap = mix - (own * pi).sum(-1)  # per-particle estimate of sum_k pi_k KL(q_k || q_mix)
    assert float(gap.mean()) > -4 * float(gap.std()) / n**0.5
    assert float(mix.mean()) < 4 * float(mix.std()) / n**0.5  # log Z = 0


def _kl(q, key, n=4000):
    """``KL(q || p)`` for the bimodal posterior (log Z = 0) and its standard error."""
    x, log_q = q.sample_and_log_prob(key, (n,))
    terms = log_q - bimodal_model_exact().log_prob(x)
    return float(terms.mean()), float(terms.std()) / n**0.5


def bimodal_model_exact():
    locs = jnp.array([[-1.5, 0.0], [1.5, 0.5]])
    return dist.MixtureSameFamily(dist.Categorical(probs=jnp.array([0.5, 0.5])),
                                  dist.Normal(locs, 0.5).to_event(1))


@pytest.mark.parametrize("broken", ["nan", "-inf"])
def test_stage2_broken_expert_gets_zero_weight(broken, x64):
    """Stage 2 alone on two fresh experts, one broken: its weight ends ~0, nothing is NaN."""
    guide = AutoFlowMixture(bimodal_model, experts=("maf", "realnvp"), expert_kwargs=SMALL,
                            init_scale=1.0)
    params = guide._initial_params(jax.random.PRNGKey(4), (), {})
    name = guide._param_name(1)
    if broken == "nan":  # NaN parameters: NaN draws and log-density
        params[name] = [jnp.full_like(leaf, jnp.nan) for leaf in params[name]]
    else:  # scale 1e-30: finite own draws, log q = -inf at the other expert's draws
        expert = guide._expert_from_leaves(1, params[name])
        loc = expert.bijection.loc
        tiny = eqx.tree_at(lambda e: e.bijection, expert, Affine(loc, jnp.full_like(loc, 1e-30)))
        params[name] = jax.tree.leaves(partition_trainable(tiny)[0])
    # Both experts are in the proposal, so the batch-level health mask is exercised too.
    weights = guide._fit_weights(jax.random.PRNGKey(5), [0, 1], params, (), {}, 60, 128, 0.9,
                                 "ema", False)
    assert bool(jnp.isfinite(weights).all()) and math.isclose(float(weights.sum()), 1.0,
                                                              rel_tol=1e-5)
    if broken == "nan":  # weight exactly 0, and the expert leaves the mixture
        assert float(weights[1]) == 0.0
        with pytest.warns(RuntimeWarning, match="leave the mixture"):
            guide._keep_members(params, weights)
        assert guide._active() == [0] and float(params["auto_weights"][0]) == 1.0
        assert len(guide.get_posterior(params).experts) == 1
    else:  # the step's target is 0 every step: weight <= 0.5 * 0.9^60 = 9e-4
        assert float(weights[1]) < 1e-3


def test_stock_elbo_refused():
    guide = AutoFlowMixture(bimodal_model, experts=("maf",), expert_kwargs=SMALL)
    svi = SVI(bimodal_model, guide, Adam(1e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0))
    with pytest.raises(NotImplementedError, match="RBMixture_ELBO"):
        svi.update(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="experts entries"):
        AutoFlowMixture(bimodal_model, experts=("maf", "nsf"))
    with pytest.raises(ValueError, match="experts must name"):
        AutoFlowMixture(bimodal_model, experts=())
    with pytest.raises(ValueError, match="parametric"):
        AutoFlowMixture(bimodal_model, experts=("rbig",))
    with pytest.raises(ValueError, match="init_scale"):
        AutoFlowMixture(bimodal_model, init_scale=0.0)
    with pytest.raises(ValueError, match="rbig"):
        AutoFlowMixture(bimodal_model, expert_kwargs={"rbig": {"num_layers": 3}})
    guide = AutoFlowMixture(bimodal_model, experts=("maf",), expert_kwargs=SMALL)
    key = jax.random.PRNGKey(0)
    for bad in [{"num_steps": 0}, {"num_particles": 0}, {"beta": 1.0}, {"beta": -0.1},
                {"weight_update": "em"}, {"num_weight_steps": 0}, {"num_joint_steps": -1}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            guide.fit(key, progress_bar=False, **bad)
    with pytest.raises(NotImplementedError, match="median"):
        guide.median({})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["amf_x_shape", "bimodal_shared", "multimodal_5"])
def test_fit_beats_each_expert_alone_on_amf_targets(name):
    """The issue's claim on AMF targets: mixture ELBO and sliced W2 beat every expert alone."""
    target = TARGETS[name]()
    options = {"maf": {"num_transforms": 4, "hidden_dims": (32, 32)},
               "realnvp": {"num_transforms": 4, "hidden_dims": (32, 32)}}
    guide = AutoFlowMixture(target_model(target), expert_kwargs=options, init_scale=1.0)
    params, _ = guide.fit(jax.random.PRNGKey(0), num_steps=1500, lr=3e-3, progress_bar=False)
    posterior = guide.get_posterior(params)
    exact = np.asarray(target.sample(jax.random.PRNGKey(1), (2000,)), np.float64)
    candidates = [("mixture", posterior)] + list(zip(guide.experts, posterior.experts, strict=True))
    scores = {}
    for (label, q), key in zip(candidates, jax.random.split(jax.random.key(2), 4), strict=True):
        x = q.sample(key, (4000,))
        scores[label] = (float((target.log_prob(x) - q.log_prob(x)).mean()),
                         float(sliced_wasserstein(np.asarray(x[:2000], np.float64), exact,
                                                  seed=0)))
    mixture = scores.pop("mixture")
    # Same noise levels as the fast test (ELBO sd < 0.05, sliced W2 ~0.02).
    assert all(mixture[0] > elbo for elbo, _ in scores.values()), (mixture, scores)
    assert all(mixture[1] < w2 + 0.02 for _, w2 in scores.values()), (mixture, scores)
