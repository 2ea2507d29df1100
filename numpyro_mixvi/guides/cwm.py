"""AutoCWM: a classifier-weighted mixture over the model's flat unconstrained latent vector."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
from jax import random
from numpyro.distributions import constraints
from numpyro.handlers import substitute
from numpyro.infer.autoguide import AutoContinuous
from numpyro.infer.initialization import init_to_median

from mixvi._checks import check_flow_layers
from numpyro_mixvi.distributions.cwm import (
    ClassifierWeightedMixture,
    init_classifier_params,
    init_component_flows,
)
from numpyro_mixvi.distributions.flow_mixture import partition_trainable
from numpyro_mixvi.guides.base import SampleSummariesOnly

__all__ = ["AutoCWM"]

#: The weights' parameters (``logits`` and every layer of the classifier) are stored multiplied
#: by ``1 / WEIGHT_STEP_SCALE``, so an optimizer such as Adam, whose steps have a fixed size in
#: the stored parameter, moves the weights this much slower than the components. Without it the
#: weights decide before the components have moved: components that start in a poor place are
#: switched off (weight ~1e-5) and never recover (measured in ``tests/numpyro/test_cwm_fits.py``).
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

    ``get_posterior(params)`` returns a :class:`~numpyro_mixvi.ClassifierWeightedMixture`, a
    finite mixture in the sense of :mod:`numpyro_mixvi.guides.base`. Train it with
    :class:`~numpyro_mixvi.RBMixture_ELBO`, which sums the discrete component index out. Stock
    ELBOs raise ``NotImplementedError`` pointing there: ``Trace_ELBO`` would differentiate
    through the ancestral draw and silently miss the index's contribution.

    With ``hidden_dims=None`` the classifier is dropped and the guide is the constant-weight
    Gaussian mixture with the same components (the baseline a CWM must beat). With
    ``flow_layers > 0`` each component's sampling map becomes ``x = loc_k + L_k F_k(z)`` with
    ``F_k`` a RealNVP flow of ``flow_layers`` coupling layers that starts as the identity
    (:func:`~numpyro_mixvi.distributions.cwm.init_component_flows`), so the guide starts equal
    to the affine one and ``RBMixture_ELBO`` trains the flows with everything else.

    At initialization the component locations are ``init_loc + init_scale * (e_k - mean(e))``
    with ``e_k ~ N(0, I)`` (so they do not coincide and average to the init location), every
    scale is ``init_scale`` and the classifier's last layer is zero (constant, uniform weights).
    The weights learn :data:`WEIGHT_STEP_SCALE` times slower than the components (a fixed
    reparameterization: stored ``logits`` and classifier layers are divided by it).

    Shapes:
        ``D`` is the unconstrained latent size, fixed at the first call.
        ``get_posterior(params).log_prob(x)`` maps ``(..., D)`` to ``(...)``.
        The paper's ``T_k`` (latent to reference) is ``get_posterior(params).component_inverse``.

    Args:
        model: A NumPyro model whose latent sites are continuous.
        prefix: Prefix of the guide's parameter names.
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
        >>> svi = SVI(model, guide, optax.adam(1e-2), RBMixture_ELBO(num_particles=8))
        >>> result = svi.run(random.key(0), 2000, data)
        >>> draws = guide.sample_posterior(random.key(1), result.params, sample_shape=(1000,))

    Cost:
        Sampling takes one classifier pass; ``log_prob`` takes ``K``. ``RBMixture_ELBO`` needs
        ``K`` model evaluations per particle, vectorized with ``vmap``.

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
        prefix: str = "auto",
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
        self._flow_skeleton = None
        self.num_components = num_components
        self.hidden_dims = None if hidden_dims is None else tuple(int(h) for h in hidden_dims)
        self.covariance = covariance
        self._init_scale = float(init_scale)
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_flow_skeleton"] = None  # holds flowjax closures; rebuilt on demand
        return state

    def _setup_prototype(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._setup_prototype(*args, **kwargs)
        check_flow_layers(self.flow_layers, self.latent_dim)

    def _build_flows(self, rng_key):  # noqa: ANN001, ANN202
        return init_component_flows(rng_key, self.latent_dim, self.num_components,
                                    self.flow_layers, jnp.result_type(self._init_latent))

    def _component_flows(self):  # noqa: ANN202
        """The stacked component flows from the ``{prefix}_component_flows`` param (or None).

        The param holds the trainable leaves; the rest (treedef, masks, permutations) comes from
        a build with a fixed key, so it is the same in every call and after unpickling. At
        initialization the output layers are zero, so the flows are the identity whatever the
        permutations.
        """
        if self.flow_layers == 0:
            return None
        if self._flow_skeleton is None:
            params, static = partition_trainable(self._build_flows(jax.random.PRNGKey(0)))
            self._flow_skeleton = (jax.tree.structure(params), static)
        treedef, static = self._flow_skeleton
        leaves = numpyro.param(
            f"{self.prefix}_component_flows",
            lambda key: jax.tree.leaves(partition_trainable(self._build_flows(key))[0]),
        )
        return eqx.combine(jax.tree.unflatten(treedef, leaves), static)

    def _init_locs_fn(self, rng_key):  # noqa: ANN001, ANN202
        k, d = self.num_components, self.latent_dim
        offsets = random.normal(rng_key, (k, d), jnp.result_type(self._init_latent))
        offsets = offsets - offsets.mean(0) if k > 1 else jnp.zeros_like(offsets)
        return self._init_latent + self._init_scale * offsets

    def _get_posterior(self) -> ClassifierWeightedMixture:
        k, d = self.num_components, self.latent_dim
        dtype = jnp.result_type(self._init_latent)
        locs = numpyro.param(f"{self.prefix}_locs", self._init_locs_fn)
        if self.covariance == "diag":
            scales = {"scale": numpyro.param(
                f"{self.prefix}_scale", jnp.full((k, d), self._init_scale, dtype),
                constraint=constraints.softplus_positive)}
        else:
            scales = {"scale_tril": numpyro.param(
                f"{self.prefix}_scale_tril",
                jnp.broadcast_to(self._init_scale * jnp.eye(d, dtype=dtype), (k, d, d)),
                constraint=constraints.softplus_lower_cholesky)}
        logits = numpyro.param(f"{self.prefix}_logits", jnp.zeros(k, dtype))
        num_layers = 0 if self.hidden_dims is None else len(self.hidden_dims) + 1
        stored = [  # every layer stored divided by WEIGHT_STEP_SCALE (see there)
            (numpyro.param(f"{self.prefix}_classifier_weight_{i}",
                           lambda key, i=i: self._init_layers(key)[i][0] / WEIGHT_STEP_SCALE),
             numpyro.param(f"{self.prefix}_classifier_bias_{i}",
                           lambda key, i=i: self._init_layers(key)[i][1] / WEIGHT_STEP_SCALE))
            for i in range(num_layers)
        ]
        layers = [(WEIGHT_STEP_SCALE * weight, WEIGHT_STEP_SCALE * bias)
                  for weight, bias in stored]
        return ClassifierWeightedMixture(locs, logits=WEIGHT_STEP_SCALE * logits,
                                         classifier_params=layers,
                                         flows=self._component_flows(), **scales)

    def _init_layers(self, rng_key):  # noqa: ANN001, ANN202
        return init_classifier_params(rng_key, self.latent_dim, self.num_components,
                                      self.hidden_dims, jnp.result_type(self._init_latent))

    def get_posterior(self, params: dict) -> ClassifierWeightedMixture:
        """The classifier-weighted mixture over the packed unconstrained latent at ``params``."""
        return substitute(self._get_posterior, data=params)()
