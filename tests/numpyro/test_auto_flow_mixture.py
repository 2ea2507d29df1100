"""AutoFlowMixture (NumPyro): the finite-mixture protocol, the fit's stages, broken experts, errors.

One small guide is fit per dtype and shared by the tests (JAX compile time dominates): a 2-D
two-component Gaussian-mixture posterior, MAF + RBIG experts (2 layers of width 8; RealNVP is
exercised by the conformance suite and the broken-expert test).
"""

import math
import pickle
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
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
         "rbig": {"max_layers": 4, "num_knots": 40}}
SHARED = ("maf", "rbig")
FIT = {"num_steps": 120, "lr": 1e-2, "num_particles": 8, "num_rbig_draws": 256,
       "num_weight_steps": 10, "weight_batch_size": 256, "progress_bar": False}


def bimodal_model():
    """Equal mixture of N((-1.5, 0), 0.5^2 I) and N((1.5, 0.5), 0.5^2 I) on an unbounded latent."""
    locs = jnp.array([[-1.5, 0.0], [1.5, 0.5]])
    mix = dist.MixtureSameFamily(dist.Categorical(probs=jnp.array([0.5, 0.5])),
                                 dist.Normal(locs, 0.5).to_event(1))
    numpyro.sample("x", mix)


# The shared fit compiles for ~30 s of CPU per dtype, so the default run checks the tests built
# on it in float32 and their float64 leg runs with the slow tests.
x64_fast_float32 = pytest.mark.parametrize(
    "x64", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["float32", "float64"],
    indirect=True,
)
_FITS = {}


def fitted(x64):
    """``(guide, params, result)`` of the shared small fit, once per dtype."""
    if x64 not in _FITS:
        guide = AutoFlowMixture(bimodal_model, experts=SHARED, expert_kwargs=SMALL)  # scale 0.1
        params, result = guide.fit(jax.random.PRNGKey(0), **FIT)
        _FITS[x64] = (guide, params, result)
    return _FITS[x64]


@x64_fast_float32
def test_fit_result_and_protocol(x64):
    """Weights on the simplex, one loss array per expert, and E[sum_k w_k h(x_k)] = E_q[h]."""
    guide, params, result = fitted(x64)
    dtype = jnp.float64 if x64 else jnp.float32
    assert result.weights.shape == (2,) and result.weights.dtype == dtype
    assert math.isclose(float(result.weights.sum()), 1.0, rel_tol=1e-5)
    assert math.isclose(float(result.n_eff), float(1 / (result.weights**2).sum()), rel_tol=1e-5)
    assert [len(losses) for losses in result.expert_losses] == [FIT["num_steps"], 0]
    assert result.joint_losses.shape == (0,)
    # Stage 1 trains: each expert's KL(q_k || p) (log Z = 0) falls from its value at
    # initialization (scale 0.1 between the modes, ~3 nats) and stays >= 0; 4 standard errors.
    fresh = AutoFlowMixture(bimodal_model, experts=SHARED, expert_kwargs=SMALL)
    init = fresh.get_posterior(fresh._initial_params(jax.random.PRNGKey(7), (), {}))
    trained = guide.get_posterior(params)
    for k in (0,):
        (kl0, se0), (kl1, se1) = (_kl(q.experts[k], jax.random.key(8)) for q in (init, trained))
        assert kl1 < kl0 - 4 * math.hypot(se0, se1) and kl1 > -4 * se1, (kl0, kl1)
    # At initialization the expert is exactly N(init_loc, 0.1^2 I) (identity flow; a single
    # parametric expert has no spread offset): equal log-densities up to float rounding.
    pts = fresh._init_latent + 0.1 * jax.random.normal(jax.random.key(9), (5, 2), dtype)
    expected = dist.Normal(fresh._init_latent, 0.1).to_event(1).log_prob(pts)
    np.testing.assert_allclose(init.experts[0].log_prob(pts), expected, rtol=1e-5, atol=1e-4)
    posterior = guide.get_posterior(params)
    assert isinstance(posterior, FlowMixture) and len(posterior.experts) == 2
    n = 4000
    x, log_weights = posterior.sample_components(jax.random.PRNGKey(1), (n,))
    assert x.shape == (n, 2, 2) and log_weights.shape == (n, 2) and x.dtype == dtype
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


@x64_fast_float32
def test_stage3_trains_experts_and_weights(x64):
    """Stage 3 (SVI + RBMixture_ELBO, two step sizes) moves every parameter, keeps pi valid."""
    guide, params, _ = fitted(x64)
    joint, losses = guide._fit_joint(jax.random.PRNGKey(9), params, (), {}, 1e-2, 4, 5, False)
    assert losses.shape == (5,) and bool(jnp.isfinite(losses).all())
    weights = joint["auto_weights"]
    assert weights.shape == params["auto_weights"].shape and bool((weights > 0).all())
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-5)
    assert not bool(jnp.allclose(weights, params["auto_weights"]))
    moved = [not bool(jnp.allclose(a, b)) for a, b in zip(joint["auto_expert0_maf"],
                                                          params["auto_expert0_maf"], strict=True)]
    assert any(moved)


@x64_fast_float32
def test_pickled_fitted_guide_samples_the_same(x64):
    guide, params, _ = fitted(x64)
    key = jax.random.PRNGKey(6)
    expected = guide.sample_posterior(key, params, sample_shape=(5,))["x"]
    loaded_guide, loaded_params = pickle.loads(pickle.dumps((guide, params)))
    actual = loaded_guide.sample_posterior(key, loaded_params, sample_shape=(5,))["x"]
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


@x64_fast_float32
def test_log_prob_integrates_to_one(x64):
    guide, params, _ = fitted(x64)
    log_prob = eqx.filter_jit(guide.get_posterior(params).log_prob)
    dtype = jnp.float64 if x64 else jnp.float32
    density = lambda pts: np.asarray(log_prob(jnp.asarray(pts, dtype)), np.float64)
    # Midpoint rule, 200^2 cells of 0.06 on a box > 6 posterior sd beyond both modes; the
    # experts are no narrower than ~0.3 there, so the O(h^2) error is < 0.005.
    assert_normalized_2d(density, (-6, 6, -5.5, 6.5), num=200, atol=0.02)


@x64_fast_float32
def test_mixture_elbo_is_at_least_the_weighted_expert_elbos(x64):
    """ELBO_mix = sum_k pi_k ELBO_k + sum_k pi_k KL(q_k || q_mix) >= sum_k pi_k ELBO_k, <= log Z.

    Estimated per draw from ``sample_components`` (4000 particles); the tolerance is 4 standard
    errors of the per-particle terms.
    """
    guide, params, _ = fitted(x64)
    posterior = guide.get_posterior(params)
    target = bimodal_model_exact()
    n = 4000

    @eqx.filter_jit
    def terms(posterior, key):
        x, log_weights = posterior.sample_components(key, (n,))
        pi = jnp.exp(log_weights[0])
        log_p = target.log_prob(x)  # (n, K)
        mix = ((log_p - posterior.log_prob(x)) * pi).sum(-1)
        own = jnp.stack([log_p[:, k] - e.log_prob(x[:, k])
                         for k, e in enumerate(posterior.experts)], -1)
        return mix, mix - (own * pi).sum(-1)

    # gap: per-particle estimate of sum_k pi_k KL(q_k || q_mix)
    mix, gap = terms(posterior, jax.random.PRNGKey(3))
    assert float(gap.mean()) > -4 * float(gap.std()) / n**0.5
    assert float(mix.mean()) < 4 * float(mix.std()) / n**0.5  # log Z = 0


def _kl(q, key, n=4000):
    """``KL(q || p)`` for the bimodal posterior (log Z = 0) and its standard error."""
    terms = _kl_terms(q, key, n)
    return float(terms.mean()), float(terms.std()) / n**0.5


@eqx.filter_jit
def _kl_terms(q, key, n):
    x, log_q = q.sample_and_log_prob(key, (n,))
    return log_q - bimodal_model_exact().log_prob(x)


def bimodal_model_exact():
    locs = jnp.array([[-1.5, 0.0], [1.5, 0.5]])
    return dist.MixtureSameFamily(dist.Categorical(probs=jnp.array([0.5, 0.5])),
                                  dist.Normal(locs, 0.5).to_event(1))


_BROKEN = {}


@x64_fast_float32
@pytest.mark.parametrize("broken, weight_update", [("nan", "ema"), ("-inf", "ema"),
                                                   ("nan", "elbo")])
def test_stage2_broken_expert_gets_zero_weight(broken, weight_update, x64):
    """Stage 2 alone on two fresh experts, one broken: its weight ends ~0, nothing is NaN."""
    if x64 not in _BROKEN:  # one guide per dtype: both cases reuse its compiled stage 2
        _BROKEN[x64] = AutoFlowMixture(bimodal_model, experts=("maf", "realnvp"),
                                       expert_kwargs=SMALL, init_scale=1.0)
    guide = _BROKEN[x64]
    guide._dropped = set()
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
                                 weight_update, False)
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


@pytest.mark.parametrize("weight_update", ["elbo", "ema"])
def test_expert_stopped_by_stage1_gets_zero_weight(weight_update):
    """An expert missing from stage 1's healthy list (its loss went non-finite; it keeps its last
    finite, untrained parameters) gets weight exactly 0. Before, ELBO weights gave it a small
    positive weight, and on posteriordb gp_regr its draws reached sigma ~ 1e10."""
    if False not in _BROKEN:
        _BROKEN[False] = AutoFlowMixture(bimodal_model, experts=("maf", "realnvp"),
                                         expert_kwargs=SMALL, init_scale=1.0)
    guide = _BROKEN[False]
    guide._dropped = set()
    params = guide._initial_params(jax.random.PRNGKey(4), (), {})  # both finite, at init
    weights = guide._fit_weights(jax.random.PRNGKey(5), [0], params, (), {}, 20, 128, 0.9,
                                 weight_update, False)
    assert weights.tolist() == [1.0, 0.0]


def test_rbig_on_degenerate_importance_draws_is_left_out(monkeypatch):
    """All resampled draws one point (ESS ~ 1, as on posteriordb kidiq): RBIG cannot be fit; it
    is left out with a warning instead of a ValueError that discarded the whole fit."""
    import numpyro_mixvi.guides.flow_mixture as module

    guide, params, _ = fitted(False)
    fitted_rbig = guide._rbig[1]
    monkeypatch.setattr(module, "_systematic_resample",
                        lambda key, weights, num: jnp.zeros(num, jnp.int32))
    with pytest.warns(RuntimeWarning, match="RBIG cannot be fit"):
        guide._fit_rbig(jax.random.PRNGKey(0), [0], params, (), {}, 64, False)
    assert guide._rbig[1] is fitted_rbig  # not refit (in a fresh fit: absent, so not active)


def test_elbo_weights_recover_the_mixing_proportions(x64):
    """Experts N(-4, 1) and N(4, 1), target 0.3 N(-4, 1) + 0.7 N(4, 1): log p - log q_pi is 0
    at pi = (0.3, 0.7) for every draw, and the overlap of the experts is ~e^-8, so the
    estimated ELBO is -KL(pi || (0.3, 0.7)) up to ~1e-4 and its maximizer is (0.3, 0.7)."""
    from numpyro_mixvi.guides.flow_mixture import _elbo_optimal_weights

    experts = [dist.Normal(m, 1.0) for m in (-4.0, 4.0)]
    target = dist.MixtureSameFamily(dist.Categorical(probs=jnp.array([0.3, 0.7])),
                                    dist.Normal(jnp.array([-4.0, 4.0]), 1.0))
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    x = jnp.stack([e.sample(k, (2000,)) for e, k in zip(experts, keys, strict=True)])
    log_q = jnp.stack([e.log_prob(x) for e in experts], -1)  # (K, B, K)
    pi = _elbo_optimal_weights(target.log_prob(x), log_q)
    assert pi.dtype == (jnp.float64 if x64 else jnp.float32)
    np.testing.assert_allclose(pi, [0.3, 0.7], atol=1e-2)


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
    with pytest.raises(ValueError, match="init_spread"):
        AutoFlowMixture(bimodal_model, init_spread=-1.0)
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


def _scores(q, target, exact, key, n):
    """ELBO estimate ``E_q[log p - log q]`` (log Z = 0), its standard error, sliced W2."""
    x, log_q = eqx.filter_jit(lambda q, key: q.sample_and_log_prob(key, (n,)))(q, key)
    terms = np.asarray(target.log_prob(x) - log_q, np.float64)
    sw2 = sliced_wasserstein(np.asarray(x, np.float64), exact)
    return float(terms.mean()), float(terms.std()) / n**0.5, sw2


def _mixture_and_experts_alone(name, seed, *, steps, joint_steps, layers, width, n):
    """The Pyro twin's comparison: the mixture (stages 1-3) against MAF and RealNVP each
    trained alone for the mixture's total gradient steps (2 * steps + joint)."""
    flows = {"num_transforms": layers, "hidden_dims": (width, width)}
    fit = {"num_rbig_draws": 2048, "weight_batch_size": 512, "progress_bar": False}
    key_exact, key_fit, key_score, *keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    target = TARGETS[name]()
    model = target_model(target)
    exact = np.asarray(target.sample(key_exact, (n,)), np.float64)
    guide = AutoFlowMixture(model, expert_kwargs={"maf": flows, "realnvp": flows})
    params, _ = guide.fit(key_fit, num_steps=steps, num_joint_steps=joint_steps, **fit)
    posterior = guide.get_posterior(params)
    score_keys = jax.random.split(jax.random.wrap_key_data(key_score), 4)  # flowjax: typed
    scores = {"mixture": _scores(posterior, target, exact, score_keys[0], n)}
    for (label, key), score_key in zip(zip(("maf", "realnvp"), keys, strict=True),
                                       score_keys[2:], strict=True):
        alone = AutoFlowMixture(model, experts=(label,), expert_kwargs={label: flows})
        params, _ = alone.fit(key, num_steps=2 * steps + joint_steps, num_weight_steps=1,
                              **{**fit, "weight_batch_size": 2})
        scores[label] = _scores(alone.get_posterior(params).experts[0], target, exact,
                                score_key, n)
    return scores


@pytest.mark.slow
@pytest.mark.parametrize("name", ["multimodal_5", "rings"])
def test_mixture_beats_each_expert_alone_on_multimodal_targets(name):
    """Issue 5's claim, as in the Pyro twin (same budget, seeds 0 and 1): the mixture beats MAF
    alone and RealNVP alone at its total budget in ELBO (by 4 standard errors of the seed-mean
    difference) and in sliced W2 (by 0.03, > 5 sds of the metric's Monte Carlo spread)."""
    rows = [_mixture_and_experts_alone(name, seed, steps=400, joint_steps=100, layers=3,
                                       width=64, n=4000) for seed in (0, 1)]
    mean = lambda label, i: sum(r[label][i] for r in rows) / len(rows)  # noqa: E731
    for label in ("maf", "realnvp"):
        se = math.sqrt(sum(r["mixture"][1] ** 2 + r[label][1] ** 2 for r in rows)) / len(rows)
        assert mean("mixture", 0) - mean(label, 0) > 4 * se, (label, rows)
        assert mean("mixture", 2) < mean(label, 2) - 0.03, (label, rows)


@pytest.mark.slow
def test_eight_schools_matches_autonormal_at_the_tutorial_budget():
    """Centered eight schools, 400 steps at lr 5e-3 (the swap-a-guide budget) and 50 stage-3
    steps: no expert goes non-finite, stage 3 runs (it raised a non-finite gradient with
    ("maf", "realnvp") before the experts' log-scales were bounded and identity-initialized),
    and the IS log-evidence estimate is at least AutoNormal's, within 4 standard errors
    (AutoNormal -36.41 +- 0.22; ("maf", "realnvp") with 100 stage-3 steps: -31.9, -32.4)."""
    from numpyro.infer.autoguide import AutoNormal

    from numpyro_mixvi import POSTERIORDB_MODELS, log_evidence
    from tests.eight_schools import CENTERED, EIGHT_SCHOOLS

    eight_schools, data, _ = POSTERIORDB_MODELS[CENTERED](EIGHT_SCHOOLS)
    key = jax.random.PRNGKey(0)
    normal = AutoNormal(eight_schools)
    normal_params = SVI(eight_schools, normal, optax.adam(5e-3), Trace_ELBO(8)).run(
        key, 400, *data, progress_bar=False).params
    baseline = log_evidence(jax.random.PRNGKey(1), normal_params, eight_schools, normal, *data,
                            num_samples=2000)
    guide = AutoFlowMixture(eight_schools)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*non-finite", category=RuntimeWarning)
        params, result = guide.fit(key, *data, num_steps=400, lr=5e-3, num_joint_steps=50,
                                   progress_bar=False)
    assert all(bool(jnp.isfinite(losses).all()) for losses in result.expert_losses)
    evidence = log_evidence(jax.random.PRNGKey(1), params, eight_schools, guide, *data,
                            num_samples=2000)
    assert evidence.estimate > baseline.estimate - 4 * math.hypot(evidence.stderr,
                                                                   baseline.stderr)
