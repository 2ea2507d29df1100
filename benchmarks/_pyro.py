"""Pyro side of the harness: fit a guide, draw from it with importance weights, time a step.

Imported only for Pyro runs (it imports torch); :mod:`benchmarks._numpyro` is its JAX twin with
the same functions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.optim import ExponentialLR

from benchmarks.guides import GuideSpec
from benchmarks.memory import PeakMemory
from pyro_mixvi.diagnostics import importance_draws


class Fitted(NamedTuple):
    """A trained guide with what is needed to draw from it again."""

    model: Callable
    guide: Any
    args: tuple
    kwargs: dict
    losses: np.ndarray


def _check_finite(loss: float, step: int, spec: GuideSpec) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"{spec.name}: the ELBO loss is {loss} at step {step}")


def _start(model: Callable, args: tuple, kwargs: dict, spec: GuideSpec, budget: Any, seed: int):
    """Build guide, ELBO and SVI and take the first step, with vectorized particles if the model
    allows them (a model that does not broadcast over a particle plate falls back to a loop)."""
    for vectorize in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = spec.make_guide(model)
        elbo = spec.make_elbo(budget.num_particles, vectorize=vectorize)
        optim = ExponentialLR(
            {
                "optimizer": torch.optim.Adam,
                "optim_args": {"lr": budget.learning_rate},
                "gamma": budget.lr_decay,
            }
        )
        svi = SVI(model, guide, optim, elbo)
        try:
            loss = svi.step(*args, **kwargs)
        except (ValueError, RuntimeError, IndexError) as error:
            if not vectorize or budget.num_particles == 1:
                raise
            fallback_error = error
            continue
        optim.step()
        return guide, svi, loss, vectorize
    raise fallback_error  # pragma: no cover (the loop returns or raises)


def fit(
    model: Callable, args: tuple, kwargs: dict, spec: GuideSpec, budget: Any, seed: int
) -> Fitted:
    """Train ``spec``'s guide on ``model`` for ``budget.num_steps`` Adam steps.

    A guide with ``spec.trainer == "fit"`` trains by its own staged ``fit`` instead
    (:meth:`GuideSpec.fit_keywords`); its losses are the stages' losses end to end.

    Raises:
        FloatingPointError: If the loss becomes non-finite (the message names the step).
    """
    if spec.trainer == "fit":
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = spec.make_guide(model)
        result = guide.fit(*args, **spec.fit_keywords(budget), **kwargs)
        losses = torch.cat([*result.expert_losses, result.joint_losses]).detach()
        return Fitted(model, guide, args, kwargs, losses.double().numpy())
    guide, svi, loss, _ = _start(model, args, kwargs, spec, budget, seed)
    losses = [loss]
    _check_finite(loss, 0, spec)
    for step in range(1, budget.num_steps):
        loss = svi.step(*args, **kwargs)
        svi.optim.step()
        _check_finite(loss, step, spec)
        losses.append(loss)
    return Fitted(model, guide, args, kwargs, np.asarray(losses))


def _is_draw_site(site: dict) -> bool:
    if site["type"] != "sample":
        return False
    return not site["is_observed"] or bool(site["infer"].get("_deterministic"))


@torch.no_grad()
def draws_and_log_weights(fitted: Fitted, num_draws: int, seed: int) -> tuple[dict, np.ndarray]:
    """``num_draws`` guide draws of every latent and deterministic site, in constrained space,
    and their importance log-weights ``log p(x, y) - log q(x)`` (for k-hat and log-evidence),
    from :func:`pyro_mixvi.diagnostics.importance_draws` (one vectorized chunk).

    Shapes:
        Each draw array is ``(num_draws, *site_shape)``; log-weights are ``(num_draws,)``.
    """
    pyro.set_rng_seed(seed)
    (chunk,) = importance_draws(
        fitted.model, fitted.guide, *fitted.args, num_samples=num_draws, chunk_size=None,
        **fitted.kwargs,
    )
    draws = {
        name: site["value"].double().reshape(num_draws, -1).numpy()
        for name, site in chunk.model_trace.nodes.items()
        if _is_draw_site(site) and site["value"].dim() > 0 and site["value"].shape[0] == num_draws
    }
    return draws, (chunk.log_p - chunk.log_q).double().numpy()


def blr_model(X: torch.Tensor, y: torch.Tensor | None = None, prior_scale: float = 10.0) -> None:
    """Bayesian logistic regression: ``w ~ N(0, prior_scale^2 I)``, ``y_i ~ Bern(sigmoid(x_i w))``.

    Shapes:
        ``X`` is ``(N, D)``, ``y`` is ``(N,)``; the latent ``w`` is ``(D,)``.
    """
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), prior_scale).to_event(1))
    with pyro.plate("data", X.shape[0]):
        # (X * w).sum(-1) broadcasts over a leading particle dimension of w.
        pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1)), obs=y)


def blr_args(X: np.ndarray, y: np.ndarray) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of :func:`blr_model` from numpy data, in torch's default dtype."""
    dtype = torch.get_default_dtype()
    return (torch.as_tensor(X, dtype=dtype), torch.as_tensor(y, dtype=dtype)), {}


def time_steps(
    model: Callable,
    args: tuple,
    kwargs: dict,
    spec: GuideSpec,
    budget: Any,
    seed: int,
    *,
    num_warmup: int = 5,
) -> tuple[float, float]:
    """Seconds per SVI step (median over ``budget.num_steps`` steps after ``num_warmup``: robust
    to preemption on a shared machine) and the
    peak resident-memory increase (MiB) from building the guide to the last step."""
    with PeakMemory() as peak:
        _, svi, _, _ = _start(model, args, kwargs, spec, budget, seed)
        for _ in range(num_warmup):
            svi.step(*args, **kwargs)
        durations = []
        for _ in range(budget.num_steps):
            start = time.perf_counter()
            svi.step(*args, **kwargs)
            durations.append(time.perf_counter() - start)
    return float(np.median(durations)), peak.megabytes
