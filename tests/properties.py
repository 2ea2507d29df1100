"""Property checks shared by both backends' tests; they take numpy-returning callables.

Each check derives its tolerance from the Monte Carlo or quadrature error it controls, so a
backend test only supplies the density, the sampler or the transform.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats


def grid_2d(bounds: tuple[float, float, float, float], num: int = 300):
    """Cell centres ``(num*num, 2)`` of a grid over ``(x0, x1, y0, y1)``, and the cell area."""
    x0, x1, y0, y1 = bounds
    xs = x0 + (np.arange(num) + 0.5) * (x1 - x0) / num
    ys = y0 + (np.arange(num) + 0.5) * (y1 - y0) / num
    points = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)
    return points, (x1 - x0) * (y1 - y0) / num**2


def assert_normalized_2d(
    log_prob: Callable[[np.ndarray], np.ndarray],
    bounds: tuple[float, float, float, float],
    *,
    num: int = 300,
    atol: float = 0.01,
) -> float:
    """Midpoint-rule integral of ``exp(log_prob)`` over ``bounds`` equals 1 within ``atol``.

    ``bounds`` must hold all but a negligible part of the mass; the midpoint rule's error for a
    smooth density is ``O(h^2)``, well under 0.01 at 300 cells a side for unit-scale densities.
    """
    points, area = grid_2d(bounds, num)
    total = float(np.exp(log_prob(points)).sum() * area)
    assert abs(total - 1.0) < atol, f"density integrates to {total:.4f}, not 1"
    return total


def assert_samples_match_density_2d(
    samples: np.ndarray,
    log_prob: Callable[[np.ndarray], np.ndarray],
    bounds: tuple[float, float, float, float],
    *,
    bins: int = 12,
    alpha: float = 1e-3,
) -> float:
    """Chi-square goodness of fit of ``samples (N, 2)`` to ``log_prob`` on a ``bins x bins`` grid.

    Expected counts come from 20x20-point midpoint quadrature inside each bin; bins expecting
    fewer than 5 draws are pooled into one. Fails when the p-value is below ``alpha``.
    """
    fine, _ = grid_2d(bounds, bins * 20)
    density = np.exp(np.asarray(log_prob(fine), dtype=np.float64)).reshape(bins * 20, bins * 20)
    cell_mass = density.reshape(bins, 20, bins, 20).sum((1, 3))
    expected = cell_mass.ravel() / cell_mass.sum() * len(samples)
    x0, x1, y0, y1 = bounds
    inside = (
        (samples[:, 0] > x0) & (samples[:, 0] < x1) & (samples[:, 1] > y0) & (samples[:, 1] < y1)
    )
    ix = np.floor((samples[inside, 0] - x0) / (x1 - x0) * bins).astype(int)
    iy = np.floor((samples[inside, 1] - y0) / (y1 - y0) * bins).astype(int)
    observed = np.bincount(ix * bins + iy, minlength=bins * bins).astype(float)
    expected *= inside.sum() / expected.sum()
    small = expected < 5
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    _, p_value = stats.chisquare(observed[keep], expected[keep])
    assert p_value > alpha, f"samples do not match the density (chi-square p = {p_value:.2e})"
    return float(p_value)


def assert_close_in_mc_error(
    estimates: np.ndarray, target: float | np.ndarray, *, num_sd: float = 4.0
) -> None:
    """The mean of i.i.d. ``estimates`` (first axis) is within ``num_sd`` standard errors of
    ``target``."""
    estimates = np.asarray(estimates, dtype=np.float64)
    mean = estimates.mean(0)
    stderr = estimates.std(0, ddof=1) / np.sqrt(len(estimates))
    gap = np.abs(mean - target)
    assert np.all(gap <= num_sd * stderr + 1e-12), (
        f"mean {mean} is {gap / np.maximum(stderr, 1e-300)} standard errors from {target}"
    )


def assert_wins_over_seeds(
    runs: list[tuple[dict[str, tuple[float, float, float]], float]],
    winner: str,
    baselines: tuple[str, ...],
    context: str = "",
) -> None:
    """``winner``'s seed-mean ELBO and sliced W2 beat every baseline's (seeds paired).

    Over seeds the fit outcome varies far more than the per-fit estimates, so the check is on the
    per-seed differences: their mean must exceed 3 standard errors (the spread over seeds, plus
    the draws' Monte Carlo error of the ELBO), and for sliced W2 also the metric's noise floor.
    With one seed the spread is unknown and the Monte Carlo error alone sets the ELBO margin.

    Shapes:
        ``runs``: one ``(scores, floor)`` per seed; ``scores[label] = (elbo, elbo_stderr,
        sliced_w2)``; ``floor`` is the sliced W2 between two exact samples of the same size.
    """
    floor = np.mean([floor for _, floor in runs])
    for label in baselines:
        elbo_gap = np.array([s[winner][0] - s[label][0] for s, _ in runs])
        mc_se = np.mean([np.hypot(s[winner][1], s[label][1]) for s, _ in runs])
        sw_gap = np.array([s[label][2] - s[winner][2] for s, _ in runs])

        def spread(gap: np.ndarray) -> float:
            return gap.std(ddof=1) / np.sqrt(len(gap)) if len(gap) > 1 else 0.0

        assert elbo_gap.mean() > 3 * np.hypot(spread(elbo_gap), mc_se), (context, label, elbo_gap)
        assert sw_gap.mean() > floor + 3 * spread(sw_gap), (context, label, sw_gap, floor)
