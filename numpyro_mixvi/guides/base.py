r"""The finite-mixture protocol that ``RBMixture_ELBO`` is written against.

A guide takes part in the Rao-Blackwellized mixture ELBO when it is a NumPyro
``AutoContinuous`` (packed unconstrained latent ``x`` in R^D, ``biject_to`` with the Jacobian)
whose ``get_posterior(params)`` returns a :class:`FiniteMixture`: a distribution over ``x`` with
a ``log_prob`` and a method

``sample_components(rng_key, sample_shape) -> (x, log_weights)``

with ``x`` of shape ``sample_shape + (K, D)`` and ``log_weights`` of shape
``sample_shape + (K,)``, such that for every integrable ``h``

.. math:: E_q[h(x)] = E\Big[\sum_k \exp(\text{log\_weights}_k)\, h(x_k)\Big],

both outputs differentiable (reparameterized) in the guide's parameters. Two instances:

- classifier-weighted mixture (``ClassifierWeightedMixture``): ``x_k = T_k^{-1}(z)`` for one
  shared ``z ~ N(0, I)`` and ``log_weights = log w(z)``;
- global-weight mixture (e.g. a flow mixture with weights ``pi``): ``x_k ~ q_k`` drawn
  independently (reparameterized) and ``log_weights = log pi`` broadcast to
  ``sample_shape + (K,)``.

The ELBO then evaluates ``log p(x_k) - log q(x_k)`` at all ``K`` points of every particle with
one ``vmap`` over the points (:func:`unconstrained_log_joint`) and weights them. Implementing
the protocol is all a new mixture guide needs; nothing else of the guide is used.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer.autoguide import AutoContinuous

__all__ = [
    "FiniteMixture",
    "SampleSummariesOnly",
    "latent_site_name",
    "posterior_of",
    "unconstrained_log_joint",
]


@runtime_checkable
class FiniteMixture(Protocol):
    """A distribution over R^D that exposes Rao-Blackwellized component draws.

    Shapes:
        ``log_prob``: ``(..., D)`` to ``(...)``. ``sample_components(rng_key, sample_shape)``
        returns ``x: sample_shape + (K, D)`` and ``log_weights: sample_shape + (K,)`` with
        ``logsumexp(log_weights, -1) == 0``.
    """

    def log_prob(self, value: jax.Array) -> jax.Array: ...

    def sample_components(
        self, rng_key: jax.Array, sample_shape: tuple[int, ...] = ...
    ) -> tuple[jax.Array, jax.Array]: ...


class SampleSummariesOnly:
    """Mixin for mixture guides: ``median``/``quantiles`` are refused (no closed form).

    A mixture's median is not a component location and its quantiles have no closed form;
    the message points to sample quantiles (``sample_posterior`` or ``Predictive``). Put it
    before ``AutoContinuous`` in the bases (the Pyro twin has the same mixin).
    """

    def median(self, *args, **kwargs) -> dict:  # noqa: ANN002, ANN003
        """Not available: a mixture's median is not a component location and has no closed form.

        Use ``sample_posterior`` (or ``Predictive``) and take sample quantiles.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form median; use sample_posterior and "
            "sample quantiles"
        )

    def quantiles(self, *args, **kwargs) -> dict:  # noqa: ANN002, ANN003
        """Not available (see :meth:`median`)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form quantiles; use sample_posterior and "
            "sample quantiles"
        )


def latent_site_name(guide: AutoContinuous) -> str:
    """Name of the guide's auxiliary packed-latent site, ``"_{prefix}_latent"``."""
    return f"_{guide.prefix}_latent"


def posterior_of(guide: AutoContinuous, params: dict) -> FiniteMixture:
    """The guide's posterior over the packed latent at ``params``, checked against the protocol.

    Raises:
        TypeError: If ``guide`` is not an ``AutoContinuous`` whose posterior is a
            :class:`FiniteMixture`.
    """
    if not isinstance(guide, AutoContinuous):
        raise TypeError(
            f"RBMixture_ELBO needs an AutoContinuous mixture guide such as AutoCWM; "
            f"got {type(guide).__name__}"
        )
    posterior = substitute(guide._get_posterior, data=params)()
    if not isinstance(posterior, FiniteMixture):
        raise TypeError(
            f"{type(guide).__name__}'s posterior is {type(posterior).__name__}, which has no "
            "sample_components; RBMixture_ELBO needs a finite-mixture guide (AutoCWM)"
        )
    return posterior


def _log_density(model_trace: dict, skip: str | None = None) -> jax.Array:
    """Sum of (scaled) log-densities of the sample sites of a trace."""
    total = 0.0
    for name, site in model_trace.items():
        if site["type"] == "sample" and name != skip:
            log_prob = site["fn"].log_prob(site["value"])
            if site["scale"] is not None:
                log_prob = site["scale"] * log_prob
            total = total + jnp.sum(log_prob)
    return total


def unconstrained_log_joint(
    model,  # noqa: ANN001
    guide: AutoContinuous,
    latent: jax.Array,
    params: dict,
    args: tuple,
    kwargs: dict,
    *,
    rng_key: jax.Array,
) -> jax.Array:
    """``log p(x)`` of the model in the unconstrained space at each packed latent ``x``.

    The guide, substituted with ``params`` and one latent, and the model replayed on it are
    traced once per point under ``jax.vmap``. ``log p(x)`` is the model's log joint (observed
    sites, factors and subsample scaling included) at ``biject_to(x)`` plus the log-Jacobian,
    i.e. minus the log-density of the guide's ``Delta`` sites. Every point shares ``rng_key``,
    so a subsampling plate draws the same minibatch for all of them.

    Shapes:
        ``latent``: ``(M, D)``. Returns ``(M,)``.
    """
    name = latent_site_name(guide)
    key_guide, key_model = jax.random.split(rng_key)

    def one(x: jax.Array) -> jax.Array:
        guided = substitute(seed(guide, key_guide), data={**params, name: x})
        guide_trace = trace(guided).get_trace(*args, **kwargs)
        model_run = replay(substitute(seed(model, key_model), data=params), guide_trace)
        model_trace = trace(model_run).get_trace(*args, **kwargs)
        return _log_density(model_trace) - _log_density(guide_trace, skip=name)

    return jax.vmap(one)(latent)
