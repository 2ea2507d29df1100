"""A fitted NumPyro guide as ArviZ data: posterior, pointwise log-likelihood, log p and log q.

:func:`to_arviz` draws ``S`` times from the guide (seeded traces vmapped ``chunk_size`` at a
time, as in :mod:`numpyro_mixvi.diagnostics`), replays them through the model, and hands
numpy arrays to :func:`mixvi.arviz_bridge.from_draws`: ``InferenceData`` on ArviZ 0.x,
``DataTree`` on 1.x, with ``(chain=1, draw=S)`` so ``az.summary(data, kind="stats")``,
``az.loo`` and (1.x) ``az.loo_approximate_posterior`` work.

Example:
    >>> data = to_arviz(rng_key, params, model, guide, x, y)      # doctest: +SKIP
    >>> az.summary(data, kind="stats")                            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from numpyro import handlers

from mixvi.arviz_bridge import from_draws
from numpyro_mixvi.diagnostics import draw_and_score, map_draws


def _is_observed(site: dict) -> bool:
    return site["type"] == "sample" and site.get("is_observed", False)


def _is_posterior(site: dict) -> bool:
    return (site["type"] == "sample" and not site.get("is_observed", False)) or site[
        "type"
    ] == "deterministic"


def to_arviz(
    rng_key: jax.Array,
    params: dict,
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    chunk_size: int | None = 1000,
    dims: Mapping[str, list[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """ArviZ data from ``num_samples`` draws of a fitted guide.

    Groups: ``posterior`` (every latent and deterministic site, constrained), ``log_likelihood``
    (pointwise ``log p(y_i | θ)`` per observed site, plates kept), ``observed_data`` and
    ``sample_stats`` with ``log_p = log p(y, θ)`` and ``log_q = log q(θ)`` per draw.

    Args:
        rng_key: PRNG key.
        params: Guide (and model) parameters, e.g. ``svi.get_params(state)``.
        model: NumPyro model.
        guide: Fitted guide.
        *args, **kwargs: Passed to model and guide.
        num_samples: Number of draws ``S``.
        chunk_size: Draws vmapped at once (bounds memory); ``None`` for all at once.
        dims, coords: Passed to ArviZ (``dims={"obs": ["N"]}``).

    Returns:
        ``InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ 1.x), ``(chain=1, draw=S)``.

    Shapes:
        ``posterior[site]``: ``(1, S, *site_shape)``; ``log_likelihood[site]``:
        ``(1, S, *batch_shape)``; ``sample_stats.log_p``, ``log_q``: ``(1, S)``.

    Example:
        >>> data = to_arviz(rng_key, params, model, guide, x, y, num_samples=2000)  # doctest: +SKIP
        >>> az.loo_approximate_posterior(data, data.sample_stats.log_p,
        ...                              data.sample_stats.log_q)                  # doctest: +SKIP
    """

    def one_draw(key):
        log_p, log_q, _, model_trace = draw_and_score(key, params, model, guide, args, kwargs)
        posterior = {n: s["value"] for n, s in model_trace.items() if _is_posterior(s)}
        log_lik = {
            n: s["fn"].log_prob(s["value"]) for n, s in model_trace.items() if _is_observed(s)
        }
        return log_p, log_q, posterior, log_lik

    log_p, log_q, posterior, log_lik = map_draws(
        jax.jit(one_draw), rng_key, num_samples, chunk_size
    )
    trace = handlers.trace(handlers.seed(handlers.substitute(model, data=params), 0)).get_trace(
        *args, **kwargs
    )
    observed = {n: np.asarray(s["value"]) for n, s in trace.items() if _is_observed(s)}
    return from_draws(
        jax.tree.map(np.asarray, posterior),
        log_likelihood=jax.tree.map(np.asarray, log_lik),
        observed_data=observed,
        log_p=np.asarray(log_p),
        log_q=np.asarray(log_q),
        dims=dims,
        coords=coords,
    )
