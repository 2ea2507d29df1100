"""Importance weights of a fitted guide: log evidence and Pareto-k̂ (Pyro backend).

For ``S`` draws ``θ_s ~ q`` the importance log-weights are ``log p(y, θ_s) - log q(θ_s)``.
``log q`` is read from the guide's own trace, so any guide whose trace carries its
log-density works without special cases: mean-field guides, ``AutoContinuous`` guides (the
auxiliary latent plus the Delta sites carrying the log-Jacobian), and guides whose
``log_prob`` is itself an estimate (semi-implicit guides).

The draws run vectorized under a particle plate left of the model's plates (as in Pyro's
``vectorized_importance_weights``), so the model must be broadcast-safe, as for
``Trace_ELBO(vectorize_particles=True)``; ``chunk_size`` bounds how many run at once.

Example:
    >>> guide = AutoNormal(model)                                   # doctest: +SKIP
    >>> ...  # fit with SVI
    >>> log_evidence(model, guide, data, num_samples=4000)          # doctest: +SKIP
    LogEvidence(estimate=-31.42, stderr=0.003)
    >>> psis_diagnostic(model, guide, data, num_samples=4000)       # doctest: +SKIP
    0.21
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled, plate_log_prob_sum
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape

from mixvi.psis import LogEvidence, log_evidence_from_weights, pareto_khat

PARTICLE_PLATE = "num_particles_vectorized"  # the name Pyro's vectorized importance uses


class ImportanceDraws(NamedTuple):
    """Per-draw log densities of one chunk of guide draws, and the traces they came from.

    Attributes:
        log_p: ``(S,)`` log joint ``log p(y, θ_s)``.
        log_q: ``(S,)`` guide log-density ``log q(θ_s)``.
        model_trace: Model trace, the draws on a particle dimension left of the model's plates.
        guide_trace: Guide trace of the same draws.
        max_plate_nesting: Number of model plate dims right of the particle dimension.
    """

    log_p: torch.Tensor
    log_q: torch.Tensor
    model_trace: Any
    guide_trace: Any
    max_plate_nesting: int


def _max_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """Plate dims a single (unvectorized) run of guide and model use."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    dims = [
        -frame.dim
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


def _vectorized_traces(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, num: int, max_plate_nesting: int
):
    """Guide and replayed model traces of ``num`` draws in a particle plate, log-probs packed.

    Like Pyro's ``vectorized_importance_weights``, but the guide trace computes ``log_prob``
    only (no ``score_parts``), so guides whose distributions have no unbiased surrogate
    gradient (mixtures with a discrete component index) still report ``log q``.
    """

    def vectorize(fn):
        def particles(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, num, dim=-(max_plate_nesting + 1)):
                return fn(*args, **kwargs)

        return particles

    guide_trace = poutine.trace(vectorize(guide)).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(vectorize(model), trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting + 1)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    for trace in (model_trace, guide_trace):
        trace.compute_log_prob()
        if is_validation_enabled():
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    check_site_shape(site, max_plate_nesting + 1)
    guide_trace.pack_tensors()
    model_trace.pack_tensors(guide_trace.plate_to_symbol)
    return model_trace, guide_trace


def _chunks(num_samples: int, chunk_size: int | None) -> list[int]:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    if chunk_size is None:
        return [num_samples]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None; got {chunk_size}")
    sizes = [chunk_size] * (num_samples // chunk_size)
    return sizes + ([num_samples % chunk_size] if num_samples % chunk_size else [])


def importance_draws(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    chunk_size: int | None = 1000,
    **kwargs: Any,
) -> list[ImportanceDraws]:
    """Draw ``num_samples`` times from ``guide`` and score each draw under ``model``.

    Args:
        model: Pyro model, broadcast-safe under a particle plate.
        guide: Fitted guide (any callable whose trace carries ``log q``).
        *args, **kwargs: Passed to model and guide.
        num_samples: Number of draws ``S``.
        chunk_size: Draws evaluated at once (bounds memory); ``None`` for all at once.

    Returns:
        One :class:`ImportanceDraws` per chunk, in order.

    Shapes:
        ``log_p`` and ``log_q`` of each chunk: ``(chunk,)``.

    Cost:
        ``S`` vectorized guide and model evaluations, ``chunk_size`` at a time, without
        gradients.

    Raises:
        ValueError: If ``num_samples < 1`` or ``chunk_size < 1``.
        FloatingPointError: If a log-density is NaN (undefined), naming which one.
    """
    sizes = _chunks(num_samples, chunk_size)
    max_plate_nesting = _max_plate_nesting(model, guide, args, kwargs)
    draws = []
    with torch.no_grad():
        for size in sizes:
            model_trace, guide_trace = _vectorized_traces(
                model, guide, args, kwargs, size, max_plate_nesting
            )
            symbol = guide_trace.plate_to_symbol[PARTICLE_PLATE]
            log_p = plate_log_prob_sum(model_trace, symbol).reshape(size)
            log_q = plate_log_prob_sum(guide_trace, symbol).reshape(size)
            for name, value in (
                ("log p(y, θ) of the model", log_p),
                ("log q(θ) of the guide", log_q),
            ):
                if torch.isnan(value).any():
                    raise FloatingPointError(f"{name} is NaN at some guide draws")
            draws.append(ImportanceDraws(log_p, log_q, model_trace, guide_trace, max_plate_nesting))
    return draws


def log_importance_weights(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    chunk_size: int | None = 1000,
    **kwargs: Any,
) -> np.ndarray:
    """``log p(y, θ_s) - log q(θ_s)`` for ``num_samples`` guide draws, as a float64 numpy array.

    Shapes:
        Returns ``(num_samples,)``.
    """
    draws = importance_draws(
        model, guide, *args, num_samples=num_samples, chunk_size=chunk_size, **kwargs
    )
    return np.concatenate([(d.log_p - d.log_q).detach().cpu().double().numpy() for d in draws])


def log_evidence(
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
        model: Pyro model, broadcast-safe under a particle plate.
        guide: Fitted guide.
        *args, **kwargs: Passed to model and guide.
        num_samples: Number of guide draws ``S``.
        chunk_size: Draws evaluated at once (bounds memory); ``None`` for all at once.

    Returns:
        :class:`LogEvidence` ``(estimate, stderr)`` as Python floats.

    Cost:
        ``S`` vectorized guide and model evaluations without gradients.

    Example:
        >>> log_evidence(model, guide, data, num_samples=4000)     # doctest: +SKIP
        LogEvidence(estimate=-31.42, stderr=0.003)

    References:
        Burda, Grosse, Salakhutdinov. Importance Weighted Autoencoders. ICLR 2016.
    """
    return log_evidence_from_weights(
        log_importance_weights(
            model, guide, *args, num_samples=num_samples, chunk_size=chunk_size, **kwargs
        )
    )


def psis_diagnostic(
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
        model, guide, *args, num_samples, chunk_size, **kwargs: As in :func:`log_evidence`.

    Returns:
        k̂ as a Python float.

    Example:
        >>> psis_diagnostic(model, guide, data, num_samples=4000)  # doctest: +SKIP
        0.21

    References:
        Yao, Vehtari, Simpson, Gelman. Yes, but Did It Work?: Evaluating Variational
        Inference. ICML 2018.
    """
    return pareto_khat(
        log_importance_weights(
            model, guide, *args, num_samples=num_samples, chunk_size=chunk_size, **kwargs
        )
    )
