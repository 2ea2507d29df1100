"""NumPyro side of the harness: the JAX twin of :mod:`benchmarks._pyro` (never imports torch)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI

from benchmarks.guides import GuideSpec
from benchmarks.memory import PeakMemory
from numpyro_mixvi.diagnostics import draw_and_score, map_draws


class Fitted(NamedTuple):
    """A trained guide, its parameters and what is needed to draw from it again."""

    model: Callable
    guide: Any
    params: dict
    args: tuple
    kwargs: dict
    losses: np.ndarray


def _svi(model: Callable, spec: GuideSpec, budget: Any) -> tuple[Any, SVI]:
    guide = spec.make_guide(model)
    elbo = spec.make_elbo(budget.num_particles)
    learning_rate, decay = budget.learning_rate, budget.lr_decay
    optim = numpyro.optim.Adam(lambda step: learning_rate * decay**step)
    return guide, SVI(model, guide, optim, elbo)


def fit(
    model: Callable, args: tuple, kwargs: dict, spec: GuideSpec, budget: Any, seed: int
) -> Fitted:
    """Train ``spec``'s guide on ``model`` for ``budget.num_steps`` jitted Adam steps (``SVI.run``).

    A guide with ``spec.trainer == "fit"`` trains by its own staged ``fit`` instead
    (:meth:`GuideSpec.fit_keywords`); its losses are the stages' losses end to end.

    Raises:
        FloatingPointError: If the loss becomes non-finite (the message names the first such step).
    """
    if spec.trainer == "fit":
        guide = spec.make_guide(model)
        params, result = guide.fit(
            jax.random.PRNGKey(seed), *args, **spec.fit_keywords(budget), **kwargs
        )
        losses = np.concatenate(
            [np.asarray(x, dtype=np.float64) for x in (*result.expert_losses, result.joint_losses)]
        )
        return Fitted(model, guide, params, args, kwargs, losses)
    guide, svi = _svi(model, spec, budget)
    result = svi.run(
        jax.random.PRNGKey(seed), budget.num_steps, *args, progress_bar=False, **kwargs
    )
    losses = np.asarray(result.losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise FloatingPointError(f"{spec.name}: the ELBO loss is {losses[bad[0]]} at step {bad[0]}")
    return Fitted(model, guide, result.params, args, kwargs, losses)


def draws_and_log_weights(fitted: Fitted, num_draws: int, seed: int) -> tuple[dict, np.ndarray]:
    """``num_draws`` guide draws of every latent and deterministic site, in constrained space,
    and their importance log-weights ``log p(x, y) - log q(x)`` (for k-hat and log-evidence),
    scored by :func:`numpyro_mixvi.diagnostics.draw_and_score`.

    Shapes:
        Each draw array is ``(num_draws, *site_shape)``; log-weights are ``(num_draws,)``.
    """

    def one(rng_key: jax.Array) -> tuple[jax.Array, dict]:
        log_p, log_q, _, model_trace = draw_and_score(
            rng_key, fitted.params, fitted.model, fitted.guide, fitted.args, fitted.kwargs
        )
        values = {
            name: site["value"]
            for name, site in model_trace.items()
            if (site["type"] == "sample" and not site["is_observed"])
            or site["type"] == "deterministic"
        }
        return log_p - log_q, values

    log_weights, draws = map_draws(jax.jit(one), jax.random.PRNGKey(seed), num_draws, None)
    draws = {k: np.asarray(v, dtype=np.float64) for k, v in draws.items()}
    return draws, np.asarray(log_weights, dtype=np.float64)


def blr_model(X: jax.Array, y: jax.Array | None = None, prior_scale: float = 10.0) -> None:
    """Bayesian logistic regression: ``w ~ N(0, prior_scale^2 I)``, ``y_i ~ Bern(sigmoid(x_i w))``.

    Shapes:
        ``X`` is ``(N, D)``, ``y`` is ``(N,)``; the latent ``w`` is ``(D,)``.
    """
    w = numpyro.sample("w", dist.Normal(jnp.zeros(X.shape[-1], X.dtype), prior_scale).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def blr_args(X: np.ndarray, y: np.ndarray) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of :func:`blr_model` from numpy data, in JAX's default float dtype."""
    return (
        jnp.asarray(X, dtype=jnp.result_type(float)),
        jnp.asarray(y, dtype=jnp.result_type(float)),
    ), {}


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
    """Seconds per jitted SVI step (median over ``budget.num_steps`` after ``num_warmup``, which
    include compilation) and the peak resident-memory increase (MiB) from building the guide
    (and compiling the step) to the last step."""
    with PeakMemory() as peak:
        _, svi = _svi(model, spec, budget)
        state = svi.init(jax.random.PRNGKey(seed), *args, **kwargs)
        update = jax.jit(lambda s: svi.update(s, *args, **kwargs))
        for _ in range(num_warmup):
            state, loss = update(state)
        jax.block_until_ready(loss)
        durations = []
        for _ in range(budget.num_steps):
            start = time.perf_counter()
            state, loss = update(state)
            jax.block_until_ready(loss)
            durations.append(time.perf_counter() - start)
    return float(np.median(durations)), peak.megabytes
