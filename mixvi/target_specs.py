"""Parameters of the 2-D Gaussian-mixture test targets, written once for both backends.

Each function returns a :class:`GaussianMixtureSpec` of float64 numpy arrays; the backends'
``targets.py`` turn it into a host distribution (``pyro_mixvi.targets.x_shape()`` and
``numpyro_mixvi.targets.x_shape()`` are the same law). Definitions follow the AISIVI and AMF-VI
papers (``shared/research/seed_methods.md`` §1.6, §2.4); entropies are the oracle NLLs.

Example:
    >>> x_shape().covariances.shape
    (2, 2, 2)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class GaussianMixtureSpec(NamedTuple):
    """``locs (K, 2)``, ``covariances (K, 2, 2)`` (noise included), ``weights (K,)`` or None
    (equal), plot ``bounds (x0, x1, y0, y1)`` and ``entropy`` (None where not computed)."""

    locs: np.ndarray
    covariances: np.ndarray
    weights: np.ndarray | None
    bounds: tuple[float, float, float, float]
    entropy: float | None


def _spec(locs, variances, weights=None, *, noise=0.0, bounds=None, entropy=None):
    """A 2-D mixture from means and covariances (scalar variances mean isotropic), plus noise."""
    covariances = []
    for v in variances:
        cov = np.asarray(v, dtype=np.float64)
        cov = cov * np.eye(2) if cov.ndim == 0 else cov
        covariances.append(cov + noise**2 * np.eye(2))
    return GaussianMixtureSpec(
        np.asarray(locs, dtype=np.float64),
        np.stack(covariances),
        None if weights is None else np.asarray(weights, dtype=np.float64),
        bounds,
        entropy,
    )


def x_shape() -> GaussianMixtureSpec:
    """AISIVI's X: ``1/2 N(0, [[2, 1.8], [1.8, 2]]) + 1/2 N(0, [[2, -1.8], [-1.8, 2]])``."""
    return _spec([[0, 0], [0, 0]], [[[2, 1.8], [1.8, 2]], [[2, -1.8], [-1.8, 2]]],
                   bounds=(-6, 6, -6, 6), entropy=3.1226)


def multimodal() -> GaussianMixtureSpec:
    """AISIVI's two modes: ``1/2 N((2, 0), I) + 1/2 N((-2, 0), I)``."""
    return _spec([[2, 0], [-2, 0]], [1, 1], bounds=(-6.5, 6.5, -4.5, 4.5), entropy=3.4706)


def eight_modes(*, radius: float = 3.0, scale: float = 0.3) -> GaussianMixtureSpec:
    """Eight equal Gaussian modes ``N(r (cos a_k, sin a_k), s^2 I)``, ``a_k = 2 pi k / 8``.

    Defaults ``r = 3, s = 0.3``: neighbouring modes are ``2 r sin(pi/8) / s = 7.7`` standard
    deviations apart, so a guide that covers fewer modes is visibly wrong. Entropy (defaults):
    ``log 8 + log(2 pi e s^2)`` up to the overlap, computed numerically as 2.5090.
    """
    angles = [2 * math.pi * k / 8 for k in range(8)]
    locs = [[radius * math.cos(a), radius * math.sin(a)] for a in angles]
    box = radius + 6 * scale
    known = radius == 3.0 and scale == 0.3
    return _spec(locs, [scale**2] * 8, bounds=(-box, box, -box, box),
                   entropy=2.5090 if known else None)


def amf_x_shape() -> GaussianMixtureSpec:
    """AMF-VI's X: AISIVI's X plus ``N(0, 0.1^2 I)`` noise (added to both covariances)."""
    return _spec([[0, 0], [0, 0]], [[[2, 1.8], [1.8, 2]], [[2, -1.8], [-1.8, 2]]], noise=0.1,
                   bounds=(-6, 6, -6, 6), entropy=3.1424)


def bimodal_shared() -> GaussianMixtureSpec:
    """AMF-VI's ``1/2 N((-1.5, 0), .5 I) + 1/2 N((1.5, 0), .5 I)`` plus ``N(0, 0.3^2 I)``."""
    return _spec([[-1.5, 0], [1.5, 0]], [0.5, 0.5], noise=0.3,
                   bounds=(-5.5, 5.5, -4, 4), entropy=2.9362)


def bimodal_different() -> GaussianMixtureSpec:
    """AMF-VI's ``1/2 N((-3,-1), [[.8,.2],[.2,.3]]) + 1/2 N((3,1), [[.3,-.1],[-.1,.6]])``,
    plus ``N(0, .2^2 I)``."""
    return _spec([[-3, -1], [3, 1]], [[[0.8, 0.2], [0.2, 0.3]], [[0.3, -0.1], [-0.1, 0.6]]],
                   noise=0.2, bounds=(-7, 7, -4, 4.5), entropy=2.7869)


def amf_multimodal() -> GaussianMixtureSpec:
    """AMF-VI's 3 modes at (-2,-1), (2,1), (0,2.5), variances .7, 1, .3, plus ``N(0, .1^2 I)``."""
    return _spec([[-2, -1], [2, 1], [0, 2.5]], [0.7, 1.0, 0.3], noise=0.1,
                   bounds=(-6, 6.5, -5, 6), entropy=3.3353)


def multimodal_5() -> GaussianMixtureSpec:
    """AMF-VI's five modes (means (-.5,-1), (.5,1), (2,2.5), (.5,-1), (-.5,1); variances
    .7, .3, 1, .7, .3) plus ``N(0, .1^2 I)``."""
    return _spec([[-0.5, -1], [0.5, 1], [2, 2.5], [0.5, -1], [-0.5, 1]],
                   [0.7, 0.3, 1.0, 0.7, 0.3], noise=0.1,
                   bounds=(-5, 6.5, -5, 7), entropy=3.2297)
