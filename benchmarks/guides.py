"""The guides every benchmark compares, keyed by backend and name.

A :class:`GuideSpec` names a guide class and the ELBO it is trained with by import path
(``"module:attribute"``), so the registry can list guides that are not importable here (a mixvi
guide not written yet, a backend not installed) without importing torch or JAX. Adding a guide is
one line::

    register_guide("AutoCWM", "pyro", "pyro_mixvi:AutoCWM", elbo="pyro_mixvi:RBMixture_ELBO",
                   num_components=4)

Example:
    >>> spec = GUIDES["numpyro"]["AutoNormal"]
    >>> spec.elbo
    'numpyro.infer:Trace_ELBO'
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

BACKENDS = ("pyro", "numpyro")

#: The framework's own normalizing-flow guide: the reference of the timing ratios.
FLOW_GUIDE = "AutoIAFNormal"


def resolve(path: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute."""
    module_name, _, attribute = path.partition(":")
    if not attribute:
        raise ValueError(f"import path must look like 'module:attribute'; got {path!r}")
    return getattr(importlib.import_module(module_name), attribute)


def _accepts(function: Callable, keyword: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return keyword in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _load(target: str | Callable) -> Any:
    return resolve(target) if isinstance(target, str) else target


class GuideSpec(NamedTuple):
    """A guide class and its ELBO, by import path, with keyword options for both.

    Attributes:
        name: Display name, unique within a backend.
        backend: ``"pyro"`` or ``"numpyro"``.
        guide: Import path of the guide class, ``"module:Class"``, or a callable
            ``guide(model, **options)``.
        elbo: Import path of the ELBO class, or a callable ``elbo(num_particles=..., ...)``.
        options: Keyword options of the guide constructor.
        elbo_options: Keyword options of the ELBO besides ``num_particles``.
        builtin: Whether the guide ships with Pyro/NumPyro (a baseline) rather than mixvi.
        trainer: ``None`` to train with ``SVI`` and :attr:`elbo`; ``"fit"`` for a guide trained
            by its own staged ``fit`` method (AutoFlowMixture), the budget's steps split evenly
            over the experts it trains so the number of gradient steps stays the same.
    """

    name: str
    backend: str
    guide: str | Callable
    elbo: str | Callable
    options: Mapping[str, Any] = {}
    elbo_options: Mapping[str, Any] = {}
    builtin: bool = False
    trainer: str | None = None

    def unavailable_reason(self) -> str | None:
        """``None`` if the guide and its ELBO import here, else why not (for the skip list)."""
        for path in (self.guide, self.elbo):
            try:
                _load(path)
            except (ImportError, AttributeError) as error:
                return f"{path} is not importable: {error}"
        return None

    def make_guide(self, model: Callable) -> Any:
        """A fresh guide for ``model``."""
        return _load(self.guide)(model, **self.options)

    def fit_keywords(self, budget: Any) -> dict[str, Any]:
        """Keywords of the guide's own ``fit`` (``trainer="fit"``) that spend ``budget``: its
        steps split evenly over the trained (non-RBIG) experts, its learning rate and particles."""
        experts = self.options.get("experts", ("maf", "realnvp", "rbig"))
        num_trained = max(1, sum(expert != "rbig" for expert in experts))
        return {
            "num_steps": max(1, budget.num_steps // num_trained),
            "lr": budget.learning_rate,
            "num_particles": budget.num_particles,
            "progress_bar": False,
        }

    def make_elbo(self, num_particles: int, *, vectorize: bool = True) -> Any:
        """A fresh ELBO drawing ``num_particles`` particles per step (vectorized in Pyro)."""
        elbo_class = _load(self.elbo)
        options = dict(self.elbo_options, num_particles=num_particles)
        if self.backend == "pyro" and _accepts(elbo_class, "vectorize_particles"):
            options.setdefault("vectorize_particles", vectorize)
        return elbo_class(**options)


GUIDES: dict[str, dict[str, GuideSpec]] = {backend: {} for backend in BACKENDS}


def register_guide(
    name: str,
    backend: str,
    guide: str | Callable,
    *,
    elbo: str | Callable | None = None,
    elbo_options: Mapping[str, Any] | None = None,
    builtin: bool = False,
    trainer: str | None = None,
    **options: Any,
) -> GuideSpec:
    """Add (or replace) a guide in :data:`GUIDES`; ``elbo`` defaults to the host's ``Trace_ELBO``.

    Raises:
        ValueError: If ``backend`` is not ``"pyro"`` or ``"numpyro"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    elbo = elbo or f"{backend}.infer:Trace_ELBO"
    if trainer not in (None, "fit"):
        raise ValueError(f"trainer must be None or 'fit'; got {trainer!r}")
    spec = GuideSpec(
        name, backend, guide, elbo, dict(options), dict(elbo_options or {}), builtin, trainer
    )
    GUIDES[backend][name] = spec
    return spec


def available_guides(backend: str, names: list[str] | None = None) -> tuple[list[GuideSpec], dict]:
    """The registered guides of ``backend`` that import here, and ``{name: reason}`` for the rest.

    Raises:
        KeyError: If ``names`` holds an unregistered name; the message lists the registered ones.
    """
    registry = GUIDES[backend]
    names = list(registry) if names is None else names
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise KeyError(f"unknown guides {unknown} for {backend}; registered: {list(registry)}")
    ready, skipped = [], {}
    for name in names:
        reason = registry[name].unavailable_reason()
        if reason is None:
            ready.append(registry[name])
        else:
            skipped[name] = reason
    return ready, skipped


# Built-in baselines: the framework's mean-field, full-rank Gaussian and flow guides.
for _backend in BACKENDS:
    for _name in ("AutoNormal", "AutoMultivariateNormal", FLOW_GUIDE):
        register_guide(_name, _backend, f"{_backend}.infer.autoguide:{_name}", builtin=True)
register_guide("AutoDAIS", "numpyro", "numpyro.infer.autoguide:AutoDAIS", builtin=True)

# mixvi's guides, each with the ELBO its method needs (skipped until the backend exports them).
for _backend in BACKENDS:
    _pkg = f"{_backend}_mixvi"
    register_guide(
        "AutoCWM", _backend, f"{_pkg}:AutoCWM", elbo=f"{_pkg}:RBMixture_ELBO", num_components=4
    )
    register_guide("AutoSIVI", _backend, f"{_pkg}:AutoSIVI", elbo=f"{_pkg}:SIVI_ELBO")
    register_guide(
        "AutoFlowMixture", _backend, f"{_pkg}:AutoFlowMixture", elbo=f"{_pkg}:RBMixture_ELBO",
        trainer="fit",
    )


def as_guide_spec(guide: GuideSpec | str | Callable, backend: str) -> GuideSpec:
    """A :class:`GuideSpec` from a spec, a registered name, or a factory ``guide(model)``.

    A bare factory is trained with the host's ``Trace_ELBO``.

    Raises:
        KeyError: If ``guide`` is a name not registered for ``backend``.
    """
    if isinstance(guide, GuideSpec):
        return guide
    if isinstance(guide, str):
        if guide not in GUIDES[backend]:
            raise KeyError(f"no guide {guide!r} for {backend}; registered: {list(GUIDES[backend])}")
        return GUIDES[backend][guide]
    name = getattr(guide, "__name__", type(guide).__name__)
    return GuideSpec(name, backend, guide, f"{backend}.infer:Trace_ELBO")
