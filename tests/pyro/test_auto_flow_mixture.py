"""AutoFlowMixture: the finite-mixture protocol, the three fitting stages, errors, save/load.

Budgets are tiny in the default run (2-layer flows of width 16, tens of steps); the claim that
the fitted mixture beats each expert alone on AMF targets is checked under ``slow`` and measured
at full budget by ``benchmarks/amf_model.py``.
"""

from __future__ import annotations

import io
import json
import math
import warnings

import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")

import pyro.distributions as dist  # noqa: E402
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceGraph_ELBO  # noqa: E402
from pyro.optim import Adam  # noqa: E402

from mixvi.metrics import sliced_wasserstein  # noqa: E402
from pyro_mixvi import (  # noqa: E402
    RBIG,
    TARGETS,
    AutoFlowMixture,
    FlowMixture,
    RBMixture_ELBO,
    target_model,
)
from tests.properties import assert_normalized_2d  # noqa: E402

SMALL = {"num_transforms": 2, "hidden_dims": (16,)}
SMALL_KWARGS = {"maf": SMALL, "realnvp": SMALL}
TINY_FIT = {"num_steps": 40, "num_particles": 8, "num_rbig_draws": 512, "num_weight_steps": 10,
            "weight_batch_size": 256, "progress_bar": False}


def gaussian_model():
    """x ~ N((1, -2), diag(0.5^2, 1.5^2)): a 2-D posterior with known moments."""
    loc = torch.tensor([1.0, -2.0])
    pyro.sample("x", dist.Normal(loc, torch.tensor([0.5, 1.5])).to_event(1))


def plated_model(y):
    """A positive global scale and a plate of observations (constrained site + plate)."""
    loc = pyro.sample("loc", dist.Normal(y.new_zeros(()), 2.0))
    scale = pyro.sample("scale", dist.LogNormal(y.new_zeros(()), 0.5))
    with pyro.plate("data", y.shape[-1]):
        pyro.sample("obs", dist.Normal(loc, scale), obs=y)


def make_guide(model=gaussian_model, experts=("maf", "realnvp"), **kwargs):
    kwargs.setdefault("expert_kwargs", {k: v for k, v in SMALL_KWARGS.items() if k in experts})
    return AutoFlowMixture(model, experts=experts, **kwargs)


def test_initial_experts_are_the_init_gaussian_and_fit_spreads_them(dtype):
    """Expert k starts as exactly N(init_loc, init_scale^2 I) (identity flow); fit's stage 1
    starts it at init_loc + offset_k, the offsets centered with RMS norm init_spread."""
    from pyro_mixvi.guides.flow_mixture import _spread_offsets

    guide = make_guide(init_scale=0.2, init_spread=0.7)
    guide()
    loc = guide._init_loc()
    posterior = guide.get_posterior()
    assert isinstance(posterior, FlowMixture) and posterior.weights.dtype == dtype
    torch.testing.assert_close(posterior.weights, torch.full((2,), 0.5))
    pts = loc + 0.2 * torch.randn(5, 2)
    expected = dist.Normal(loc, 0.2).to_event(1).log_prob(pts)
    for module in guide.expert_modules:
        with torch.no_grad():
            torch.testing.assert_close(module().log_prob(pts), expected)
    offsets = _spread_offsets(3, loc, 0.7)
    assert offsets.shape == (3, 2) and offsets.dtype == dtype
    torch.testing.assert_close(offsets.mean(0), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(offsets.square().sum(-1).mean().sqrt(), torch.tensor(0.7))
    assert not _spread_offsets(1, loc, 0.7).any() and not _spread_offsets(3, loc, 0.0).any()


def test_rsample_components_is_the_mixture_expectation(dtype):
    """E[sum_k pi_k h(x_k)] equals E_q[h] estimated from ancestral draws."""
    guide = make_guide(init_scale=0.5)
    guide()
    guide.weights = torch.tensor([0.3, 0.7])
    posterior = guide.get_posterior()
    n = 20000
    with torch.no_grad():
        x, log_w = posterior.rsample_components((n,))
        draws = posterior.sample((n,))
    torch.testing.assert_close(log_w.exp()[0], torch.tensor([0.3, 0.7]))

    def h(v):
        return v[..., 0] + v[..., 1] ** 2

    rb = (log_w.exp() * h(x)).sum(-1).double().numpy()
    plain = h(draws).double().numpy()
    # Independent estimates: their difference has sd sqrt(var_rb / n + var_plain / n); 4 sd.
    se = math.sqrt(rb.var() / n + plain.var() / n)
    assert abs(rb.mean() - plain.mean()) < 4 * se


def test_log_prob_integrates_to_one(dtype):
    guide = make_guide(init_scale=0.5)
    guide()
    guide.weights = torch.tensor([0.4, 0.6])
    posterior = guide.get_posterior()
    with torch.no_grad():
        draws = posterior.sample((20000,))
    lo = draws.min(0).values - 2.0
    hi = draws.max(0).values + 2.0
    bounds = (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))

    def log_prob(points):
        with torch.no_grad():
            return posterior.log_prob(torch.as_tensor(points, dtype=dtype)).double().numpy()

    # The box holds every one of 20000 draws plus 2 units of margin (mass outside < 1e-3);
    # 400 cells a side keeps the midpoint-rule error under 0.01 for these smooth densities.
    assert_normalized_2d(log_prob, bounds, num=400, atol=0.02)


def test_fit_runs_all_stages_and_keeps_the_bounds(dtype):
    pyro.set_rng_seed(1)
    guide = make_guide(experts=("maf", "realnvp", "rbig"))
    result = guide.fit(**TINY_FIT, num_joint_steps=5)
    assert len(result.expert_losses) == 3
    assert result.expert_losses[0].shape == (40,) and result.expert_losses[2].shape == (0,)
    assert result.weights.shape == (3,) and result.weights.dtype == dtype
    torch.testing.assert_close(result.weights.sum(), torch.ones(()))
    assert bool((result.weights > 0).all())
    torch.testing.assert_close(result.n_eff, 1 / result.weights.square().sum())
    assert result.joint_losses.shape == (5,) and bool(torch.isfinite(result.joint_losses).all())
    assert isinstance(guide.expert_modules[2], RBIG) and guide.expert_modules[2].centers.shape[0]
    posterior = guide.get_posterior()
    torch.testing.assert_close(posterior.weights.detach(), result.weights)
    # The mixture ELBO is at least the pi-weighted mean of the experts' own ELBOs (log q_mix >=
    # log pi_k + log q_k does not bound it; the exact identity is
    # ELBO_mix = sum_k pi_k ELBO_k + sum_k pi_k KL(q_k || q_mix) >= sum_k pi_k ELBO_k).
    # Each term is a mean over 4000 draws; the tolerance is 4 standard errors of the difference.
    target = dist.Normal(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5])).to_event(1)
    n = 4000
    with torch.no_grad():
        x, log_w = posterior.rsample_components((n,))
        terms = target.log_prob(x) - posterior.log_prob(x)  # (n, K)
        own = torch.stack([target.log_prob(x[:, k]) - d.log_prob(x[:, k])
                           for k, d in enumerate(posterior._dists)], -1)
    pi = log_w[0].exp()
    gap = ((terms - own) * pi).sum(-1).double()  # per-draw estimate of sum_k pi_k KL(q_k||q_mix)
    assert float(gap.mean()) > -4 * float(gap.std()) / math.sqrt(n)
    elbo = float((terms * pi).sum(-1).mean())
    assert elbo <= 1e-2 + 4 * float((terms * pi).sum(-1).std()) / math.sqrt(n)  # log Z = 0


def _expert_kls(guide, n=4000):
    """Per-expert ``E_{q_k}[log q_k - log p]`` (KL(q_k || p), as log Z = 0) and its std error."""
    target = dist.Normal(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5])).to_event(1)
    out = []
    with torch.no_grad():
        for module in guide.expert_modules:
            x, log_q = module().rsample_and_log_prob((n,))
            terms = (log_q - target.log_prob(x)).double()
            out.append((float(terms.mean()), float(terms.std()) / math.sqrt(n)))
    return out


def test_stage1_lowers_each_experts_kl():
    pyro.set_rng_seed(2)
    guide = make_guide(init_scale=0.1)
    guide()
    before = _expert_kls(guide)
    result = guide.fit(**{**TINY_FIT, "num_steps": 150})
    after = _expert_kls(guide)
    assert [len(losses) for losses in result.expert_losses] == [150, 150]
    for (kl0, se0), (kl1, se1) in zip(before, after, strict=True):
        # Init: scale 0.1 against posterior sds 0.5 and 1.5, KL ~ 3 nats. 4 standard errors.
        assert kl1 < kl0 - 4 * math.hypot(se0, se1), (kl0, kl1)
        assert kl1 > -4 * se1  # a KL is non-negative


def test_broken_expert_gets_weight_zero_and_no_nan(dtype):
    pyro.set_rng_seed(3)
    guide = make_guide()
    guide()
    with torch.no_grad():
        guide.expert_modules[0].log_scale.fill_(math.nan)  # MAF now has a NaN density everywhere
    with pytest.warns(RuntimeWarning, match="expert 0"):
        result = guide.fit(**TINY_FIT)
    assert result.expert_losses[0].shape == (0,)
    assert float(result.weights[0]) == 0.0 and float(result.weights[1]) == 1.0
    assert guide.expert_mask.tolist() == [False, True]
    posterior = guide.get_posterior()
    with torch.no_grad():
        x, log_w = posterior.rsample_components((50,))
        assert x.shape == (50, 1, 2) and bool(torch.isfinite(posterior.log_prob(x)).all())
    # The broken expert stays out of an ordinary SVI loop, too.
    svi = SVI(gaussian_model, guide, Adam({"lr": 1e-3}), RBMixture_ELBO(num_particles=4))
    assert math.isfinite(svi.step())


@pytest.mark.parametrize("weight_update", ["elbo", "ema"])
def test_broken_expert_is_switched_off_by_each_weight_rule(weight_update):
    pyro.set_rng_seed(3)
    guide = make_guide()
    guide()
    with torch.no_grad():
        guide.expert_modules[1].log_scale.fill_(math.nan)  # RealNVP: NaN draws and density
    with pytest.warns(RuntimeWarning, match="expert 1"):
        result = guide.fit(**TINY_FIT, weight_update=weight_update)
    assert result.weights.tolist() == [1.0, 0.0] and guide.expert_mask.tolist() == [True, False]


@pytest.mark.parametrize("weight_update", ["elbo", "ema"])
def test_expert_stopped_by_stage1_leaves_the_mixture(monkeypatch, weight_update):
    """An expert whose stage-1 loss went non-finite keeps its last finite parameters: finite
    but untrained. It gets weight 0 (a small positive weight let the NumPyro twin draw sigma of
    1e10 on posteriordb gp_regr). Here expert 1 trains normally and is then marked failed."""
    pyro.set_rng_seed(3)
    guide = make_guide()
    guide()
    fit_experts = guide._fit_experts

    def expert_1_failed(*args, **kwargs):
        losses, healthy = fit_experts(*args, **kwargs)
        return losses, [ok and k != 1 for k, ok in enumerate(healthy)]

    monkeypatch.setattr(guide, "_fit_experts", expert_1_failed)
    result = guide.fit(**TINY_FIT, weight_update=weight_update)
    assert result.weights.tolist() == [1.0, 0.0] and guide.expert_mask.tolist() == [True, False]


def test_rbig_on_degenerate_importance_draws_leaves_the_mixture(monkeypatch):
    """All resampled draws one point (ESS ~ 1, as on posteriordb kidiq): RBIG cannot be fit; it
    is left out with a warning and the parametric experts' fit is kept."""
    import pyro_mixvi.guides.flow_mixture as module

    monkeypatch.setattr(module, "_systematic_resample",
                        lambda log_w, num: log_w.new_zeros(num, dtype=torch.long))
    pyro.set_rng_seed(3)
    guide = make_guide(experts=("maf", "rbig"))
    with pytest.warns(RuntimeWarning, match="RBIG cannot be fit"):
        result = guide.fit(**TINY_FIT)
    assert result.weights.tolist() == [1.0, 0.0] and guide.expert_mask.tolist() == [True, False]
    with torch.no_grad():
        assert bool(torch.isfinite(guide.get_posterior().log_prob(torch.zeros(3, 2))).all())


def test_elbo_weights_recover_the_mixing_proportions(dtype):
    """Experts N(-4, 1) and N(4, 1), target 0.3 N(-4, 1) + 0.7 N(4, 1): log p - log q_pi is 0
    at pi = (0.3, 0.7) for every draw, and the overlap of the experts is ~e^-8, so the
    estimated ELBO is -KL(pi || (0.3, 0.7)) up to ~1e-4 and its maximizer is (0.3, 0.7)."""
    from pyro_mixvi.guides.flow_mixture import _elbo_optimal_weights

    torch.manual_seed(0)
    experts = [dist.Normal(torch.tensor(m), 1.0) for m in (-4.0, 4.0)]
    target = dist.MixtureSameFamily(dist.Categorical(torch.tensor([0.3, 0.7])),
                                    dist.Normal(torch.tensor([-4.0, 4.0]), 1.0))
    x = torch.stack([e.sample((2000,)) for e in experts])  # (K, B)
    log_q = torch.stack([e.log_prob(x) for e in experts], -1)  # (K, B, K)
    pi = _elbo_optimal_weights(target.log_prob(x), log_q)
    assert pi.dtype == dtype
    torch.testing.assert_close(pi, torch.tensor([0.3, 0.7]), atol=1e-2, rtol=0)


def test_every_expert_broken_raises():
    guide = make_guide()
    guide()
    with torch.no_grad():
        for module in guide.expert_modules:
            module.log_scale.fill_(math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(FloatingPointError, match="lower lr"):
            guide.fit(**TINY_FIT)


def test_fit_respects_plates_and_constraints(dtype):
    pyro.set_rng_seed(4)
    y = 1.0 + 0.5 * torch.randn(30)
    guide = make_guide(plated_model, experts=("maf", "rbig"))
    guide.fit(y, **TINY_FIT)
    samples = Predictive(plated_model, guide=guide, num_samples=200)(y)
    assert samples["scale"].shape == (200, 1) and bool((samples["scale"] > 0).all())
    assert samples["obs"].shape == (200, 30) and samples["obs"].dtype == dtype


def test_state_dict_and_torch_save_round_trip_after_fit(tmp_path):
    pyro.set_rng_seed(5)
    guide = make_guide(experts=("maf", "realnvp", "rbig"))
    guide.fit(**TINY_FIT)
    x = torch.randn(7, 2)
    with torch.no_grad():
        expected = guide.get_posterior().log_prob(x)
    state = guide.state_dict()
    pyro.clear_param_store()
    fresh = make_guide(experts=("maf", "realnvp", "rbig"))
    fresh()
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.get_posterior().log_prob(x), expected)
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_posterior().log_prob(x), expected)


@pytest.mark.parametrize(
    "elbo",
    [Trace_ELBO(), Trace_ELBO(num_particles=3, vectorize_particles=True), TraceGraph_ELBO()],
    ids=["Trace_ELBO", "Trace_ELBO-vectorized", "TraceGraph_ELBO"],
)
def test_stock_elbos_raise_and_point_to_rb_mixture_elbo(elbo):
    guide = make_guide()
    with pytest.raises(NotImplementedError, match="RBMixture_ELBO"):
        SVI(gaussian_model, guide, Adam({"lr": 1e-2}), elbo).step()


def test_median_and_quantiles_point_to_predictive():
    guide = make_guide()
    guide()
    with pytest.raises(NotImplementedError, match="Predictive"):
        guide.median()
    with pytest.raises(NotImplementedError, match="Predictive"):
        guide.quantiles([0.5])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"experts": ()}, "experts"),
        ({"experts": ("maf", "glow")}, "glow"),
        ({"experts": ("rbig",)}, "parametric"),
        ({"experts": ("maf",), "expert_kwargs": {"realnvp": {}}}, "expert_kwargs"),
        ({"init_scale": 0.0}, "init_scale"),
        ({"init_spread": -1.0}, "init_spread"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoFlowMixture(gaussian_model, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_particles": 0}, "num_particles"),
        ({"num_weight_steps": 0}, "num_weight_steps"),
        ({"lr": -1.0}, "lr"),
        ({"beta": 1.0}, "beta"),
        ({"weight_update": "mle"}, "weight_update"),
        ({"num_joint_steps": -1}, "num_joint_steps"),
    ],
)
def test_fit_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_guide().fit(**kwargs)


def test_realnvp_on_a_one_dimensional_latent_is_refused():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="realnvp"):
        AutoFlowMixture(model)()


def test_discrete_latent_and_no_latent_errors():
    def discrete():
        pyro.sample("k", dist.Categorical(torch.ones(3)))

    def observed_only():
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ValueError, match="enumeration"):
        AutoFlowMixture(discrete)()
    with pytest.raises(RuntimeError, match="no latent"):
        AutoFlowMixture(observed_only)()


def _elbo_and_sw2(dist_, target, exact, n):
    """ELBO estimate ``E_q[log p - log q]`` (log Z = 0), its standard error, sliced W2."""
    with torch.no_grad():
        x = dist_.sample((n,))
        terms = (target.log_prob(x) - dist_.log_prob(x)).double()
    sw2 = sliced_wasserstein(x.double().numpy(), exact)
    return float(terms.mean()), float(terms.std()) / math.sqrt(n), sw2


def _mixture_and_experts_alone(name, seed, *, steps, joint_steps, layers, hidden, n):
    """Scores (ELBO, its standard error, sliced W2) of the fitted mixture (stages 1-3), of its own
    RBIG, and of MAF and RealNVP each trained **alone** for the mixture's total number of
    gradient steps (``2 * steps + joint_steps``), as ``benchmarks/amf_model.py`` compares them.
    """
    flows = {"num_transforms": layers, "hidden_dims": hidden}
    fit = {"num_rbig_draws": 2048, "num_weight_steps": 30, "weight_batch_size": 512,
           "progress_bar": False}
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    target = TARGETS[name]()
    model = target_model(target)
    exact = target.sample((n,)).double().numpy()
    guide = AutoFlowMixture(model, expert_kwargs={"maf": flows, "realnvp": flows})
    guide.fit(num_steps=steps, num_joint_steps=joint_steps, **fit)
    scores = {"mixture": _elbo_and_sw2(guide.get_posterior(), target, exact, n),
              "rbig": _elbo_and_sw2(guide.expert_modules[2](), target, exact, n)}
    for label in ("maf", "realnvp"):
        pyro.clear_param_store()
        alone = AutoFlowMixture(model, experts=(label,), expert_kwargs={label: flows})
        alone.fit(num_steps=2 * steps + joint_steps,
                  **{**fit, "num_weight_steps": 1, "weight_batch_size": 2})
        scores[label] = _elbo_and_sw2(alone.expert_modules[0](), target, exact, n)
    return scores


def _assert_beats_experts_alone(rows):
    """The mixture's seed-mean ELBO exceeds each parametric expert's alone by 4 standard errors
    of the difference (each ELBO a mean over n draws; seeds independent), and its seed-mean
    sliced W2 is lower by 0.03: two exact samples of 4000-8000 draws of these targets give
    0.015-0.04 with a spread of 0.003-0.006 over repeats (measured), so 0.03 is > 5 sds.
    """
    mean = lambda label, i: sum(r[label][i] for r in rows) / len(rows)  # noqa: E731
    for label in ("maf", "realnvp"):
        se = math.sqrt(sum(r["mixture"][1] ** 2 + r[label][1] ** 2 for r in rows)) / len(rows)
        assert mean("mixture", 0) - mean(label, 0) > 4 * se, (label, rows)
        assert mean("mixture", 2) < mean(label, 2) - 0.03, (label, rows)


def test_small_fit_beats_each_parametric_expert_alone():
    """bimodal_shared at a small budget (150 steps, 2-layer width-16 flows): the mixture beats
    MAF and RealNVP each trained alone for the same total steps (300 + 20), in ELBO and
    sliced W2. The experts start apart (``init_spread``), settle in different modes, and RBIG
    fit to their importance-resampled union covers both."""
    rows = [_mixture_and_experts_alone("bimodal_shared", 0, steps=150, joint_steps=20,
                                       layers=2, hidden=(16,), n=4000)]
    _assert_beats_experts_alone(rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["multimodal_5", "rings"])
def test_mixture_beats_each_expert_alone_on_multimodal_targets(name):
    """Issue 5's claim, seeds 0 and 1: the mixture (400 stage-1 steps per expert, 100 stage-3
    steps, 3-layer width-64 flows) beats MAF alone and RealNVP alone at the mixture's total
    budget (900 steps each) in ELBO and sliced W2. Measured (benchmarks/amf_model.py, this
    configuration): multimodal_5 ELBO -0.036 vs -0.101 / -0.149, sliced W2 0.057 vs 0.168 /
    0.224; rings -1.03 vs -2.02 / -2.19, 0.51 vs 0.89 / 0.95. RBIG has no fit from a model on
    its own (it is fit to the parametric experts' importance-resampled draws); against the
    mixture's own RBIG it wins both metrics on banana and multimodal_5 only, by 2-3 standard
    errors (benchmarks/results/amf_model.md), too thin to pin here.
    """
    rows = [_mixture_and_experts_alone(name, seed, steps=400, joint_steps=100, layers=3,
                                       hidden=(64, 64), n=4000) for seed in (0, 1)]
    _assert_beats_experts_alone(rows)


def test_amf_model_benchmark_quick_run_writes_results(tmp_path):
    from benchmarks import amf_model

    summary = amf_model.run(quick=True, seeds=(0,), targets=("amf_x_shape",),
                            output_dir=tmp_path, steps=20, joint_steps=3)
    saved = json.loads((tmp_path / "amf_model.json").read_text())
    assert saved["targets"].keys() == summary.keys() == {"amf_x_shape"}
    row = summary["amf_x_shape"]
    for model in amf_model.MODELS:
        assert math.isfinite(row[model]["elbo"][0]) and row[model]["sw2"][0] > 0
    assert math.isclose(sum(row["weights"]), 1.0, rel_tol=1e-5)
    assert "| amf_x_shape |" in (tmp_path / "amf_model.md").read_text()


@pytest.mark.slow
def test_eight_schools_experts_stay_finite_and_reach_autonormal_log_evidence():
    """Centered eight schools at the swap-a-guide tutorial's quick budget (lr 5e-3; AutoNormal
    800 SVI steps, the expert 400 stage-1 steps): the MAF expert's importance-sampled log Z is
    at least AutoNormal's minus 3 standard errors of the difference (4000 draws each).
    History: random init -39.3; identity init and lr/10 flow steps -39.9 (xfail) vs AutoNormal
    -36.8; with the layers' log-scales soft-bounded to 2 (EXPERT_MAX_LOG_SCALE) it passes.
    """
    from pyro.infer.autoguide import AutoNormal

    from pyro_mixvi import POSTERIORDB_MODELS, log_evidence
    from tests.eight_schools import CENTERED, EIGHT_SCHOOLS

    eight_schools, data, _ = POSTERIORDB_MODELS[CENTERED](EIGHT_SCHOOLS)

    pyro.set_rng_seed(1)
    normal = AutoNormal(eight_schools)
    svi = SVI(eight_schools, normal, Adam({"lr": 5e-3}), Trace_ELBO())
    for _ in range(800):
        svi.step(*data)
    pyro.set_rng_seed(2)  # the estimates' own draws do not depend on how fit used the stream
    reference = log_evidence(eight_schools, normal, *data, num_samples=4000)
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    guide = AutoFlowMixture(eight_schools, experts=("maf",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no non-finite stage-1 loss
        guide.fit(*data, num_steps=400, lr=5e-3, num_weight_steps=5, progress_bar=False)
    pyro.set_rng_seed(2)
    ours = log_evidence(eight_schools, guide, *data, num_samples=4000)
    assert ours.estimate > reference.estimate - 3 * math.hypot(ours.stderr, reference.stderr)
    # The default three experts and 50 stage-3 steps: no expert goes non-finite (RealNVP did at
    # step 146 with zuko's log-scale bound; measured now, seeds 1-2: log Z -31.9, -34.0).
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    guide = AutoFlowMixture(eight_schools)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        guide.fit(*data, num_steps=400, lr=5e-3, num_joint_steps=50, progress_bar=False)
    pyro.set_rng_seed(2)
    ours = log_evidence(eight_schools, guide, *data, num_samples=4000)
    assert ours.estimate > reference.estimate - 3 * math.hypot(ours.stderr, reference.stderr)
