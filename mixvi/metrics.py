"""Accuracy of approximate draws against reference draws or an exact density (numpy only).

Every function takes plain arrays, so tests and benchmarks of both backends share them.
Draws are ``(S, D)`` arrays (``S`` draws of a ``D``-vector); :func:`flatten_draws` turns a
``{site: (S, *shape)}`` dict into that layout with matching column names.

Example:
    >>> rng = np.random.default_rng(0)
    >>> ref = rng.normal(size=(4000, 2))
    >>> q = rng.normal(0.1, 1.2, size=(4000, 2))
    >>> bool(standardized_mean_error(q, ref).max() < 0.2)
    True
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def flatten_draws(
    draws: Mapping[str, np.ndarray], names: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Stack ``{site: (S, *shape)}`` into ``(S, D)`` with Stan-style column names ``site[i,j]``.

    Args:
        draws: Arrays with a common leading draw dimension ``S``.
        names: Sites to take, in order; default all keys of ``draws`` in sorted order.
    """
    names = sorted(draws) if names is None else list(names)
    columns, labels = [], []
    for name in names:
        value = np.asarray(draws[name], dtype=np.float64)
        num_draws = value.shape[0]
        columns.append(value.reshape(num_draws, -1))
        if value.ndim == 1:
            labels.append(name)
        else:
            for index in np.ndindex(*value.shape[1:]):
                labels.append(f"{name}[{','.join(str(i + 1) for i in index)}]")
    return np.concatenate(columns, axis=1), labels


def standardized_mean_error(draws: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``|E_q x - E_ref x| / sd_ref`` per coordinate, shape ``(D,)``."""
    draws, reference = np.atleast_2d(draws), np.atleast_2d(reference)
    return np.abs(draws.mean(0) - reference.mean(0)) / reference.std(0, ddof=1)


def sd_ratio(draws: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``sd_q / sd_ref`` per coordinate, shape ``(D,)``."""
    draws, reference = np.atleast_2d(draws), np.atleast_2d(reference)
    return draws.std(0, ddof=1) / reference.std(0, ddof=1)


def _standardize(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (x - reference.mean(0)) / reference.std(0, ddof=1)


def _linear_quantiles(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``np.quantile(values, levels, axis=0)`` (linear method) from one sort per column.

    ``np.quantile`` partitions once per level, which costs seconds for thousands of levels;
    sorting once and interpolating gives the same numbers.
    """
    ordered = np.sort(values, axis=0)
    position = (len(ordered) - 1) * np.asarray(levels)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(ordered) - 1)
    fraction = (position - low)[:, None]
    return ordered[low] + fraction * (ordered[high] - ordered[low])


def sliced_wasserstein(
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_projections: int = 256,
    standardize: bool = True,
    seed: int = 0,
) -> float:
    """Sliced Wasserstein-2 distance between two samples ``(S1, D)`` and ``(S2, D)``.

    Both samples are standardized with ``y``'s mean and sd (``y`` is the reference) unless
    ``standardize=False``. Each random unit direction gives a 1-D W2 by matching quantiles at
    ``max(S1, S2)`` levels; the result is ``sqrt(mean over directions of W2^2)``.
    """
    x, y = np.atleast_2d(np.asarray(x, float)), np.atleast_2d(np.asarray(y, float))
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: x has D={x.shape[1]}, y has D={y.shape[1]}")
    if standardize:
        x, y = _standardize(x, y), _standardize(y, y)
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(num_projections, x.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    levels = (np.arange(max(len(x), len(y))) + 0.5) / max(len(x), len(y))
    x_proj = _linear_quantiles(x @ directions.T, levels)
    y_proj = _linear_quantiles(y @ directions.T, levels)
    return float(np.sqrt(np.mean((x_proj - y_proj) ** 2)))


def mmd(x: np.ndarray, y: np.ndarray, *, bandwidth: float = 1.0, max_points: int = 2000) -> float:
    """Unbiased squared maximum mean discrepancy with the RBF kernel ``exp(-|a-b|^2 / (2 bw^2))``.

    Only the first ``max_points`` rows of each sample are used (the cost is quadratic).
    """
    x = np.atleast_2d(np.asarray(x, float))[:max_points]
    y = np.atleast_2d(np.asarray(y, float))[:max_points]

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return np.exp(-np.maximum(sq, 0.0) / (2 * bandwidth**2))

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n, m = len(x), len(y)
    term_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def monte_carlo_kl(log_p: np.ndarray, log_q: np.ndarray) -> tuple[float, float]:
    """``KL(p || q) = E_p[log p - log q]`` from both log-densities at draws of ``p``.

    Returns the estimate and its Monte Carlo standard error. The negative log-likelihood
    ``-E_p[log q]`` is ``-log_q.mean()``; for a target with known entropy ``H``, ``NLL = H + KL``.
    """
    diff = np.asarray(log_p, float) - np.asarray(log_q, float)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size))


def compare_to_reference(
    draws: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    names: list[str] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Headline accuracy of ``draws`` against ``reference`` on the sites they share.

    Returns ``max_mean_error``/``mean_mean_error`` (standardized), ``min_sd_ratio``,
    ``max_sd_ratio`` and ``sliced_w2`` (standardized coordinates).
    """
    names = sorted(set(draws) & set(reference)) if names is None else names
    if not names:
        raise ValueError("draws and reference share no site names")
    x, _ = flatten_draws(draws, names)
    y, _ = flatten_draws(reference, names)
    error, ratio = standardized_mean_error(x, y), sd_ratio(x, y)
    return {
        "max_mean_error": float(error.max()),
        "mean_mean_error": float(error.mean()),
        "min_sd_ratio": float(ratio.min()),
        "max_sd_ratio": float(ratio.max()),
        "sliced_w2": sliced_wasserstein(x, y, seed=seed),
    }
