"""EM for a Gaussian mixture: the paper's pre-training that seeds a ClassifierWeightedMixture."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax, random


def _component_log_prob(samples, locs, scales, covariance):  # noqa: ANN001, ANN202
    """``log N(x_n; loc_k, S_k)``: ``(N, D)`` to ``(N, K)``."""
    centred = samples[:, None, :] - locs
    if covariance == "diag":
        z = centred / scales
        log_det = jnp.log(scales).sum(-1)
    else:
        tril = jnp.broadcast_to(scales, centred.shape[:-1] + scales.shape[-2:])
        z = lax.linalg.triangular_solve(tril, centred[..., None], left_side=True,
                                        lower=True)[..., 0]
        log_det = jnp.log(jnp.diagonal(scales, axis1=-2, axis2=-1)).sum(-1)
    return -0.5 * (z**2).sum(-1) - log_det - 0.5 * samples.shape[-1] * math.log(2 * math.pi)


@partial(jax.jit, static_argnames=("num_components", "covariance", "num_steps"))
def gaussian_mixture_em(
    rng_key: jax.Array,
    samples: jax.Array,
    num_components: int,
    *,
    covariance: str,
    num_steps: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fit a ``K``-component Gaussian mixture to ``samples (N, D)`` by ``num_steps`` EM steps.

    Starts from ``K`` distinct random data points as means, the data variance as every
    component's variance and uniform weights (as the reference code does). A variance floor of
    ``1e-6`` times the data variance keeps a component from collapsing onto one point.

    Returns:
        ``weights (K,)``, ``locs (K, D)`` and ``scales``: ``(K, D)`` standard deviations
        (``covariance="diag"``) or ``(K, D, D)`` Cholesky factors (``"full"``).
    """
    num_samples, dim = samples.shape
    index = random.choice(rng_key, num_samples, (num_components,), replace=False)
    data_var = samples.var(0, ddof=1)
    floor = 1e-6 * data_var
    if covariance == "diag":
        scales = jnp.broadcast_to(jnp.sqrt(data_var), (num_components, dim))
    else:
        scales = jnp.broadcast_to(jnp.diag(jnp.sqrt(data_var)), (num_components, dim, dim))
    log_weights = jnp.full((num_components,), -math.log(num_components), samples.dtype)
    tiny = jnp.finfo(samples.dtype).tiny

    def step(_, state):  # noqa: ANN001, ANN202
        log_weights, locs, scales = state
        log_joint = _component_log_prob(samples, locs, scales, covariance) + log_weights
        resp = jax.nn.softmax(log_joint, -1)  # (N, K)
        mass = jnp.maximum(resp.sum(0), tiny)
        locs = resp.T @ samples / mass[:, None]
        centred = samples[:, None, :] - locs
        if covariance == "diag":
            var = (resp[..., None] * centred**2).sum(0) / mass[:, None]
            scales = jnp.sqrt(var + floor)
        else:
            cov = jnp.einsum("nk,nki,nkj->kij", resp, centred, centred) / mass[:, None, None]
            scales = jnp.linalg.cholesky(cov + jnp.diag(floor))
        return jnp.log(mass / num_samples), locs, scales

    log_weights, locs, scales = lax.fori_loop(
        0, num_steps, step, (log_weights, samples[index], scales)
    )
    weights = jnp.exp(log_weights)
    return weights / weights.sum(), locs, scales
