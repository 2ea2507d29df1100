"""What importance weights say about a guide: Pareto-k̂ (PSIS) and the log-evidence estimate.

Numpy only, so both backends report the same k̂ and ``log Ẑ`` for the same log-weights
(``log p(y, θ_s) - log q(θ_s)``, from either backend's ``log_importance_weights``). ``k̂ < 0.5``: the
guide covers the target well; ``0.5 <= k̂ < 0.7``: usable with care; ``k̂ >= 0.7``: the
importance weights have a heavy tail and the guide misses mass (for example a mode).

Example:
    >>> rng = np.random.default_rng(0)
    >>> bool(pareto_khat(rng.normal(size=4000) * 0.1) < 0.5)
    True
    >>> log_evidence_from_weights(np.zeros(100))
    LogEvidence(estimate=0.0, stderr=0.0)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# Relative spread of the tail below which the weights count as equal (float32 log-densities of
# magnitude ~100 round to ~1e-5).
FLAT_TAIL = 1e-4


def _fit_generalized_pareto(exceedances: np.ndarray) -> float:
    """Shape ``k`` of a generalized Pareto fit to positive ``exceedances`` sorted ascending.

    Zhang & Stephens (2009) empirical-Bayes estimate with the weakly informative prior
    of PSIS (shrinks ``k`` towards 0.5 with weight 10 observations).
    """
    n = exceedances.size
    num_grid = 30 + int(np.sqrt(n))
    grid = 1.0 - np.sqrt(num_grid / (np.arange(1, num_grid + 1) - 0.5))
    grid = grid / (3.0 * exceedances[int(n / 4 + 0.5) - 1]) + 1.0 / exceedances[-1]
    shapes = np.log1p(-grid[:, None] * exceedances).mean(axis=1)
    profile = n * (np.log(-grid / shapes) - shapes - 1.0)
    weights = 1.0 / np.exp(profile[None, :] - profile[:, None]).sum(axis=1)
    b = np.sum(grid * weights) / np.sum(weights)
    k = np.log1p(-b * exceedances).mean()
    return float((n * k + 10 * 0.5) / (n + 10))


def pareto_khat(log_weights: np.ndarray) -> float:
    """k̂ of the tail of ``exp(log_weights)``; ``log_weights`` is any 1-D array of ``log p - log q``.

    Uses the ``M = min(0.2 S, 3 sqrt(S))`` largest weights, as PSIS does. Non-finite
    ``+inf`` weights give ``inf``; ``-inf`` weights (zero weight) are allowed. Weights equal to
    rounding (an exact guide) give ``-inf``; when a few draws carry all the weight (a quarter of
    the tail does not rise above the cutoff) the result is ``inf``, never a degenerate fit.

    Raises:
        ValueError: If ``log_weights`` holds NaN or fewer than 10 finite values.
    """
    log_weights = np.asarray(log_weights, dtype=np.float64).ravel()
    if np.isnan(log_weights).any():
        raise ValueError("log_weights contain NaN: the model or guide log-density is undefined")
    if np.isposinf(log_weights).any():
        return float("inf")
    finite = log_weights[np.isfinite(log_weights)]
    if finite.size < 10:
        raise ValueError(f"need at least 10 finite log-weights for k-hat; got {finite.size}")
    num_tail = int(min(0.2 * finite.size, 3 * np.sqrt(finite.size)))
    ordered = np.sort(finite - finite.max())
    cutoff = ordered[-num_tail - 1]
    if -cutoff < FLAT_TAIL:
        # The largest weights agree to within FLAT_TAIL (relative): equal weights up to the
        # rounding of float32 or float64 log-densities, as from an exact guide; nothing to fit.
        return float("-inf")
    exceedances = np.exp(ordered[-num_tail:]) - np.exp(cutoff)
    if exceedances[int(num_tail / 4 + 0.5) - 1] <= 0:
        # A quarter of the tail does not rise above the cutoff (it underflows, or ties it) while
        # the largest weight does: a few draws carry all the weight.
        return float("inf")
    return _fit_generalized_pareto(exceedances)


class LogEvidence(NamedTuple):
    """Importance-sampling estimate of ``log p(y)``.

    Attributes:
        estimate: ``log mean_s exp(log p(y, θ_s) - log q(θ_s))``.
        stderr: Delta-method Monte Carlo standard error of ``estimate``:
            ``sd(w) / (sqrt(S) mean(w))`` for the weights ``w``; ``inf`` with one draw or
            an infinite weight, ``nan`` when a weight is NaN.
    """

    estimate: float
    stderr: float


def log_evidence_from_weights(log_weights: np.ndarray) -> LogEvidence:
    """``log Ẑ = log mean_s exp(log_weights)`` with its Monte Carlo standard error.

    Use it with :func:`pareto_khat` on the same log-weights, so that one set of guide draws
    gives both the evidence and the k̂ that says whether to trust it.

    Shapes:
        ``log_weights``: any shape, flattened to ``(S,)``.
    """
    log_weights = np.asarray(log_weights, dtype=np.float64).ravel()
    shift = log_weights.max()
    if not np.isfinite(shift):
        return LogEvidence(float(shift), float("nan") if np.isnan(shift) else math.inf)
    weights = np.exp(log_weights - shift)
    mean = weights.mean()
    if weights.size < 2:
        return LogEvidence(float(shift + math.log(mean)), math.inf)
    stderr = weights.std(ddof=1) / (math.sqrt(weights.size) * mean)
    return LogEvidence(float(shift + math.log(mean)), float(stderr))
