"""MAF and RealNVP factories (flowjax): exact densities in any dimension, conditional or not."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import paramax
import pytest

from numpyro_mixvi.flows import MAF, RealNVP
from tests.properties import assert_normalized_2d

# name -> (factory, input_dim, context_dim); D > 2 is where the reference MAF goes wrong.
FLOWS = {
    "MAF (D=5)": (MAF, 5, 0),
    "MAF (D=4, context)": (MAF, 4, 3),
    "RealNVP (D=5)": (RealNVP, 5, 0),
    "RealNVP (D=3, context)": (RealNVP, 3, 2),
}


def _perturb(flow, key, scale):
    """Random (non-identity) weights so the checks exercise real couplings and context paths."""
    params, static = eqx.partition(flow, eqx.is_inexact_array)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    pairs = zip(leaves, keys, strict=True)
    leaves = [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in pairs]
    return eqx.combine(jax.tree_util.tree_unflatten(tree, leaves), static)


def _build(name):
    factory, dim, ctx = FLOWS[name]
    flow = factory(jax.random.key(0), dim, context_dim=ctx, num_transforms=2, hidden_dims=(16, 16))
    flow = _perturb(flow, jax.random.key(1), 0.3)
    context = jax.random.normal(jax.random.key(2), (ctx,)) if ctx else None
    return flow, dim, context


def _tol(x64):
    return 1e-4 if x64 else 2e-3


@pytest.mark.parametrize("name", list(FLOWS))
def test_log_prob_equals_base_plus_autodiff_logdet(name, x64):
    flow, dim, context = _build(name)
    x = jax.random.normal(jax.random.key(3), (dim,))

    @eqx.filter_jit
    def both(flow, x, context):
        data_to_base = lambda v: flow.bijection.inverse(v, context)
        jac = jax.jacobian(data_to_base)(x)
        expected = flow.base_dist.log_prob(data_to_base(x)) + jnp.linalg.slogdet(jac)[1]
        return flow.log_prob(x, context), expected

    log_q, expected = both(flow, x, context)
    assert log_q.dtype == x.dtype
    assert jnp.allclose(log_q, expected, atol=_tol(x64), rtol=_tol(x64))


@pytest.mark.parametrize("name", list(FLOWS))
def test_round_trip_and_fused(name, x64):
    flow, dim, context = _build(name)

    @eqx.filter_jit
    def run(flow, context):
        x, log_q = flow.sample_and_log_prob(jax.random.key(4), (7,), context)
        bij = flow.bijection
        back = jax.vmap(lambda v: bij.transform(bij.inverse(v, context), context))(x)
        return x, log_q, back, flow.log_prob(x, context)

    x, log_q, back, log_q_again = run(flow, context)
    assert x.shape == (7, dim) and log_q.shape == (7,)
    assert jnp.allclose(back, x, atol=10 * _tol(x64))
    assert jnp.allclose(log_q_again, log_q, atol=_tol(x64), rtol=_tol(x64))


@pytest.mark.parametrize("name", [n for n in FLOWS if FLOWS[n][2]])
def test_context_batches_and_matters(name, x64):
    flow, dim, _ = _build(name)
    ctx = FLOWS[name][2]
    context = jax.random.normal(jax.random.key(5), (2, 3, ctx))
    x = eqx.filter_jit(flow.sample)(jax.random.key(6), (4,), context)
    log_prob = eqx.filter_jit(flow.log_prob)
    assert x.shape == (4, 2, 3, dim)
    assert log_prob(x, context).shape == (4, 2, 3)
    point = jnp.zeros(dim)
    assert not jnp.allclose(log_prob(point, context[0, 0]), log_prob(point, context[1, 2]))


@pytest.mark.parametrize("factory", [MAF, RealNVP], ids=["MAF", "RealNVP"])
def test_normalized_in_2d(factory, x64):
    flow = factory(jax.random.key(0), 2, num_transforms=2, hidden_dims=(8,))
    flow = _perturb(flow, jax.random.key(1), 0.2)
    log_prob = eqx.filter_jit(flow.log_prob)
    # 300x300 midpoint rule on [-10, 10]^2: O(h^2) error far below atol for an O(1) density.
    density = lambda pts: np.asarray(log_prob(jnp.asarray(pts)))
    assert_normalized_2d(density, (-10, 10, -10, 10), atol=0.02)


@pytest.mark.parametrize("factory", [MAF, RealNVP], ids=["MAF", "RealNVP"])
def test_fit_beats_gaussian_in_4d(factory, x64):
    """A dependence a Gaussian cannot express (x2 = x0 * x1 + noise) in D=4, fit by ML."""

    def draw(key, n):
        base = jax.random.normal(key, (n, 4))
        return base.at[:, 2].set(base[:, 0] * base[:, 1] + 0.3 * base[:, 2])

    train, test = draw(jax.random.key(10), 2000), draw(jax.random.key(11), 2000)
    flow = factory(jax.random.key(0), 4, num_transforms=4, hidden_dims=(32, 32))
    params, static = eqx.partition(flow, eqx.is_inexact_array)
    opt = optax.adam(5e-3)

    def loss(p):
        return -paramax.unwrap(eqx.combine(p, static)).log_prob(train).mean()

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        updates, s = opt.update(g, s)
        return optax.apply_updates(p, updates), s

    state = opt.init(params)
    for _ in range(120):  # early-stopped: longer runs overfit 2000 points
        params, state = step(params, state)
    fitted = paramax.unwrap(eqx.combine(params, static))
    nll_flow = float(-eqx.filter_jit(fitted.log_prob)(test).mean())
    mean, cov = train.mean(0), jnp.cov(train.T)
    nll_gauss = float(-jax.scipy.stats.multivariate_normal.logpdf(test, mean, cov).mean())
    # Gaussian NLL ~5.6 nats vs true entropy ~4.9; MC sd of a 2000-point mean NLL is ~0.02,
    # so a 0.2-nat margin is ~10 standard errors.
    assert math.isfinite(nll_flow) and nll_flow < nll_gauss - 0.2, (nll_flow, nll_gauss)


@pytest.mark.parametrize("factory", [MAF, RealNVP], ids=["MAF", "RealNVP"])
def test_max_log_scale_bounds_every_layer(factory):
    """Huge conditioner outputs: each of the 3 layers scales each of the 4 coordinates by at
    most e^0.5, so |log det| < 3 * 4 * 0.5 = 6 everywhere; the unbounded flow exceeds it."""
    x = 3 * jax.random.normal(jax.random.key(0), (500, 4))
    log_dets = []
    for bound in (0.5, None):
        flow = factory(jax.random.key(1), 4, num_transforms=3, hidden_dims=(16,),
                       max_log_scale=bound)
        bijection = paramax.unwrap(_perturb(flow, jax.random.key(2), 30.0)).bijection
        log_dets.append(float(jnp.abs(jax.vmap(bijection.inverse_and_log_det)(x)[1]).max()))
    assert log_dets[0] < 6 < log_dets[1], log_dets


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_dim": 0}, "input_dim"),
        ({"input_dim": 3, "context_dim": -1}, "context_dim"),
        ({"input_dim": 3, "num_transforms": 0}, "num_transforms"),
        ({"input_dim": 3, "hidden_dims": ()}, "hidden_dims"),
        ({"input_dim": 3, "hidden_dims": (16, 32)}, "one width"),
    ],
)
def test_bad_arguments(kwargs, match):
    for factory in (MAF, RealNVP):
        with pytest.raises(ValueError, match=match):
            factory(jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match="input_dim"):
        RealNVP(jax.random.key(0), 1)
