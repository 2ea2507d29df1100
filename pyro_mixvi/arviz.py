"""A fitted Pyro guide as ArviZ data: posterior, pointwise log-likelihood, log p and log q.

:func:`to_arviz` draws ``S`` times from the guide under a particle plate (the draws of
:func:`pyro_mixvi.diagnostics.importance_draws`), replays them through the model, and hands
numpy arrays to :func:`mixvi.arviz_bridge.from_draws`: ``InferenceData`` on ArviZ 0.x,
``DataTree`` on 1.x, with ``(chain=1, draw=S)`` so ``az.summary(data, kind="stats")``,
``az.loo`` and (1.x) ``az.loo_approximate_posterior`` work.

Example:
    >>> data = to_arviz(model, guide, x, y, num_samples=1000)     # doctest: +SKIP
    >>> az.summary(data, kind="stats")                            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from mixvi.arviz_bridge import from_draws
from pyro_mixvi.diagnostics import importance_draws


def _single_run_shapes(model: Callable, guide: Callable, args: tuple, kwargs: dict):
    """Per-site value shapes, pointwise log-likelihood shapes and observed values of one run."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    shapes, observed = {}, {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if _is_observed(site):
            observed[name] = value = site["value"]
            pointwise = site["fn"].log_prob(value).shape
            data_shape = value.shape[: value.dim() - site["fn"].event_dim]
            # Key the pointwise log-likelihood by the data's shape when the model broadcast
            # extra singleton dims into the likelihood's batch shape.
            shapes[name] = data_shape if data_shape.numel() == pointwise.numel() else pointwise
        else:
            shapes[name] = site["value"].shape
    return shapes, observed


def _is_observed(site: dict) -> bool:
    return site["is_observed"] and not site["infer"].get("_deterministic", False)


def _particles_first(
    value: torch.Tensor, num: int, particle_dim: int, shape: torch.Size
) -> torch.Tensor:
    """Move the particle dim (``particle_dim`` from the right) first; drop unused plate dims."""
    if value.dim() >= particle_dim:
        value = value.movedim(-particle_dim, 0)
    else:  # the value does not vary across particles
        value = value[None]
    rest = list(value.shape[1:])
    while len(rest) > len(shape) and rest[0] == 1:
        rest.pop(0)
    return value.reshape(value.shape[0], *rest).expand(num, *shape)


def to_arviz(
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
        model: Pyro model, broadcast-safe under a particle plate.
        guide: Fitted guide.
        *args, **kwargs: Passed to model and guide.
        num_samples: Number of draws ``S``.
        chunk_size: Draws evaluated at once (bounds memory); ``None`` for all at once.
        dims, coords: Passed to ArviZ (``dims={"obs": ["N"]}``).

    Returns:
        ``InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ 1.x), ``(chain=1, draw=S)``.

    Shapes:
        ``posterior[site]``: ``(1, S, *site_shape)``; ``log_likelihood[site]``:
        ``(1, S, *batch_shape)``; ``sample_stats.log_p``, ``log_q``: ``(1, S)``.

    Example:
        >>> data = to_arviz(model, guide, x, y, num_samples=2000)  # doctest: +SKIP
        >>> az.loo(data)                                          # doctest: +SKIP
    """
    shapes, observed = _single_run_shapes(model, guide, args, kwargs)
    draws = importance_draws(
        model, guide, *args, num_samples=num_samples, chunk_size=chunk_size, **kwargs
    )
    posterior: dict[str, list] = {}
    log_likelihood: dict[str, list] = {}
    for chunk in draws:
        num = chunk.log_p.shape[0]
        for name, site in chunk.model_trace.nodes.items():
            if name not in shapes or site["type"] != "sample":
                continue
            if _is_observed(site):
                pointwise = site["fn"].log_prob(site["value"])
                value = _particles_first(pointwise, num, chunk.max_plate_nesting + 1, shapes[name])
                log_likelihood.setdefault(name, []).append(value)
            else:
                particle_dim = chunk.max_plate_nesting + 1 + site["fn"].event_dim
                value = _particles_first(site["value"], num, particle_dim, shapes[name])
                posterior.setdefault(name, []).append(value)

    def stack(parts):
        return torch.cat(parts).detach().cpu().numpy()

    return from_draws(
        {name: stack(parts) for name, parts in posterior.items()},
        log_likelihood={name: stack(parts) for name, parts in log_likelihood.items()},
        observed_data={name: v.detach().cpu().numpy() for name, v in observed.items()},
        log_p=stack([chunk.log_p for chunk in draws]),
        log_q=stack([chunk.log_q for chunk in draws]),
        dims=dims,
        coords=coords,
    )
