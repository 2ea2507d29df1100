r"""RBMixture_ELBO: the ELBO with the mixture component index summed out (Rao-Blackwellized)."""

from __future__ import annotations

import torch
from pyro.infer import ELBO

from pyro_mixvi.guides.base import path_log_prob, rb_mixture_elbo, rb_mixture_particle_elbos

__all__ = ["RBMixture_ELBO", "path_log_prob", "rb_mixture_elbo"]


class RBMixture_ELBO(ELBO):  # noqa: N801 (Pyro's ELBO spelling)
    r"""ELBO of a finite-mixture guide with the component index summed out.

    .. math:: \mathrm{ELBO} = E_{z}\Big[\sum_k w_k(z)\,
              \big(\log p - \log q\big)\big(T_k^{-1}(z)\big)\Big]

    For each of ``num_particles`` draws the guide's posterior returns all ``K`` candidate points
    and their weights (``rsample_components``, see :mod:`pyro_mixvi.guides.base`); the model is
    evaluated at all ``N * K`` points in one vectorized run inside a plate left of the model's
    plates, so observed sites, ``pyro.factor`` and subsample scaling are respected. The
    estimator is differentiable in every guide parameter, including the classifier, and
    unbiased for the ELBO and its gradient. Unlike the score-function gradient its variance does
    not grow with ``log Z`` (``sum_k grad w_k = 0``), so at equal model evaluations it is far
    less noisy on unnormalized targets; on a normalized target the two can be comparable.

    By default ``log q`` enters through its path derivative only (:func:`path_log_prob`,
    "sticking the landing"): still unbiased, and its variance goes to zero as the guide
    approaches the posterior. Measured (K = 4, 8 particles, 2000 Adam steps at 2e-2, 6 seeds):
    AutoCWM's final ELBO rose from -0.290 to -0.207 on banana and from -0.102 to -0.043 on
    x_shape; the constant-weight mixture moved by less than 0.05 either way (on eight_modes
    it fell from -0.854 to -0.904). ``sticking_the_landing=False`` gives the plain
    reparameterization gradient.

    Shapes:
        ``N = num_particles`` base draws cost ``N * K`` model evaluations, in one model call.

    Args:
        num_particles: Number of base draws ``N`` per step.
        max_plate_nesting: Bound on the model's plate nesting; guessed by one run if ``inf``.
        sticking_the_landing: Differentiate ``log q`` through the draws only (default).

    Example:
        >>> guide = AutoCWM(model, num_components=4)
        >>> svi = SVI(model, guide, Adam({"lr": 1e-2}), RBMixture_ELBO(num_particles=8))
        >>> loss = svi.step(data)

    Raises:
        TypeError: If the guide is not an ``AutoContinuous`` whose posterior implements
            ``rsample_components``.

    References:
        Classifier Weighted Mixture models (Argouarc'h, Septier, Desbouvries, 2025), Eq. (19).
        https://arxiv.org/abs/2501.02989
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        *,
        sticking_the_landing: bool = True,
    ) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be an int >= 1; got {num_particles}")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.sticking_the_landing = bool(sticking_the_landing)

    def _get_trace(self, model, guide, args, kwargs):  # noqa: ANN001, ANN202
        raise NotImplementedError("RBMixture_ELBO evaluates the model at K points per particle")

    def _particle_elbos(self, model, guide, *args, **kwargs) -> torch.Tensor:  # noqa: ANN001
        if getattr(guide, "prototype_trace", None) is None and hasattr(guide, "_setup_prototype"):
            guide._setup_prototype(*args, **kwargs)
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        return rb_mixture_particle_elbos(
            model, guide, args, kwargs,
            num_particles=self.num_particles, max_plate_nesting=self.max_plate_nesting,
            sticking_the_landing=self.sticking_the_landing,
        )

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # noqa: ANN001
        """Minus the ELBO estimate, differentiable in the guide's and model's parameters."""
        return -self._particle_elbos(model, guide, *args, **kwargs).mean()

    def loss(self, model, guide, *args, **kwargs) -> float:  # noqa: ANN001
        """Minus the ELBO estimate, as a float."""
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:  # noqa: ANN001
        """Minus the ELBO estimate; also backpropagates it into the parameters' ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()
