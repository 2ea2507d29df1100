"""posteriordb models: the log density is right (Stein identity on the reference draws).

For a correct log density p in unconstrained coordinates u, E_p[grad_u log p(u)] = 0. On the
reference NUTS draws (near-independent, ESS about n) each coordinate's mean gradient divided by
its Monte Carlo standard error is a z-score; a correct model keeps every |z| below ~4.5 (about
50 coordinates over all posteriors). The second identity E[grad log p(u) (u - m)^T] = -I also
checks the scale. The README's two traps (garch without the triangle
factor, gp_regr with sigma^2) give |z| > 10.
"""

import math

import numpy as np
import pytest
import torch
from pyro import plate, poutine
from pyro.infer.autoguide.initialization import InitMessenger, init_to_value
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from mixvi.bench_data import list_posteriordb, load_posteriordb
from pyro_mixvi.posteriordb import (
    POSTERIORDB_MODELS,
    _garch11,
    _gp_regr,
    register_posteriordb_model,
)

NAMES = [
    "arK-arK",
    "eight_schools-eight_schools_centered",
    "eight_schools-eight_schools_noncentered",
    "garch-garch11",
    "gp_pois_regr-gp_regr",
    "kidiq-kidscore_interaction",
    "kilpisjarvi_mod-kilpisjarvi",
    "low_dim_gauss_mix-low_dim_gauss_mix",
]
NUM_DRAWS = 4000  # every other reference draw: keeps each test to about a second
Z_MAX = 4.5
Z_MAX_SECOND = 5.0  # up to 100 entries per posterior, heavier-tailed products


def reference_latents(name, reference):
    """Reference draws of the model's sampled sites (garch samples beta1 / (1 - alpha1))."""
    latents = dict(reference)
    if name == "garch-garch11":
        latents["beta1_frac"] = reference["beta1"] / (1 - reference["alpha1"])
    return latents


def _latent_sites(model, args, kwargs, latents):
    first = {k: torch.as_tensor(v[0]) for k, v in latents.items()}
    init = InitMessenger(init_to_value(values=first))  # unlike condition, keeps sites latent
    trace = poutine.trace(init(model)).get_trace(*args, **kwargs)
    sites = {n: s for n, s in trace.nodes.items() if s["type"] == "sample"
             and not s["is_observed"] and not site_is_subsample(s)}
    nesting = max([-f.dim for s in trace.nodes.values() if s["type"] == "sample"
                   for f in s["cond_indep_stack"]] + [0])
    return sites, nesting


def _z_scores(g, u):
    """z-scores of both Stein identities from per-draw gradients ``g`` and coordinates ``u``
    ``(n, d)``: ``E[g] = 0`` (d values) and ``E[g (u - E u)^T] = -I`` (d*d values)."""
    n = len(g)
    first = g.mean(0) / (g.std(0, ddof=1) / math.sqrt(n))
    products = g[:, :, None] * (u - u.mean(0))[:, None, :]
    second = (products.mean(0) + np.eye(g.shape[1])) / (products.std(0, ddof=1) / math.sqrt(n))
    return first, second.ravel()


def stein_z_scores(model, args, kwargs, latents, num_draws=NUM_DRAWS):
    """Stein z-scores over the draws: ``E[grad_u log p(u)] = 0`` per unconstrained coordinate,
    and ``E[grad_u log p(u) (u - m)^T] = -I`` per pair of coordinates."""
    sites, nesting = _latent_sites(model, args, kwargs, latents)
    step = max(len(next(iter(latents.values()))) // num_draws, 1)
    values, unconstrained, log_det = {}, [], 0
    for name, site in sites.items():
        x = torch.as_tensor(latents[name][::step][:num_draws])
        n = len(x)
        transform = biject_to(site["fn"].support)
        u = transform.inv(x).detach().requires_grad_()
        x = transform(u)
        log_det = log_det + transform.log_abs_det_jacobian(u, x).reshape(n, -1).sum(-1)
        pad = (1,) * (nesting - len(site["fn"].batch_shape))
        values[name] = x.reshape((n,) + pad + tuple(site["fn"].shape()))
        unconstrained.append(u)
    with plate("draws", n, dim=-nesting - 1):
        trace = poutine.trace(poutine.condition(model, values)).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    log_joint = sum(s["log_prob"].expand((n,) + s["log_prob"].shape[1:]).reshape(n, -1).sum(-1)
                    for s in trace.nodes.values() if "log_prob" in s and not site_is_subsample(s))
    grads = torch.autograd.grad((log_joint + log_det).sum(), unconstrained)
    g = torch.cat([gr.reshape(n, -1) for gr in grads], -1).double().numpy()
    u = torch.cat([v.detach().reshape(n, -1) for v in unconstrained], -1).double().numpy()
    return _z_scores(g, u)


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


def test_registry_covers_the_bench_data(bench_data):
    assert set(list_posteriordb(bench_data)) <= set(POSTERIORDB_MODELS)
    assert set(NAMES) <= set(POSTERIORDB_MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_stein_identity_on_reference_draws(name, bench_data):
    entry = load_posteriordb(name, bench_data)
    model, args, kwargs = POSTERIORDB_MODELS[name](entry.data)
    z, z2 = stein_z_scores(model, args, kwargs, reference_latents(name, entry.reference))
    assert len(z) == entry.info["dimension"]
    print(f"{name}: max |z| = {np.abs(z).max():.2f}, second identity {np.abs(z2).max():.2f}")
    assert np.abs(z).max() < Z_MAX, z
    assert np.abs(z2).max() < Z_MAX_SECOND, z2.reshape(len(z), len(z))


@pytest.mark.parametrize(
    "name, wrong",
    [
        ("garch-garch11", lambda data: _garch11(data, triangle_correction=False)),
        ("gp_pois_regr-gp_regr", lambda data: _gp_regr(data, square_sigma=True)),
    ],
    ids=["garch_without_triangle_factor", "gp_regr_sigma_squared"],
)
def test_readme_traps_fail_the_stein_check(name, wrong, bench_data):
    entry = load_posteriordb(name, bench_data)
    model, args, kwargs = wrong(entry.data)
    z, _ = stein_z_scores(model, args, kwargs, reference_latents(name, entry.reference))
    print(f"{name} (wrong): max |z| = {np.abs(z).max():.2f}")
    assert np.abs(z).max() > 10, z


@pytest.mark.parametrize("name", NAMES)
def test_sites_match_reference_and_broadcast(name, bench_data, dtype):
    """Every reference array is a site; the model runs under a particle plate in both dtypes."""
    entry = load_posteriordb(name, bench_data)
    model, args, kwargs = POSTERIORDB_MODELS[name](entry.data)
    latents = reference_latents(name, entry.reference)
    sites, nesting = _latent_sites(model, args, kwargs, latents)
    draws = {k: torch.as_tensor(v[:3], dtype=dtype) for k, v in latents.items() if k in sites}
    values = {k: v.reshape((3,) + (1,) * (nesting - len(sites[k]["fn"].batch_shape))
                           + tuple(sites[k]["fn"].shape())) for k, v in draws.items()}
    with plate("particles", 3, dim=-nesting - 1):
        trace = poutine.trace(poutine.condition(model, values)).get_trace(*args, **kwargs)
    for array_name, array in entry.reference.items():
        value = trace.nodes[array_name]["value"]
        assert value.dtype == dtype
        np.testing.assert_allclose(value.reshape(array[:3].shape).double().numpy(), array[:3],
                                   rtol=1e-5 if dtype == torch.float32 else 1e-10)
    assert torch.isfinite(trace.log_prob_sum())


def test_register_posteriordb_model_adds_and_overrides():
    @register_posteriordb_model("mine-mine")
    def build(data):
        return (lambda: None), (), {}

    try:
        assert POSTERIORDB_MODELS["mine-mine"] is build
    finally:
        del POSTERIORDB_MODELS["mine-mine"]
    with pytest.raises(ValueError, match="name must be a non-empty posterior name"):
        register_posteriordb_model("")


@pytest.mark.parametrize("name", NAMES)
def test_autonormal_vectorized_elbo_runs(name, bench_data):
    """An autoguide and a vectorized ELBO run on every model (flat sites start feasible)."""
    import pyro.infer
    from pyro.infer.autoguide import AutoNormal, init_to_feasible

    model, args, kwargs = POSTERIORDB_MODELS[name](load_posteriordb(name, bench_data).data)
    guide = AutoNormal(model, init_loc_fn=init_to_feasible)
    elbo = pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True)
    assert math.isfinite(elbo.loss(model, guide, *args, **kwargs))
