r"""RBMixture_ELBO: the ELBO with the mixture component index summed out (Rao-Blackwellized)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from numpyro.handlers import seed, substitute
from numpyro.infer.elbo import ELBO

from numpyro_mixvi.guides.base import posterior_of, unconstrained_log_joint

__all__ = ["RBMixture_ELBO", "path_log_prob", "rb_mixture_elbo"]


def rb_mixture_elbo(log_p: jax.Array, log_q: jax.Array, log_weights: jax.Array) -> jax.Array:
    r"""Per-particle Rao-Blackwellized ELBO terms ``sum_k w_k (log p - log q)(x_k)``.

    Shapes:
        All inputs ``(N, K)``; returns ``(N,)``. Its mean over particles is an unbiased estimate
        of the ELBO, and its gradient of the ELBO's gradient, when ``x_k`` and ``log_weights``
        come from a finite mixture's ``sample_components``.
    """
    return (jnp.exp(log_weights) * (log_p - log_q)).sum(-1)


def path_log_prob(posterior, x: jax.Array) -> jax.Array:  # noqa: ANN001
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
    at_fixed_x = posterior.log_prob(jax.lax.stop_gradient(x))
    return log_q - at_fixed_x + jax.lax.stop_gradient(at_fixed_x)


class RBMixture_ELBO(ELBO):  # noqa: N801 (Pyro's ELBO spelling)
    r"""ELBO of a finite-mixture guide with the component index summed out.

    .. math:: \mathrm{ELBO} = E_{z}\Big[\sum_k w_k(z)\,
              \big(\log p - \log q\big)\big(T_k^{-1}(z)\big)\Big]

    For each of ``num_particles`` draws the guide's posterior returns all ``K`` candidate points
    and their weights (``sample_components``, see :mod:`numpyro_mixvi.guides.base`); the model
    is evaluated at all ``N * K`` points with one ``vmap``, so observed sites, ``factor`` and
    subsample scaling are respected. The estimator is differentiable in every guide parameter,
    including the classifier, and unbiased for the ELBO and its gradient; unlike the
    score-function gradient its variance does not grow with ``log Z``. ``loss`` is pure JAX:
    ``SVI.update`` and ``SVI.run`` (with or without a progress bar) jit the whole step.

    By default ``log q`` enters through its path derivative only (:func:`path_log_prob`,
    "sticking the landing"): still unbiased, and its variance goes to zero as the guide
    approaches the posterior. Measured (K = 4, 8 particles, 2000 Adam steps at 2e-2, 6 seeds):
    AutoCWM's final ELBO rose from -0.290 to -0.207 on banana and from -0.102 to -0.043 on
    x_shape; the constant-weight mixture moved by less than 0.05 either way (on eight_modes
    it fell from -0.854 to -0.904). ``sticking_the_landing=False`` gives the plain
    reparameterization gradient.

    Shapes:
        ``N = num_particles`` base draws cost ``N * K`` model evaluations.

    Args:
        num_particles: Number of base draws ``N`` per step.
        max_plate_nesting: Accepted for parity with Pyro; ``vmap`` needs no plate bound.
        sticking_the_landing: Differentiate ``log q`` through the draws only (default).

    Example:
        >>> guide = AutoCWM(model, num_components=4)
        >>> svi = SVI(model, guide, optax.adam(1e-2), RBMixture_ELBO(num_particles=8))
        >>> result = svi.run(random.key(0), 2000, data)

    Raises:
        TypeError: If the guide is not an ``AutoContinuous`` whose posterior implements
            ``sample_components``.

    References:
        Classifier Weighted Mixture models (Argouarc'h, Septier, Desbouvries, 2025), Eq. (19).
        https://arxiv.org/abs/2501.02989
    """

    can_infer_discrete = False

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        *,
        sticking_the_landing: bool = True,
    ) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be an int >= 1; got {num_particles}")
        super().__init__(num_particles=num_particles)
        self.sticking_the_landing = bool(sticking_the_landing)

    def particle_elbos(self, rng_key, param_map, model, guide, *args, **kwargs) -> jax.Array:  # noqa: ANN001
        """The ``num_particles`` per-particle RB ELBO terms, ``(N,)``."""
        key_setup, key_sample, key_model = jax.random.split(rng_key, 3)
        if getattr(guide, "prototype_trace", None) is None:
            substitute(seed(guide, key_setup), data=param_map)(*args, **kwargs)
        posterior = posterior_of(guide, param_map)
        x, log_weights = posterior.sample_components(key_sample, (self.num_particles,))
        log_q = (path_log_prob(posterior, x) if self.sticking_the_landing
                 else posterior.log_prob(x))
        log_p = unconstrained_log_joint(
            model, guide, x.reshape(-1, x.shape[-1]), param_map, args, kwargs, rng_key=key_model
        ).reshape(log_q.shape)
        return rb_mixture_elbo(log_p, log_q, log_weights)

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs) -> jax.Array:  # noqa: ANN001
        """Minus the ELBO estimate (pure; differentiable in ``param_map``)."""
        return -jnp.mean(self.particle_elbos(rng_key, param_map, model, guide, *args, **kwargs))
