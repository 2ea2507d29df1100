r"""The finite-mixture protocol that ``RBMixture_ELBO`` is written against.

A guide takes part in the Rao-Blackwellized mixture ELBO when it is a Pyro ``AutoContinuous``
(packed unconstrained latent ``x`` in R^D, ``biject_to`` with the Jacobian) whose
``get_posterior(*args, **kwargs)`` returns a :class:`FiniteMixture`: a distribution over ``x``
with a ``log_prob`` and a method

``rsample_components(sample_shape) -> (x, log_weights)``

with ``x`` of shape ``sample_shape + (K, D)`` and ``log_weights`` of shape
``sample_shape + (K,)``, such that for every integrable ``h``

.. math:: E_q[h(x)] = E\Big[\sum_k \exp(\text{log\_weights}_k)\, h(x_k)\Big],

both outputs differentiable (reparameterized) in the guide's parameters. Two instances:

- classifier-weighted mixture (``ClassifierWeightedMixture``): ``x_k = T_k^{-1}(z)`` for one
  shared ``z ~ N(0, I)`` and ``log_weights = log w(z)``;
- global-weight mixture (e.g. a flow mixture with weights ``pi``): ``x_k ~ q_k`` drawn
  independently (reparameterized) and ``log_weights = log pi`` broadcast to
  ``sample_shape + (K,)``.

The ELBO then evaluates ``log p(x_k) - log q(x_k)`` at all ``K`` points of every particle in one
vectorized model run (:func:`unconstrained_log_joint`) and weights them. Implementing the
protocol is all a new mixture guide needs; nothing else of the guide is used.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.poutine.util import prune_subsample_sites

__all__ = [
    "FiniteMixture",
    "SampleSummariesOnly",
    "latent_site_name",
    "path_log_prob",
    "model_plate_nesting",
    "posterior_of",
    "rb_mixture_elbo",
    "rb_mixture_particle_elbos",
    "unconstrained_log_joint",
]


@runtime_checkable
class FiniteMixture(Protocol):
    """A distribution over R^D that exposes Rao-Blackwellized component draws.

    Shapes:
        ``log_prob``: ``(..., D)`` to ``(...)``. ``rsample_components(sample_shape)`` returns
        ``x: sample_shape + (K, D)`` and ``log_weights: sample_shape + (K,)`` with
        ``logsumexp(log_weights, -1) == 0``.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor: ...

    def rsample_components(
        self, sample_shape: torch.Size | tuple[int, ...] = ...
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class SampleSummariesOnly:
    """Mixin for mixture guides: ``median``/``quantiles`` are refused (no closed form).

    A mixture's median is not a component location and its quantiles have no closed form;
    the message points to sample quantiles (``Predictive``). Put it before ``AutoContinuous``
    in the bases.
    """

    def median(self, *args, **kwargs) -> dict:
        """Not available: a mixture's median is not a component location and has no closed form.

        Use ``Predictive(model, guide=guide, num_samples=...)`` and take sample quantiles.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form median; draw posterior samples "
            "(Predictive) instead"
        )

    def quantiles(self, quantiles, *args, **kwargs) -> dict:  # noqa: ANN001
        """Not available (see :meth:`median`)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form quantiles; draw posterior samples "
            "(Predictive) instead"
        )


def latent_site_name(guide: AutoContinuous) -> str:
    """Name of the guide's auxiliary packed-latent site, ``"_{ClassName}_latent"``."""
    return f"_{guide._pyro_name}_latent"


def posterior_of(guide: AutoContinuous, *args, **kwargs) -> FiniteMixture:
    """Run ``guide`` once and return the posterior it sampled its packed latent from.

    Running the guide (rather than calling ``get_posterior`` directly) registers its parameters
    with the param store, so ``SVI`` optimizes them.

    Raises:
        TypeError: If ``guide`` is not an ``AutoContinuous`` whose posterior is a
            :class:`FiniteMixture`.
    """
    if not isinstance(guide, AutoContinuous):
        raise TypeError(
            f"RBMixture_ELBO needs an AutoContinuous mixture guide such as AutoCWM; "
            f"got {type(guide).__name__}"
        )
    with poutine.block(hide_types=["sample"]):
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    posterior = trace.nodes[latent_site_name(guide)]["fn"]
    while not isinstance(posterior, FiniteMixture) and hasattr(posterior, "base_dist"):
        posterior = posterior.base_dist  # unwrap plate expansion
    if not isinstance(posterior, FiniteMixture):
        raise TypeError(
            f"{type(guide).__name__}.get_posterior() returns {type(posterior).__name__}, which "
            "has no rsample_components; RBMixture_ELBO needs a finite-mixture guide (AutoCWM)"
        )
    return posterior


def model_plate_nesting(model, args: tuple, kwargs: dict) -> int:  # noqa: ANN001
    """Depth of the model's vectorized plates (``max_plate_nesting``), from one prior run.

    Only the model runs (no guide, no log-densities), so a guide that cannot be evaluated yet
    (e.g. a diverged expert) does not stop the guess.
    """
    with poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    dims = [-frame.dim for site in trace.nodes.values() if site["type"] == "sample"
            for frame in site["cond_indep_stack"] if frame.vectorized]
    return max(dims, default=0)


def _per_point(log_prob: torch.Tensor, dim: int, num_points: int) -> torch.Tensor:
    """Sum a site's log-prob over every dim but the point plate at ``dim``; returns ``(M,)``."""
    if log_prob.dim() < -dim:  # the site does not depend on the point
        return log_prob.sum().expand(num_points)
    return log_prob.reshape(log_prob.shape[: log_prob.dim() + dim + 1] + (-1,)).sum(-1).reshape(
        num_points
    )


def unconstrained_log_joint(
    model,  # noqa: ANN001
    guide: AutoContinuous,
    latent: torch.Tensor,
    args: tuple,
    kwargs: dict,
    *,
    max_plate_nesting: int,
) -> torch.Tensor:
    """``log p(x)`` of the model in the unconstrained space at each packed latent ``x``.

    One vectorized run: the guide, conditioned on ``latent``, and the model replayed on it run
    inside a plate of size ``M`` left of the model's plates. ``log p(x)`` is the model's log
    joint (observed sites, factors and subsample scaling included) at ``biject_to(x)`` plus the
    log-Jacobian, i.e. minus the log-density of the guide's ``Delta`` sites.

    Shapes:
        ``latent``: ``(M, D)``. Returns ``(M,)``.
    """
    num_points = latent.shape[0]
    dim = -max_plate_nesting - 1
    latent = latent.reshape((num_points,) + (1,) * max_plate_nesting + latent.shape[-1:])
    name = latent_site_name(guide)
    with pyro.plate("_rb_mixture_points", num_points, dim=dim):
        guide_trace = poutine.trace(poutine.condition(guide, data={name: latent})).get_trace(
            *args, **kwargs
        )
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    log_p = latent.new_zeros(num_points)
    for trace, sign in ((prune_subsample_sites(model_trace), 1.0),
                        (prune_subsample_sites(guide_trace), -1.0)):
        trace.compute_log_prob(site_filter=lambda site_name, site: site_name != name)
        for site_name, site in trace.nodes.items():
            if site["type"] == "sample" and site_name != name:
                log_p = log_p + sign * _per_point(site["log_prob"], dim, num_points)
    return log_p


def rb_mixture_elbo(
    log_p: torch.Tensor, log_q: torch.Tensor, log_weights: torch.Tensor
) -> torch.Tensor:
    r"""Per-particle Rao-Blackwellized ELBO terms ``sum_k w_k (log p - log q)(x_k)``.

    Shapes:
        All inputs ``(N, K)``; returns ``(N,)``. Its mean over particles is an unbiased estimate
        of the ELBO, and its gradient of the ELBO's gradient, when ``x_k`` and ``log_weights``
        come from a finite mixture's ``rsample_components``.
    """
    return (log_weights.exp() * (log_p - log_q)).sum(-1)


def path_log_prob(posterior: FiniteMixture, x: torch.Tensor) -> torch.Tensor:
    r"""``log q(x)`` whose gradient flows through ``x`` only (the "sticking the landing" term).

    The value is ``posterior.log_prob(x)``; the gradient drops the direct parameter term
    ``grad_theta log q_theta(x)`` at fixed ``x``. Its expectation under the Rao-Blackwellized
    draws is ``E_q[grad_theta log q_theta] = grad_theta int q = 0``, so the ELBO gradient stays
    unbiased, and its variance vanishes as ``q`` approaches the posterior. Works for any
    finite mixture (no access to the posterior's parameters is needed): the surrogate is
    ``log q(x) - log q(stop(x)) + stop(log q(stop(x)))``.

    Shapes:
        ``x``: ``(..., D)``; returns ``(...)``.

    References:
        Sticking the Landing (Roeder, Wu, Duvenaud, 2017). https://arxiv.org/abs/1703.09194
    """
    log_q = posterior.log_prob(x)
    at_fixed_x = posterior.log_prob(x.detach())
    return log_q - at_fixed_x + at_fixed_x.detach()


def rb_mixture_particle_elbos(
    model,  # noqa: ANN001
    guide: AutoContinuous,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    max_plate_nesting: int,
    sticking_the_landing: bool = False,
) -> torch.Tensor:
    """``num_particles`` Rao-Blackwellized ELBO terms of a finite-mixture guide; ``(N,)``.

    Draws ``rsample_components((N,))`` from the guide's posterior, evaluates the model at all
    ``N * K`` points in one vectorized run (:func:`unconstrained_log_joint`) and weights them
    (:func:`rb_mixture_elbo`). ``RBMixture_ELBO`` and ``AutoFlowMixture.fit`` (stage 3) both
    call this. With ``sticking_the_landing`` ``log q`` is :func:`path_log_prob`.
    """
    posterior = posterior_of(guide, *args, **kwargs)
    x, log_weights = posterior.rsample_components((num_particles,))
    log_q = path_log_prob(posterior, x) if sticking_the_landing else posterior.log_prob(x)
    log_p = unconstrained_log_joint(
        model, guide, x.reshape(-1, x.shape[-1]), args, kwargs,
        max_plate_nesting=max_plate_nesting,
    ).reshape(log_q.shape)
    return rb_mixture_elbo(log_p, log_q, log_weights)
