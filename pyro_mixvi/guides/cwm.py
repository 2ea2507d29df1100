"""AutoCWM: a classifier-weighted mixture over the model's flat unconstrained latent vector."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import nn

from mixvi._checks import check_flow_layers
from pyro_mixvi.distributions.cwm import (
    ClassifierWeightedMixture,
    init_classifier_params,
    init_component_flows,
)
from pyro_mixvi.guides.base import SampleSummariesOnly

__all__ = ["AutoCWM"]

#: The weights' parameters (``logits`` and every layer of the classifier) are stored multiplied
#: by ``1 / WEIGHT_STEP_SCALE``, so an optimizer such as Adam, whose steps have a fixed size in
#: the stored parameter, moves the weights this much slower than the components. Without it the
#: weights decide before the components have moved: components that start in a poor place are
#: switched off (weight ~1e-5) and never recover (measured in ``tests/pyro/test_cwm_fits.py``).
#: The hidden layers must be slowed as well, not only the output layer: Adam normalizes their
#: gradient (proportional to the near-zero output layer) to full-size steps, and in the first
#: ~250 steps, while the constant part of the weights is being learned, the second layer's
#: pre-activations were driven past |2| for every base point (tanh saturated, the classifier
#: constant in ``z`` and its gradient gone): banana, K = 4, 2 of 5 seeds stuck at the
#: constant-weight mixture's ELBO (-0.28) before; none after.
WEIGHT_STEP_SCALE = 0.1


class AutoCWM(SampleSummariesOnly, AutoContinuous):
    r"""Classifier-weighted mixture guide over the model's flat unconstrained latent ``x``.

    .. math:: q(x) = \sum_k w_k(T_k(x))\, \mathcal{N}(T_k(x); 0, I)\, |\det \partial_x T_k(x)|

    ``get_posterior()`` returns a :class:`~pyro_mixvi.ClassifierWeightedMixture`, a finite
    mixture in the sense of :mod:`pyro_mixvi.guides.base`. Train it with
    :class:`~pyro_mixvi.RBMixture_ELBO`, which sums the discrete component index out. Stock
    ELBOs raise ``NotImplementedError`` pointing there: the packed latent is not
    reparameterizable, and ``Trace_ELBO``'s score-function fallback omits auxiliary sites from
    its log-ratio, which would bias the gradient silently.

    With ``hidden_dims=None`` the classifier is dropped and the guide is the constant-weight
    Gaussian mixture with the same components (the baseline a CWM must beat). With
    ``flow_layers > 0`` each component's sampling map becomes ``x = loc_k + L_k F_k(z)`` with
    ``F_k`` a RealNVP flow of ``flow_layers`` coupling layers that starts as the identity
    (:func:`~pyro_mixvi.distributions.cwm.init_component_flows`), so the guide starts equal to
    the affine one and ``RBMixture_ELBO`` trains the flows with everything else.

    At initialization the component locations are ``init_loc + init_scale * (e_k - mean(e))``
    with ``e_k ~ N(0, I)`` (so they do not coincide and average to the init location), every
    scale is ``init_scale`` and the classifier's last layer is zero (constant, uniform weights).
    The weights learn :data:`WEIGHT_STEP_SCALE` times slower than the components (a fixed
    reparameterization: stored ``logits`` and classifier layers are divided by it).

    Shapes:
        ``D`` is the unconstrained latent size, fixed at the first call.
        ``get_posterior().log_prob(x)`` maps ``(..., D)`` to ``(...)``.
        The paper's ``T_k`` (latent to reference) is ``get_posterior().component_inverse``.

    Args:
        model: A Pyro model whose latent sites are continuous.
        num_components: Number of components ``K``; at least 1.
        hidden_dims: Hidden widths of the Tanh MLP classifier; ``()`` gives a linear
            classifier and ``None`` constant weights.
        covariance: ``"diag"`` (diagonal component scales) or ``"full"`` (lower-triangular).
        init_loc_fn: Per-site initialization, as in ``AutoMultivariateNormal``. The hosts'
            default ``init_to_median`` differs on a multivariate site: Pyro falls back to the
            origin (``init_to_feasible``), NumPyro takes coordinate-wise medians of 15 prior
            draws, which on a multimodal site can lie inside one mode, and then all ``K``
            components start in its basin (``eight_modes``, K = 4, 5 seeds: NumPyro's
            default covered 1-2 of the 8 modes, the origin start 4). Pass
            ``init_to_feasible`` for the same start in both backends.
        init_scale: Initial scale of every component and spread of their locations; positive.
            The default 0.3 (wider than AutoNormal's 0.1) lets each component reach a
            different mode: with 0.1 all K start nearly on top of each other and on an
            8-mode target with K = 4 AutoCWM found 2 modes (ELBO -1.39 vs -0.69 at 0.3).
        flow_layers: Coupling layers of each component's flow; 0 (default) gives affine
            components. Needs a latent dimension of at least 2.

    Example:
        >>> guide = AutoCWM(model, num_components=4)   # was: AutoNormal(model)
        >>> svi = SVI(model, guide, Adam({"lr": 1e-2}), RBMixture_ELBO(num_particles=8))
        >>> loss = svi.step(data)                      # everything else is unchanged

    Cost:
        Sampling takes one classifier pass; ``log_prob`` takes ``K``. ``RBMixture_ELBO`` needs
        ``K`` model evaluations per particle, run as one vectorized model call.

    Raises:
        ValueError: If ``num_components < 1``, ``init_scale <= 0``, ``covariance`` is unknown,
            a hidden width is not positive or ``flow_layers < 0``; or, at the first call, if the
            model has a discrete latent site (the host's helpful message names it) or
            ``flow_layers > 0`` with a one-dimensional latent.

    References:
        Classifier Weighted Mixture models (Argouarc'h, Septier, Desbouvries, 2025).
        https://arxiv.org/abs/2501.02989
    """

    def __init__(
        self,
        model: Callable,
        *,
        num_components: int = 4,
        hidden_dims: Sequence[int] | None = (32, 32),
        covariance: str = "diag",
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.3,
        flow_layers: int = 0,
    ) -> None:
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be an int >= 1; got {num_components}")
        if hidden_dims is not None and any(int(h) < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be positive widths or None; got {hidden_dims}")
        if covariance not in ("diag", "full"):
            raise ValueError(f"covariance must be 'diag' or 'full'; got {covariance!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0; got {init_scale}")
        check_flow_layers(flow_layers)
        self.flow_layers = flow_layers
        self.num_components = num_components
        self.hidden_dims = None if hidden_dims is None else tuple(int(h) for h in hidden_dims)
        self.covariance = covariance
        self._init_scale = float(init_scale)
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        loc = self._init_loc().detach()
        k, d = self.num_components, self.latent_dim
        check_flow_layers(self.flow_layers, d)
        offsets = torch.randn(k, d, dtype=loc.dtype, device=loc.device)
        offsets = offsets - offsets.mean(0) if k > 1 else torch.zeros_like(offsets)
        self.locs = nn.Parameter(loc + self._init_scale * offsets)
        if self.covariance == "diag":
            self.scales = PyroParam(
                torch.full_like(self.locs, self._init_scale), constraints.softplus_positive
            )
        else:
            eye = torch.eye(d, dtype=loc.dtype, device=loc.device)
            self.scale_tril = PyroParam(
                self._init_scale * eye.expand(k, d, d).clone(), constraints.softplus_lower_cholesky
            )
        self.logits = nn.Parameter(loc.new_zeros(k))
        layers = init_classifier_params(d, k, self.hidden_dims, loc)
        self._num_layers = len(layers)
        for i, (weight, bias) in enumerate(layers):  # plain attributes: Pyro registers them
            # stored divided by WEIGHT_STEP_SCALE (see there)
            setattr(self, f"classifier_weight_{i}", nn.Parameter(weight / WEIGHT_STEP_SCALE))
            setattr(self, f"classifier_bias_{i}", nn.Parameter(bias / WEIGHT_STEP_SCALE))
        # A plain nn.Module attribute: Pyro registers its parameters (pyro.module) on access.
        self.component_flows = init_component_flows(d, k, self.flow_layers, loc)

    def get_posterior(self, *args, **kwargs) -> ClassifierWeightedMixture:
        """The classifier-weighted mixture over the packed unconstrained latent."""
        layers = [
            (WEIGHT_STEP_SCALE * getattr(self, f"classifier_weight_{i}"),
             WEIGHT_STEP_SCALE * getattr(self, f"classifier_bias_{i}"))
            for i in range(self._num_layers)
        ]
        scales = (
            {"scale": self.scales} if self.covariance == "diag" else {"scale_tril": self.scale_tril}
        )
        return ClassifierWeightedMixture(
            self.locs, logits=WEIGHT_STEP_SCALE * self.logits, classifier_params=layers,
            flows=self.component_flows, **scales,
        )
