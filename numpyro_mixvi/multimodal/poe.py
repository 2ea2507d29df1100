r"""Product-of-experts subset posteriors and their NUTS sampler (JAX).

For observed modalities ``S`` with unimodal posteriors ``q_j(z|x_j)`` fitted to one joint
posterior under the prior ``p(z)``, the subset posterior is

.. math:: p(z | X_S) \propto \prod_{j \in S} q_j(z | x_j) \,/\, p(z)^{|S| - 1},

exact when each ``q_j`` is the true ``p(z|x_j)`` and the modalities are conditionally independent
given ``z``. The power is ``|S| - 1`` (MultiVae's ``main`` divides once, wrong for ``|S| > 2``;
``tests/numpyro/test_jnf_poe.py`` pins ours).

Contents:
    :func:`product_of_experts_log_prob` — the unnormalized log-density above.
    :func:`gaussian_product_of_experts` — closed form for diagonal Gaussian experts times
    ``p(z)^{prior_power}``.
    :func:`sample_product_of_experts` — NumPyro NUTS, one adapted chain per observation, vmapped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.infer import NUTS

__all__ = [
    "gaussian_product_of_experts",
    "product_of_experts_log_prob",
    "sample_product_of_experts",
]


def product_of_experts_log_prob(
    expert_log_probs: Sequence[jax.Array], prior_log_prob: jax.Array
) -> jax.Array:
    r"""``Σ_{j∈S} log q_j(z|x_j) − (|S| − 1) log p(z)``, unnormalized.

    Shapes:
        Every input has the same (broadcastable) shape ``(...)``; so has the result.

    Raises:
        ValueError: If no expert is given.
    """
    if len(expert_log_probs) == 0:
        raise ValueError("expert_log_probs must hold at least one observed modality; got none")
    total = sum(expert_log_probs[1:], expert_log_probs[0])
    return total - (len(expert_log_probs) - 1) * prior_log_prob


def gaussian_product_of_experts(
    locs: Sequence[jax.Array], scales: Sequence[jax.Array], *, prior_power: float
) -> tuple[jax.Array, jax.Array]:
    r"""Normalized ``Π_j N(μ_j, diag σ_j²) · N(0, I)^{prior_power}`` as ``(loc, scale)``.

    Precisions add: ``Λ = Σ_j σ_j^{-2} + prior_power``, ``μ = Λ^{-1} Σ_j σ_j^{-2} μ_j``.

    Shapes:
        Each ``locs[j]``, ``scales[j]``: ``(..., D)``; results ``(..., D)``.

    Args:
        locs: Expert means.
        scales: Expert standard deviations, positive.
        prior_power: ``1`` for MVAE's prior expert; ``-(len(locs) - 1)`` for the JNF subset rule.

    Raises:
        ValueError: If ``locs`` and ``scales`` differ in length or are empty, or (outside ``jit``)
            if the resulting precision is not positive.
    """
    if len(locs) == 0 or len(locs) != len(scales):
        raise ValueError(
            f"locs and scales must be non-empty and of equal length; got {len(locs)} and "
            f"{len(scales)}"
        )
    precisions = [scale**-2 for scale in scales]
    precision = sum(precisions[1:], precisions[0]) + prior_power
    if not isinstance(precision, jax.core.Tracer) and not bool((precision > 0).all()):
        raise ValueError(
            "the product of experts has a non-positive precision (not normalizable); an expert "
            f"is wider than the prior allows for prior_power={prior_power}"
        )
    weighted = [p * m for p, m in zip(precisions, locs, strict=True)]
    loc = sum(weighted[1:], weighted[0]) / precision
    return loc, jax.lax.rsqrt(precision)


def sample_product_of_experts(
    rng_key: jax.Array,
    log_prob_fn: Callable[[jax.Array, Any], jax.Array],
    initial: jax.Array,
    observations: Any = None,
    *,
    num_samples: int = 500,
    num_warmup: int = 300,
    max_tree_depth: int = 8,
) -> jax.Array:
    """Draw from ``B`` densities ``exp(log_prob_fn(z, observations[b]))`` with NumPyro's NUTS.

    Each observation gets its own chain with its own step-size (dual averaging) and diagonal
    mass-matrix adaptation: the NUTS kernel (``potential_fn`` form) is initialized and stepped
    inside one function that ``jax.vmap`` maps over the observations, so the chains run
    vectorized in one compiled loop without sharing adaptation.

    Shapes:
        ``initial``: ``(B, D)``; ``observations``: a pytree of ``(B, ...)`` arrays (or ``None``);
        ``log_prob_fn`` maps one ``(D,)`` point and one observation to a scalar. Returns
        ``(num_samples, B, D)``.

    Args:
        rng_key: PRNG key.
        log_prob_fn: Unnormalized log-density, differentiable in ``z``.
        initial: Starting points.
        observations: Per-row arguments of ``log_prob_fn``.
        num_samples: Draws kept after warm-up; at least 1.
        num_warmup: Adaptation steps (discarded).
        max_tree_depth: NUTS tree depth cap.

    Raises:
        ValueError: On a non-``(B, D)`` ``initial`` or ``num_samples < 1``.
        FloatingPointError: If a draw is non-finite.
    """
    if initial.ndim != 2:
        raise ValueError(f"initial must have shape (B, D); got {tuple(initial.shape)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")

    def one_chain(key, z0, observation):
        kernel = NUTS(
            potential_fn=lambda z: -log_prob_fn(z, observation),
            adapt_step_size=True,
            adapt_mass_matrix=True,
            dense_mass=False,
            max_tree_depth=max_tree_depth,
        )
        state = kernel.init(key, num_warmup, init_params=z0)

        def step(state, _):
            state = kernel.sample(state, (), {})
            return state, state.z

        _, draws = jax.lax.scan(step, state, None, length=num_warmup + num_samples)
        return draws[num_warmup:]

    keys = jax.random.split(rng_key, initial.shape[0])
    draws = jax.jit(jax.vmap(one_chain))(keys, initial, observations)
    if not bool(jnp.isfinite(draws).all()):
        raise FloatingPointError("NUTS returned non-finite draws of the product of experts")
    return jnp.swapaxes(draws, 0, 1)
