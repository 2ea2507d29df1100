"""posteriordb models: the log density is right (Stein identity on the reference draws).

For a correct log density p in unconstrained coordinates u, E_p[grad_u log p(u)] = 0. On the
reference NUTS draws (near-independent, ESS about n) each coordinate's mean gradient divided by
its Monte Carlo standard error is a z-score; a correct model keeps every |z| below ~4.5 (about
50 coordinates over all posteriors). The second identity E[grad log p(u) (u - m)^T] = -I also
checks the scale. The README's two traps (garch without the triangle
factor, gp_regr with sigma^2) give |z| > 10.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer import Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import potential_energy, unconstrain_fn

from mixvi.bench_data import list_posteriordb, load_posteriordb
from numpyro_mixvi.posteriordb import (
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
NUM_DRAWS = 4000  # every other reference draw
Z_MAX = 4.5
Z_MAX_SECOND = 5.0  # up to 100 entries per posterior, heavier-tailed products


@pytest.fixture(autouse=True)
def _float64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def reference_latents(name, reference):
    """Reference draws of the model's sampled sites (garch samples beta1 / (1 - alpha1))."""
    latents = dict(reference)
    if name == "garch-garch11":
        latents["beta1_frac"] = reference["beta1"] / (1 - reference["alpha1"])
    return latents


def latent_names(model, args, kwargs, latents):
    first = {k: jnp.asarray(v[0]) for k, v in latents.items()}
    trace = handlers.trace(handlers.seed(handlers.substitute(model, first), 0)).get_trace(
        *args, **kwargs)
    return [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]


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
    names = latent_names(model, args, kwargs, latents)
    step = max(len(latents[names[0]]) // num_draws, 1)
    draws = {k: jnp.asarray(latents[k][::step][:num_draws]) for k in names}
    log_density = lambda u: -potential_energy(model, args, kwargs, u)  # noqa: E731
    unconstrain = lambda x: unconstrain_fn(model, args, kwargs, x)  # noqa: E731
    grad = jax.jit(jax.vmap(lambda x: jax.grad(log_density)(unconstrain(x))))(draws)
    n = len(draws[names[0]])
    g = np.concatenate([np.asarray(grad[k]).reshape(n, -1) for k in names], -1)
    u = jax.jit(jax.vmap(unconstrain))(draws)
    u = np.concatenate([np.asarray(u[k], np.float64).reshape(n, -1) for k in names], -1)
    return _z_scores(g, u)


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


@pytest.mark.parametrize("x64_on", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_sites_match_reference_and_predictive(name, x64_on, bench_data):
    """Every reference array is a site of ``Predictive`` fed reference draws, in both dtypes."""
    jax.config.update("jax_enable_x64", x64_on)
    entry = load_posteriordb(name, bench_data)
    model, args, kwargs = POSTERIORDB_MODELS[name](entry.data)
    latents = reference_latents(name, entry.reference)
    names = latent_names(model, args, kwargs, latents)
    draws = {k: jnp.asarray(latents[k][:3]) for k in names}
    out = Predictive(model, posterior_samples=draws, return_sites=list(entry.reference))(
        jax.random.PRNGKey(0), *args, **kwargs)
    for array_name, array in entry.reference.items():
        assert out[array_name].dtype == jnp.result_type(float)
        np.testing.assert_allclose(out[array_name], array[:3], rtol=1e-5 if not x64_on else 1e-10)


# One model per feature (scan + dependent bound, ordered vector + mixture, flat vector): the
# guide set-up compiles for seconds each, and the Pyro twin runs all eight.
@pytest.mark.parametrize("name", ["garch-garch11", "low_dim_gauss_mix-low_dim_gauss_mix",
                                  "kidiq-kidscore_interaction"])
def test_autonormal_vectorized_elbo_runs(name, bench_data):
    """An autoguide and a vectorized ELBO run on the models (flat sites included)."""
    model, args, kwargs = POSTERIORDB_MODELS[name](load_posteriordb(name, bench_data).data)
    guide = AutoNormal(model)
    params = {k: v["value"] for k, v in handlers.trace(handlers.seed(guide, 0)).get_trace(
        *args, **kwargs).items() if v["type"] == "param"}
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    loss = jax.jit(lambda p: elbo.loss(jax.random.PRNGKey(1), p, model, guide, *args, **kwargs))(
        params)
    assert math.isfinite(float(loss))


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
