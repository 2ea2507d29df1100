"""Which model to fit for a posterior: a registry keyed by backend and posterior name.

A builder takes the posterior's data dict (``data.json``) and returns ``(model, args, kwargs)``
for the backend's SVI. Lookup order: models registered here with :func:`register_model` (so a
user can benchmark their own folder, or override a model), then the package's own registry
``POSTERIORDB_MODELS`` in ``pyro_mixvi.posteriordb`` / ``numpyro_mixvi.posteriordb``.

Example:
    >>> def build(data):                       # doctest: +SKIP
    ...     return my_model, (np.asarray(data["y"]),), {}
    >>> register_model("mydata-mymodel", "numpyro", build)   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from benchmarks.guides import BACKENDS

ModelBuilder = Callable[[dict[str, Any]], tuple[Callable, tuple, dict]]

MODELS: dict[str, dict[str, ModelBuilder]] = {backend: {} for backend in BACKENDS}


def register_model(name: str, backend: str, builder: ModelBuilder) -> None:
    """Use ``builder(data) -> (model, args, kwargs)`` for posterior ``name`` in ``backend``.

    Raises:
        ValueError: If ``backend`` is not ``"pyro"`` or ``"numpyro"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    MODELS[backend][name] = builder


def package_models(backend: str) -> dict[str, ModelBuilder]:
    """``POSTERIORDB_MODELS`` of ``<backend>_mixvi.posteriordb``, or ``{}`` if there is none yet."""
    try:
        module = importlib.import_module(f"{backend}_mixvi.posteriordb")
    except ModuleNotFoundError as error:
        if error.name != f"{backend}_mixvi.posteriordb":
            raise
        return {}
    return dict(getattr(module, "POSTERIORDB_MODELS", {}))


def find_model(name: str, backend: str) -> ModelBuilder | None:
    """The builder for posterior ``name`` (user registry first), or ``None`` if there is none."""
    return MODELS[backend].get(name) or package_models(backend).get(name)
