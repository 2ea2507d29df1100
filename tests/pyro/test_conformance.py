"""Conformance suite: every Pyro guide mixvi ships behaves like a Pyro autoguide.

Each guide registers one line in ``CASES``; every test below runs on every case. The checks
follow the contract a user relies on when swapping ``AutoNormal`` for a mixvi guide
(``ecosystem.md`` §1 and §6): median and quantiles, ``Predictive``, saving and loading,
leading particle dimensions, constrained sites of every common support, helpful errors, both
float dtypes, and the ArviZ bridge.

Register a guide::

    GuideCase("AutoCWM", partial(AutoCWM, num_components=3), RBMixture_ELBO, has_quantiles=False)
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")

import pyro.distributions as dist  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import SVI, Predictive, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import (  # noqa: E402
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_median,
)
from pyro.optim import ClippedAdam  # noqa: E402
from pyro.poutine.util import site_is_subsample  # noqa: E402

from pyro_mixvi import (  # noqa: E402
    SIVI_ELBO,
    AutoCWM,
    AutoFlowMixture,
    AutoSIVI,
    RBMixture_ELBO,
    to_arviz,
)


def _rb_mixture_elbo(*, num_particles=1, vectorize_particles=True, max_plate_nesting=math.inf):
    """RBMixture_ELBO is always vectorized (one model run over all N * K points)."""
    return RBMixture_ELBO(num_particles=num_particles, max_plate_nesting=max_plate_nesting)


class GuideCase(NamedTuple):
    """One guide under test.

    Attributes:
        id: Test id.
        guide: ``(model, *, init_loc_fn) -> guide``.
        elbo: ``(**kwargs) -> ELBO`` accepting ``num_particles``, ``vectorize_particles`` and
            ``max_plate_nesting`` (``Trace_ELBO``-like).
        has_median: The guide implements ``median()``.
        has_quantiles: The guide implements ``quantiles(qs)``.
        param_store: Parameters round-trip through the param store alone (``PyroParam``s; upstream
            ``AutoIAFNormal`` keeps plain ``nn.Parameter``s that a fresh guide does not reload).
        raises_no_latent: The guide raises ``RuntimeError`` on a model without latent sites
            (``AutoContinuous`` does; upstream ``AutoNormal`` does not).
        conjugate_dim: Latent size of the conjugate model: 2 for guides that need ``D >= 2``
            (coupling flows split the coordinates in two).
        num_steps: SVI steps for the short conjugate fit.
        lr: Initial Adam step size for that fit (decays to ~1/10 of it by the last step).
    """

    id: str
    guide: Callable[..., Any]
    elbo: Callable[..., Any] = Trace_ELBO
    has_median: bool = True
    has_quantiles: bool = True
    param_store: bool = True
    raises_no_latent: bool = True
    conjugate_dim: int = 1
    num_steps: int = 300
    lr: float = 0.05


CASES = [
    GuideCase("AutoNormal", AutoNormal, raises_no_latent=False),
    GuideCase("AutoDiagonalNormal", AutoDiagonalNormal),
    GuideCase("AutoMultivariateNormal", AutoMultivariateNormal),
    GuideCase("AutoLowRankMultivariateNormal", partial(AutoLowRankMultivariateNormal, rank=1)),
    GuideCase(
        "AutoIAFNormal",
        AutoIAFNormal,
        has_median=False,
        has_quantiles=False,
        param_store=False,
        num_steps=400,
        lr=0.02,
    ),
    GuideCase(
        "AutoCWM",
        partial(AutoCWM, num_components=3, hidden_dims=(8,)),
        _rb_mixture_elbo,
        has_median=False,
        has_quantiles=False,
    ),
    GuideCase(
        "AutoCWM-flows",
        partial(AutoCWM, num_components=3, hidden_dims=(8,), flow_layers=2),
        _rb_mixture_elbo,
        has_median=False,
        has_quantiles=False,
        param_store=False,
        conjugate_dim=2,
    ),
    GuideCase(
        "AutoFlowMixture",
        partial(AutoFlowMixture, experts=("maf", "maf"),
                expert_kwargs={"maf": {"num_transforms": 2, "hidden_dims": (16,)}}),
        _rb_mixture_elbo,
        has_median=False,
        has_quantiles=False,
        param_store=False,
        lr=0.01,
    ),
    GuideCase(
        "AutoSIVI",
        partial(AutoSIVI, hidden_dims=(16,), proposal_hidden_dims=(16, 16),
                num_importance_samples=32),
        SIVI_ELBO,
        param_store=False,
        lr=0.01,
    ),
]

case_param = pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])

# Conjugate model: mu ~ N(0, 1), y_i | mu ~ N(mu, 1); posterior N(sum(y) / (N + 1), 1 / (N + 1)).
NUM_DATA = 20


def conjugate_model(y):
    """Scalar ``mu`` for data ``(N,)``; ``mu`` in ``R^d`` (independent) for data ``(N, d)``."""
    if y.dim() == 1:
        mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 1.0))
        with pyro.plate("data", y.shape[-1]):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)
        return
    mu = pyro.sample("mu", dist.Normal(y.new_zeros(y.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0).to_event(1), obs=y)


def conjugate_data(dim=1):
    """``(NUM_DATA,)`` data for ``dim == 1``, else ``(NUM_DATA, dim)``."""
    generator = torch.Generator().manual_seed(0)
    shape = (NUM_DATA,) if dim == 1 else (NUM_DATA, dim)
    return (0.7 + torch.randn(shape, generator=generator, dtype=torch.float64)).to(
        torch.get_default_dtype()
    )


def exact_posterior(y):
    return dist.Normal(y.sum(0) / (len(y) + 1), (len(y) + 1.0) ** -0.5)


def constrained_model(y):
    """One latent of each common support, one of them local to a plate; broadcast-safe."""
    zero = y.new_zeros(())
    loc = pyro.sample("loc", dist.Normal(zero, 1.0))  # real
    scale = pyro.sample("scale", dist.LogNormal(zero, 0.5))  # positive
    pyro.sample("p", dist.Beta(zero + 2.0, zero + 2.0))  # unit interval
    pyro.sample("u", dist.Uniform(zero - 1.0, zero + 2.0))  # interval
    pyro.sample("w", dist.Dirichlet(y.new_ones(3)))  # simplex
    pyro.sample("L", dist.LKJCholesky(3, zero + 1.0))  # correlation Cholesky
    base = dist.Normal(y.new_zeros(3), 1.0).to_event(1)
    pyro.sample("c", dist.TransformedDistribution(base, [dist.transforms.OrderedTransform()]))
    with pyro.plate("data", y.shape[-1]):
        tau = pyro.sample("tau", dist.HalfNormal(zero + 1.0))  # positive, local
        pyro.sample("obs", dist.Normal(loc, scale * tau), obs=y)


def discrete_model():
    pyro.sample("z", dist.Bernoulli(0.5))
    pyro.sample("x", dist.Normal(0.0, 1.0))


def observed_only_model(y):
    pyro.sample("obs", dist.Normal(0.0, 1.0), obs=y)


def make_guide(case, model):
    return case.guide(model, init_loc_fn=init_to_median)


def fit(case, model, *args, num_steps=None):
    guide = make_guide(case, model)
    num_steps = case.num_steps if num_steps is None else num_steps
    elbo = case.elbo(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    optim = ClippedAdam({"lr": case.lr, "lrd": 0.1 ** (1 / num_steps)})
    svi = SVI(model, guide, optim, elbo)
    for _ in range(num_steps):
        loss = svi.step(*args)
    assert math.isfinite(loss), f"{case.id}: non-finite loss {loss}"
    return guide


_CONJUGATE_FITS = {}


def fit_conjugate(case):
    """The guide fitted to ``conjugate_model`` (once per case and dtype) and its data."""
    key = (case.id, torch.get_default_dtype())
    if key not in _CONJUGATE_FITS:
        y = conjugate_data(case.conjugate_dim)
        _CONJUGATE_FITS[key] = fit(case, conjugate_model, y), y
    return _CONJUGATE_FITS[key]


@case_param
def test_median(case, dtype):
    if not case.has_median:
        pytest.skip(f"{case.id} defines no median")
    guide, y = fit_conjugate(case)
    median = guide.median(y)["mu"]
    posterior = exact_posterior(y)
    assert median.dtype == dtype and median.shape == ()
    # A short fit: the optimiser's jitter (lr 0.05) is ~0.1 posterior sd; allow 0.5 sd.
    assert abs(float(median - posterior.mean)) < 0.5 * float(posterior.stddev)


@case_param
def test_quantiles(case, dtype):
    if not case.has_quantiles:
        pytest.skip(f"{case.id} defines no quantiles")
    guide, y = fit_conjugate(case)
    probs = [0.1, 0.5, 0.9]
    quantiles = guide.quantiles(probs, y)["mu"]
    assert quantiles.shape == (3,) and quantiles.dtype == dtype
    assert bool((quantiles[1:] > quantiles[:-1]).all())
    exact = exact_posterior(y).icdf(torch.tensor(probs))
    # Gaussian guides hold the exact posterior; the short fit leaves ~0.1 sd of error.
    sd = float(exact_posterior(y).stddev)
    assert float((quantiles - exact).abs().max()) < 0.5 * sd


@case_param
def test_posterior_draws_match_exact_posterior(case, dtype):
    guide, y = fit_conjugate(case)
    with torch.no_grad(), pyro.plate("particles", 2000, dim=-2):
        mu = guide(y)["mu"].reshape(2000, -1)
    posterior = exact_posterior(y)
    sd = float(posterior.stddev.reshape(-1)[0])  # the same in every coordinate
    # Monte Carlo error of the mean is sd / sqrt(2000) ~ 0.02 sd; the fit error dominates.
    assert bool(((mu.mean(0) - posterior.mean).abs() < 0.5 * sd).all())
    ratio = mu.std(0) / sd
    assert bool(((0.6 < ratio) & (ratio < 1.5)).all())


@case_param
def test_predictive(case, dtype):
    y = conjugate_data(case.conjugate_dim)
    guide = fit(case, conjugate_model, y, num_steps=5)
    samples = Predictive(conjugate_model, guide=guide, num_samples=7)(y)
    assert set(samples) >= {"mu", "obs"}
    assert samples["mu"].reshape(7, -1).shape == (7, case.conjugate_dim)
    assert samples["obs"].shape == (7,) + y.shape
    assert samples["obs"].dtype == dtype


def _draw(guide, *args, seed=123):
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        return {name: value.clone() for name, value in guide(*args).items()}


@case_param
def test_torch_save_load(case, dtype):
    y = conjugate_data()
    guide = fit(case, constrained_model, y, num_steps=5)
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    expected, actual = _draw(guide, y), _draw(loaded, y)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


@case_param
def test_state_dict_round_trip(case, dtype):
    y = conjugate_data()
    guide = fit(case, constrained_model, y, num_steps=5)
    expected = _draw(guide, y)
    state = guide.state_dict()
    pyro.clear_param_store()
    fresh = make_guide(case, constrained_model)
    fresh(y)  # lazy set-up creates the parameters that load_state_dict fills
    fresh.load_state_dict(state)
    actual = _draw(fresh, y)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


@case_param
def test_param_store_save_load(case, dtype, tmp_path):
    if not case.param_store:
        pytest.skip(f"{case.id} keeps parameters outside the param store")
    y = conjugate_data()
    guide = fit(case, constrained_model, y, num_steps=5)
    expected = _draw(guide, y)
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    fresh = make_guide(case, constrained_model)
    fresh(y)  # lazy set-up draws from init_loc_fn; keep it out of the seeded draw below
    actual = _draw(fresh, y)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


@case_param
def test_leading_particle_dims(case, dtype):
    y = conjugate_data(case.conjugate_dim)
    guide = fit(case, conjugate_model, y, num_steps=5)
    # vectorize_particles puts the particles in a plate left of the model's plates.
    elbo = case.elbo(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    assert math.isfinite(elbo.loss(conjugate_model, guide, y))
    with torch.no_grad(), pyro.plate_stack("particles", (3, 2), rightmost_dim=-2):
        guide_trace = poutine.trace(guide).get_trace(y)
        model_trace = poutine.trace(poutine.replay(conjugate_model, guide_trace)).get_trace(y)
    assert guide_trace.nodes["mu"]["value"].shape == (3, 2, 1) + y.shape[1:]
    log_lik = model_trace.nodes["obs"]["fn"].log_prob(y)
    assert log_lik.shape == (3, 2, NUM_DATA) and bool(log_lik.isfinite().all())


@case_param
def test_constrained_sites(case, dtype):
    y = conjugate_data()
    guide = fit(case, constrained_model, y, num_steps=20)
    with torch.no_grad(), pyro.plate("particles", 50, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(y)
        model_trace = poutine.trace(poutine.replay(constrained_model, guide_trace)).get_trace(y)
    latent = [
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]
    assert set(latent) == {"loc", "scale", "p", "u", "w", "L", "c", "tau"}
    for name in latent:
        site = model_trace.nodes[name]
        value = site["value"]
        assert value.dtype == dtype, name
        assert bool(site["fn"].support.check(value).all()), f"{name} leaves its support"
        assert bool(site["fn"].log_prob(value).isfinite().all()), name
    assert model_trace.nodes["tau"]["value"].shape == (50, NUM_DATA)


@case_param
def test_discrete_latent_error_names_site(case):
    guide = make_guide(case, discrete_model)
    with pytest.raises(ValueError, match="'z'"):
        guide()


@case_param
def test_no_latent_sites_error(case):
    if not case.raises_no_latent:
        pytest.skip(f"upstream {case.id} accepts a model without latent sites")
    guide = make_guide(case, observed_only_model)
    with pytest.raises(RuntimeError, match="latent"):
        guide(torch.tensor(1.0))


@case_param
def test_to_arviz(case, dtype):
    guide, y = fit_conjugate(case)
    num_samples = 400
    data = to_arviz(conjugate_model, guide, y, num_samples=num_samples)
    assert data.posterior["mu"].shape == (1, num_samples) + y.shape[1:]
    assert data.log_likelihood["obs"].shape == (1, num_samples, NUM_DATA)
    log_w = data.sample_stats["log_p"].values - data.sample_stats["log_q"].values
    assert log_w.shape == (1, num_samples) and np.isfinite(log_w).all()
    posterior = exact_posterior(y)
    sd = float(posterior.stddev.reshape(-1)[0])  # the same in every coordinate
    # Fit error (< 0.5 sd, test_posterior_draws...) plus Monte Carlo error 4 sd / sqrt(400).
    gap = np.abs(data.posterior["mu"].values.mean((0, 1)) - posterior.mean.numpy())
    assert (gap < 0.7 * sd).all()
