"""Fit one guide on one model at a fixed budget and score it against reference draws.

:func:`evaluate` is the unit every accuracy benchmark repeats: train for ``budget.num_steps``
steps of Adam with ``budget.num_particles`` ELBO particles, draw ``budget.num_draws`` times from
the guide, and report the accuracy of the draws (:func:`mixvi.metrics.compare_to_reference`),
the Pareto-k̂ of the importance weights (:func:`mixvi.psis.pareto_khat`), the importance-sampling
log-evidence, the wall-clock time and the peak memory of the fit. The backend code lives in
``benchmarks._pyro`` / ``benchmarks._numpyro`` and is imported only when used, so a NumPyro run
never imports torch.

Example:
    >>> from numpyro.infer.autoguide import AutoNormal            # doctest: +SKIP
    >>> row = evaluate(model, (y,), {"mu": ref_mu}, AutoNormal, Budget(num_steps=500),
    ...                backend="numpyro")                         # doctest: +SKIP
    >>> row["sliced_w2"], row["khat"], row["log_evidence"]        # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
from scipy.special import logsumexp

from benchmarks.guides import BACKENDS, GuideSpec, as_guide_spec
from benchmarks.memory import PeakMemory
from mixvi.metrics import compare_to_reference
from mixvi.psis import pareto_khat


class Budget(NamedTuple):
    """What every guide gets: optimizer steps, ELBO particles per step, the Adam learning rate
    (decayed exponentially to ``final_lr_factor`` times itself over the run, so the last iterate
    is not dominated by gradient noise), and the number of guide draws used for the metrics."""

    num_steps: int = 2000
    num_particles: int = 8
    learning_rate: float = 1e-2
    num_draws: int = 1000
    final_lr_factor: float = 0.1

    @property
    def lr_decay(self) -> float:
        """Per-step factor ``gamma`` with ``gamma ** num_steps == final_lr_factor``."""
        return self.final_lr_factor ** (1.0 / max(self.num_steps, 1))


DEFAULT_BUDGET = Budget()


def default_backend() -> str:
    """``"pyro"`` where torch and Pyro are installed, else ``"numpyro"``."""
    if importlib.util.find_spec("torch") and importlib.util.find_spec("pyro"):
        return "pyro"
    return "numpyro"


def backend_module(backend: str) -> ModuleType:
    """The harness's code for ``backend`` (``benchmarks._pyro`` or ``benchmarks._numpyro``).

    Raises:
        ValueError: If ``backend`` is not ``"pyro"`` or ``"numpyro"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    return importlib.import_module(f"benchmarks._{backend}")


def _like_reference(draws: dict, reference: Mapping[str, np.ndarray]) -> dict:
    """Give each draw array its reference's per-draw shape (Pyro's particle plate may add 1s)."""
    shaped = {}
    for name, value in draws.items():
        if name in reference and value[0].size == np.asarray(reference[name])[0].size:
            value = value.reshape((len(value),) + np.shape(reference[name])[1:])
        shaped[name] = value
    return shaped


def importance_summary(log_weights: np.ndarray) -> dict[str, float]:
    """k̂, log-evidence ``log mean exp(w)`` and ELBO ``mean w`` of log-weights ``w = log p - log q``.

    A NaN log-weight (an undefined density) gives ``nan`` everywhere rather than a number.
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if np.isnan(log_weights).any():
        return {"khat": math.nan, "log_evidence": math.nan, "elbo": math.nan}
    return {
        "khat": pareto_khat(log_weights),
        "log_evidence": float(logsumexp(log_weights) - np.log(log_weights.size)),
        "elbo": float(log_weights.mean()),
    }


def evaluate(
    model: Callable,
    args: tuple,
    reference: Mapping[str, np.ndarray],
    guide: GuideSpec | str | Callable,
    budget: Budget = DEFAULT_BUDGET,
    *,
    kwargs: dict | None = None,
    backend: str | None = None,
    seed: int = 0,
    return_draws: bool = False,
) -> dict[str, Any]:
    """Fit ``guide`` to ``model(*args, **kwargs)`` within ``budget``; compare it with ``reference``.

    Args:
        model: A Pyro or NumPyro model.
        args: Positional arguments of the model (its data).
        reference: Reference draws ``{site: (S, *shape)}`` (e.g. NUTS); compared on shared sites.
        guide: A :class:`~benchmarks.guides.GuideSpec`, a name registered in
            :data:`~benchmarks.guides.GUIDES`, or a factory ``guide(model)`` (trained with
            ``Trace_ELBO``).
        budget: Steps, particles, learning rate and number of evaluation draws.
        kwargs: Keyword arguments of the model.
        backend: ``"pyro"`` or ``"numpyro"``; defaults to the spec's backend, else
            :func:`default_backend`.
        seed: Seeds the fit and the evaluation draws.
        return_draws: Also return the guide draws ``{site: (num_draws, *shape)}`` under ``"draws"``.

    Returns:
        ``max_mean_error``, ``mean_mean_error``, ``min_sd_ratio``, ``max_sd_ratio``, ``sliced_w2``,
        ``khat``, ``log_evidence``, ``elbo``, ``final_loss``, ``fit_seconds``, ``peak_memory_mb``.

    Raises:
        FloatingPointError: If the loss goes non-finite during the fit.
    """
    if isinstance(guide, GuideSpec):
        backend = guide.backend
    spec = as_guide_spec(guide, backend or default_backend())
    impl = backend_module(spec.backend)
    with PeakMemory() as peak:
        start = time.perf_counter()
        fitted = impl.fit(model, tuple(args), dict(kwargs or {}), spec, budget, seed)
        fit_seconds = time.perf_counter() - start
    draws, log_weights = impl.draws_and_log_weights(fitted, budget.num_draws, seed + 1)
    losses = fitted.losses
    draws = _like_reference(draws, reference)
    row = {
        **compare_to_reference(draws, reference, seed=seed),
        **importance_summary(log_weights),
        "final_loss": float(np.mean(losses[-max(len(losses) // 10, 1) :])),
        "fit_seconds": fit_seconds,
        "peak_memory_mb": peak.megabytes,
    }
    if return_draws:
        row["draws"] = draws
    return row
