"""Numpy draws → ArviZ data, on ArviZ 0.x (``InferenceData``) and 1.x (``DataTree``) alike.

The backends' ``to_arviz`` draw from a fitted guide, evaluate the model, and hand numpy arrays
with a leading draw dimension ``S`` to :func:`from_draws`, which adds ``chain=1`` so that
``az.summary(..., kind="stats")``, ``az.loo`` and (1.x) ``az.loo_approximate_posterior`` work.

Example:
    >>> import numpy as np
    >>> data = from_draws({"mu": np.zeros(100)}, log_p=np.zeros(100), log_q=np.zeros(100))
    >>> tuple(data.posterior["mu"].shape)                    # doctest: +SKIP
    (1, 100)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def _import_arviz() -> Any:
    try:
        import arviz
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "to_arviz needs ArviZ: pip install 'mixvi[arviz]' (ArviZ 0.x or 1.x)"
        ) from error
    return arviz


def arviz_major() -> int:
    """Major version of the installed ArviZ (0 or 1)."""
    return int(_import_arviz().__version__.split(".")[0])


def _with_chain(arrays: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    if not arrays:
        return None
    return {name: np.asarray(value)[None] for name, value in arrays.items()}


def from_draws(
    posterior: Mapping[str, np.ndarray],
    *,
    log_likelihood: Mapping[str, np.ndarray] | None = None,
    observed_data: Mapping[str, np.ndarray] | None = None,
    log_p: np.ndarray | None = None,
    log_q: np.ndarray | None = None,
    dims: Mapping[str, list[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
) -> Any:
    """Build ArviZ data from draws of one approximate posterior.

    Args:
        posterior: ``{site: (S, *shape)}`` constrained draws.
        log_likelihood: ``{observed site: (S, *obs_shape)}`` pointwise log-likelihood.
        observed_data: ``{observed site: obs array}``.
        log_p: ``(S,)`` log joint ``log p(y, θ)`` at the draws (``sample_stats.log_p``).
        log_q: ``(S,)`` guide log-density at the draws (``sample_stats.log_q``).
        dims: ``{site: [dim names]}``, passed to ``az.from_dict``.
        coords: ``{dim name: values}``, passed to ``az.from_dict``.

    Returns:
        ``InferenceData`` on ArviZ 0.x, ``xarray.DataTree`` on ArviZ 1.x; draws are laid out
        as ``(chain=1, draw=S)``.
    """
    az = _import_arviz()
    sample_stats = {}
    if log_p is not None:
        sample_stats["log_p"] = np.asarray(log_p)
    if log_q is not None:
        sample_stats["log_q"] = np.asarray(log_q)
    groups = {
        "posterior": _with_chain(posterior),
        "log_likelihood": _with_chain(log_likelihood),
        "sample_stats": _with_chain(sample_stats),
        "observed_data": dict(observed_data) if observed_data else None,
    }
    groups = {name: value for name, value in groups.items() if value is not None}
    if arviz_major() == 0:
        return az.from_dict(**groups, dims=dims, coords=coords)
    return az.from_dict(groups, dims=dims, coords=coords)


def arviz_psis_khat(log_weights: np.ndarray) -> float:
    """Pareto-k̂ of ``exp(log_weights)`` computed by ArviZ, with each major's sign convention.

    ArviZ 0.x ``az.psislw`` takes the log-weights as they are; ArviZ 1.x ``psislw`` follows the
    LOO convention and negates its input, so it is given ``-log_weights``.
    """
    az = _import_arviz()
    log_weights = np.asarray(log_weights, dtype=np.float64).copy()
    if arviz_major() == 0:
        return float(az.psislw(log_weights)[1])
    from arviz_stats.base import array_stats

    return float(array_stats.psislw(-log_weights, r_eff=1.0, axis=-1)[1])
