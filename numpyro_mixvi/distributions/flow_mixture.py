r"""Heterogeneous mixture of flow experts with global weights (AMF-VI), JAX version.

.. math:: \log q(x) = \operatorname{logsumexp}_k \big(\log \pi_k + \log q_k(x)\big)

Stage 2 (:func:`ema_weights_step`, pure and jittable): the paper's ``"ema"`` update
``pi <- beta pi + (1 - beta) softmax_k(mean_b log q_k(x_b))`` converges to
``pi_k ∝ exp(-CE(p, q_k))``, **not** to maximum-likelihood weights; ``"responsibility"``
averages per-point responsibilities (EM smoothed by the EMA), whose fixed point is the ML
weight vector. Experts are flowjax distributions (``MAF``, ``RealNVP``, ``RBIG``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array
from tqdm.auto import tqdm


class EMAWeightsState(NamedTuple):
    """Stage-2 state: weights ``(K,)`` on the simplex and the step count."""

    weights: Array
    num_steps: Array


class EMAWeightsInfo(NamedTuple):
    """``n_eff = 1 / sum pi^2``, per-expert batch scores ``(K,)`` and the step's target ``(K,)``."""

    n_eff: Array
    scores: Array
    target: Array


def ema_weights_init(num_experts: int, *, dtype=None) -> EMAWeightsState:
    """Uniform weights over ``num_experts``."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1; got {num_experts}")
    dtype = dtype or jnp.result_type(float)
    return EMAWeightsState(jnp.full((num_experts,), 1.0 / num_experts, dtype), jnp.zeros((), int))


def ema_weights_step(
    state: EMAWeightsState,
    log_likelihoods: Array,
    *,
    beta: float = 0.9,
    weight_update: Literal["ema", "responsibility"] = "ema",
    sample_weights: Array | None = None,
) -> tuple[EMAWeightsState, EMAWeightsInfo]:
    """One stage-2 update from ``log q_k(x_b)`` of shape ``(K, B)`` (see the torch docs).

    Non-finite scores count as ``-inf`` (``r_k = 0``, geometric decay); an expert with a NaN
    log-likelihood gets weight exactly 0. If no expert is finite the weights become NaN and
    :func:`fit_weights` raises ``FloatingPointError`` (inside ``jit`` nothing can raise).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1); got {beta}")
    if weight_update not in ("ema", "responsibility"):
        raise ValueError(f"weight_update must be 'ema' or 'responsibility'; got {weight_update!r}")
    batch = log_likelihoods.shape[-1]
    w = jnp.full((batch,), 1.0 / batch, log_likelihoods.dtype)
    w = w if sample_weights is None else sample_weights
    finite = jnp.isfinite(log_likelihoods)
    log_lik = jnp.where(finite, log_likelihoods, -jnp.inf)  # the documented exact rule
    expert_ok = finite.all(-1)
    safe = jnp.where(expert_ok[:, None], log_lik, 0.0)
    scores = jnp.where(expert_ok, (safe * w).sum(-1), -jnp.inf)
    if weight_update == "ema":
        target = jax.nn.softmax(scores)
    else:
        joint = jnp.log(state.weights)[:, None] + log_lik
        covered = jnp.isfinite(joint).any(0)
        resp = jnp.where(covered, jax.nn.softmax(jnp.where(covered, joint, 0.0), 0), 0.0)
        target = (resp * w).sum(-1) / (w * covered).sum()
    weights = beta * state.weights + (1.0 - beta) * target
    weights = jnp.where(jnp.isnan(log_likelihoods).any(-1), 0.0, weights)
    weights = weights / weights.sum()
    info = EMAWeightsInfo(1.0 / (weights**2).sum(), scores, target)
    return EMAWeightsState(weights, state.num_steps + 1), info


class FlowMixture(eqx.Module):
    r"""Mixture of flow experts with global weights: ``q(x) = sum_k pi_k q_k(x)``.

    Shapes:
        ``log_prob`` maps ``(..., D)`` to ``(...)``; ``component_log_probs`` to ``(..., K)``;
        ``sample(key, sample_shape)`` returns ``sample_shape + (D,)``.

    Args:
        experts: ``K`` flowjax distributions over ``R^D`` (e.g. ``MAF``, ``RealNVP``, ``RBIG``).
        weights: Mixture weights ``(K,)``, non-negative, summing to one.

    Cost:
        ``log_prob`` evaluates every expert. Exact sampling draws every expert ``n`` times and
        keeps the one picked by ``Categorical(pi)`` (``K`` times the cost of one expert; static
        shapes under ``jit``).
    """

    experts: tuple
    weights: Array

    def __init__(self, experts: Sequence, weights: Array) -> None:
        if len(experts) < 1:
            raise ValueError("experts must hold at least one expert")
        weights = jnp.asarray(weights)
        if weights.shape != (len(experts),):
            raise ValueError(f"weights must have shape ({len(experts)},); got {weights.shape}")
        self.experts = tuple(experts)
        self.weights = weights / weights.sum()

    @property
    def n_eff(self) -> Array:
        """Effective number of experts ``1 / sum_k pi_k^2``."""
        return 1.0 / (self.weights**2).sum()

    def component_log_probs(self, x: Array) -> Array:
        """``log q_k(x)`` stacked last: ``(..., D) -> (..., K)``."""
        return jnp.stack([e.log_prob(x) for e in self.experts], -1)

    def log_prob(self, x: Array) -> Array:
        # Zero-weight experts contribute exactly nothing (a NaN expert switched off by stage 2
        # cannot reach the density): where() selects -inf for them before the logsumexp.
        terms = jnp.log(self.weights) + self.component_log_probs(x)
        return jax.nn.logsumexp(jnp.where(self.weights > 0, terms, -jnp.inf), -1)

    def sample(self, rng_key: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        keys = jax.random.split(rng_key, len(self.experts) + 1)
        draws = jnp.stack([e.sample(k, sample_shape) for e, k in zip(self.experts, keys[1:],
                                                                      strict=True)], -2)
        index = jax.random.categorical(keys[0], jnp.log(self.weights), shape=sample_shape)
        return jnp.take_along_axis(draws, index[..., None, None], -2)[..., 0, :]

    def sample_and_log_prob(self, rng_key: Array, sample_shape: tuple[int, ...] = ()):
        x = self.sample(rng_key, sample_shape)
        return x, self.log_prob(x)


def fit_weights(
    rng_key: Array,
    experts: Sequence,
    batches: Callable[[Array], Array],
    *,
    num_steps: int = 200,
    beta: float = 0.9,
    weight_update: Literal["ema", "responsibility"] = "ema",
    progress_bar: bool = True,
) -> Array:
    """Stage 2: ``num_steps`` jitted updates on ``batches(key) -> (B, D)``; returns ``pi``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")

    @eqx.filter_jit
    def step(key, state, experts):
        x = batches(key)
        log_lik = jnp.stack([e.log_prob(x) for e in experts])
        return ema_weights_step(state, log_lik, beta=beta, weight_update=weight_update)

    state = ema_weights_init(len(experts))
    bar = tqdm(jax.random.split(rng_key, num_steps), desc="stage 2 (weights)",
               disable=not progress_bar)
    for key in bar:
        state, info = step(key, state, tuple(experts))
        if not bool(jnp.isfinite(state.weights).all()):
            raise FloatingPointError("every expert has a non-finite log-likelihood on a batch")
        bar.set_postfix(n_eff=f"{float(info.n_eff):.2f}")
    return state.weights
