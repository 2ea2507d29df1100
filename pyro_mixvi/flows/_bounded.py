"""The affine transformer with a tighter soft bound on its log-scale, shared by MAF and RealNVP."""

from __future__ import annotations

import functools
import math

from zuko.transforms import MonotonicAffineTransform


def bounded_affine(max_log_scale: float | None) -> dict:
    """zuko flow keywords for an affine transformer with ``|log-scale| < max_log_scale``.

    zuko soft-clamps the network output ``a`` to ``a / (1 + |a / log(slope)|)``, so
    ``slope = exp(-max_log_scale)`` sets the bound. None: no keyword (zuko's default,
    ``slope = 1e-3``).

    Raises:
        ValueError: If ``max_log_scale`` is not positive.
    """
    if max_log_scale is None:
        return {}
    if not max_log_scale > 0:
        raise ValueError(f"max_log_scale must be > 0 or None; got {max_log_scale}")
    slope = math.exp(-float(max_log_scale))
    return {"univariate": functools.partial(MonotonicAffineTransform, slope=slope)}
