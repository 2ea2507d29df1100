"""Importance weights of a fitted guide: log evidence and Pareto-k̂ (NumPyro backend).

For ``S`` draws ``θ_s ~ q`` the importance log-weights are ``log p(y, θ_s) - log q(θ_s)``.
``log q`` is the guide's own trace log-density (``numpyro.infer.util.log_density``), so any
guide whose trace carries its log-density works without special cases: mean-field guides,
``AutoContinuous`` guides (the auxiliary latent plus the Delta sites carrying the
log-Jacobian), and guides whose ``log_prob`` is itself an estimate (semi-implicit guides).

Each draw is one seeded guide trace replayed through the model; draws are vmapped,
``chunk_size`` at a time (``jax.lax.map`` with ``batch_size``), to bound memory.

Example:
    >>> params = svi_result.params                                           # doctest: +SKIP
    >>> log_evidence(rng_key, params, model, guide, data, num_samples=4000)  # doctest: +SKIP
    LogEvidence(estimate=-31.42, stderr=0.003)
    >>> psis_diagnostic(rng_key, params, model, guide, data, num_samples=4000)  # doctest: +SKIP
    0.21
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer.util import log_density

from mixvi.psis import LogEvidence, log_evidence_from_weights, pareto_khat


def _check_sizes(num_samples: int, chunk_size: int | None) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None; got {chunk_size}")


def draw_and_score(
    rng_key: jax.Array,
    params: dict,
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
) -> tuple[jax.Array, jax.Array, dict, dict]:
    """One guide draw scored under the model.

    Returns:
        ``(log_p, log_q, guide_trace, model_trace)`` for a single draw ``θ ~ q``.
    """
    guide_key, model_key = jax.random.split(rng_key)
    seeded_guide = handlers.seed(guide, guide_key)
    log_q, guide_trace = log_density(seeded_guide, args, kwargs, params)
    latents = {
        name: site["value"]
        for name, site in guide_trace.items()
        if site["type"] == "sample" and not site.get("is_observed", False)
    }
    seeded_model = handlers.seed(handlers.substitute(model, data=params), model_key)
    log_p, model_trace = log_density(seeded_model, args, kwargs, latents)
    return log_p, log_q, guide_trace, model_trace


def map_draws(
    fn: Callable[[jax.Array], Any],
    rng_key: jax.Array,
    num_samples: int,
    chunk_size: int | None,
) -> Any:
    """``fn`` over ``num_samples`` split keys, vmapped ``chunk_size`` at a time."""
    _check_sizes(num_samples, chunk_size)
    keys = jax.random.split(rng_key, num_samples)
    if chunk_size is None or chunk_size >= num_samples:
        return jax.vmap(fn)(keys)
    return jax.lax.map(fn, keys, batch_size=chunk_size)


def log_importance_weights(
    rng_key: jax.Array,
    params: dict,
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    chunk_size: int | None = 1000,
    **kwargs: Any,
) -> np.ndarray:
    """``log p(y, θ_s) - log q(θ_s)`` for ``num_samples`` guide draws, as a float64 numpy array.

    Args:
        rng_key: PRNG key.
        params: Guide (and model) parameters, e.g. ``svi.get_params(state)``.
        model: NumPyro model.
        guide: Fitted guide (any callable whose trace carries ``log q``).
        *args, **kwargs: Passed to model and guide.
        num_samples: Number of draws ``S``.
        chunk_size: Draws vmapped at once (bounds memory); ``None`` for all at once.

    Shapes:
        Returns ``(num_samples,)``.

    Raises:
        ValueError: If ``num_samples < 1`` or ``chunk_size < 1``.
        FloatingPointError: If a log-density is NaN (undefined), naming which one.
    """

    def score(key):
        log_p, log_q, _, _ = draw_and_score(key, params, model, guide, args, kwargs)
        return log_p, log_q

    log_p, log_q = map_draws(jax.jit(score), rng_key, num_samples, chunk_size)
    for name, value in (("log p(y, θ) of the model", log_p), ("log q(θ) of the guide", log_q)):
        if bool(jnp.isnan(value).any()):
            raise FloatingPointError(f"{name} is NaN at some guide draws")
    return np.asarray(log_p, dtype=np.float64) - np.asarray(log_q, dtype=np.float64)


def log_evidence(
    rng_key: jax.Array,
    params: dict,
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    chunk_size: int | None = 1000,
    **kwargs: Any,
) -> LogEvidence:
    """Importance-weighted estimate of ``log p(y)`` with its Monte Carlo standard error.

    ``log Ẑ = log mean_s w_s`` with ``w_s = p(y, θ_s) / q(θ_s)``, ``θ_s ~ q``. ``Ẑ`` is
    unbiased for ``p(y)``; ``log Ẑ`` is a stochastic lower bound (Jensen), whose bias
    ``≈ stderr² / 2`` vanishes as ``S`` grows. With the exact posterior as guide every weight
    equals ``p(y)`` and the standard error is zero. The standard error is trustworthy only
    when the weights have finite variance: check :func:`psis_diagnostic` (k̂ < 0.5).

    Args:
        rng_key: PRNG key.
        params: Guide (and model) parameters, e.g. ``svi.get_params(state)``.
        model: NumPyro model.
        guide: Fitted guide.
        *args, **kwargs: Passed to model and guide.
        num_samples: Number of guide draws ``S``.
        chunk_size: Draws vmapped at once (bounds memory); ``None`` for all at once.

    Returns:
        :class:`LogEvidence` ``(estimate, stderr)`` as Python floats.

    Cost:
        ``S`` guide and model evaluations, vmapped ``chunk_size`` at a time.

    Example:
        >>> log_evidence(rng_key, params, model, guide, data, num_samples=4000)  # doctest: +SKIP
        LogEvidence(estimate=-31.42, stderr=0.003)

    References:
        Burda, Grosse, Salakhutdinov. Importance Weighted Autoencoders. ICLR 2016.
    """
    return log_evidence_from_weights(
        log_importance_weights(
            rng_key,
            params,
            model,
            guide,
            *args,
            num_samples=num_samples,
            chunk_size=chunk_size,
            **kwargs,
        )
    )


def psis_diagnostic(
    rng_key: jax.Array,
    params: dict,
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    chunk_size: int | None = 1000,
    **kwargs: Any,
) -> float:
    """Pareto-k̂ of the guide's importance weights (how far the guide can be trusted).

    ``k̂ < 0.5``: good; ``0.5 <= k̂ < 0.7``: usable with care; ``k̂ >= 0.7``: the guide misses
    posterior mass (for example a mode) and importance-based estimates are unreliable.
    Computed by :func:`mixvi.psis.pareto_khat`, so both backends agree on the same weights.
    k̂ is noisy below a few thousand draws.

    Args:
        rng_key, params, model, guide, *args, num_samples, chunk_size, **kwargs: As in
            :func:`log_evidence`.

    Returns:
        k̂ as a Python float.

    Example:
        >>> psis_diagnostic(rng_key, params, model, guide, data, num_samples=4000)  # doctest: +SKIP
        0.21

    References:
        Yao, Vehtari, Simpson, Gelman. Yes, but Did It Work?: Evaluating Variational
        Inference. ICML 2018.
    """
    return pareto_khat(
        log_importance_weights(
            rng_key,
            params,
            model,
            guide,
            *args,
            num_samples=num_samples,
            chunk_size=chunk_size,
            **kwargs,
        )
    )
