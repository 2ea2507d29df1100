r"""Classifier-weighted mixture (CWM): a mixture whose weights are a classifier of the base point.

The density over ``x`` in R^D with ``K`` affine components is

.. math:: q(x) = \sum_k w_k(T_k(x))\, \mathcal{N}(T_k(x); 0, I)\, |\det \partial_x T_k(x)|,
          \qquad w(z) = \mathrm{softmax}(b + f_\theta(z)),

normalized by construction because ``sum_k w_k(z) = 1``. Sampling is ancestral:
``z ~ N(0, I)``, ``r ~ Cat(w(z))``, ``x = T_r^{-1}(z)``.

Direction: the forward (sampling) map of component ``k`` is ``x = loc_k + L_k z``, or
``x = loc_k + L_k F_k(z)`` with optional flow components ``F_k``
(:meth:`ClassifierWeightedMixture.component_forward`); the paper's ``T_k`` (latent to reference)
is :meth:`ClassifierWeightedMixture.component_inverse`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import zuko
from pyro.distributions import constraints
from torch import nn

from mixvi._checks import check_flow_layers
from pyro_mixvi.distributions._index_mixture import IndexMixture
from pyro_mixvi.flows._zuko import zero_last_layers
from pyro_mixvi.flows.realnvp import RealNVP

__all__ = [
    "FLOW_HIDDEN_DIMS",
    "FLOW_MAX_LOG_SCALE",
    "ClassifierWeightedMixture",
    "classifier_logits",
    "init_classifier_params",
    "init_component_flows",
]

#: Hidden widths of each coupling layer's MLP in :func:`init_component_flows`.
FLOW_HIDDEN_DIMS = (32, 32)
#: Soft bound on each coupling layer's ``|log-scale|`` in :func:`init_component_flows` (the
#: affine part ``loc_k + L_k`` carries the component's scale; the flow only bends its shape).
FLOW_MAX_LOG_SCALE = 2.0

ClassifierParams = Sequence[tuple[torch.Tensor, torch.Tensor]]


def classifier_logits(
    z: torch.Tensor, logits: torch.Tensor, classifier_params: ClassifierParams
) -> torch.Tensor:
    """Logits ``b + f(z)`` of the classifier: a Tanh MLP ``f`` (no final activation) plus a bias.

    Shapes:
        ``z``: ``(..., D)``; ``logits``: ``(K,)``; layer ``i`` of ``classifier_params`` is
        ``(weight (d_i, d_{i+1}), bias (d_{i+1},))`` with ``d_0 = D`` and last width ``K``.
        Returns ``(..., K)``. An empty ``classifier_params`` gives constant logits.
    """
    h = z
    for i, (weight, bias) in enumerate(classifier_params):
        h = h @ weight + bias
        if i + 1 < len(classifier_params):
            h = torch.tanh(h)
    if not classifier_params:
        return logits.expand(z.shape[:-1] + logits.shape)
    return h + logits


def init_classifier_params(
    input_dim: int, num_components: int, hidden_dims: Sequence[int] | None, prototype: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Classifier layers for ``hidden_dims``; the last layer is zero, so weights start constant.

    Hidden layers use torch's default ``nn.Linear`` initialization (uniform in
    ``±1/sqrt(fan_in)``) drawn from the global torch RNG; ``hidden_dims=None`` gives no layers
    (a constant-weight Gaussian mixture). Tensors follow ``prototype``'s dtype and device.
    """
    if hidden_dims is None:
        return []
    widths = [input_dim, *hidden_dims]
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        bound = 1.0 / math.sqrt(fan_in)
        weight = (torch.rand(fan_in, fan_out, dtype=prototype.dtype, device=prototype.device)
                  * 2 - 1) * bound
        bias = (torch.rand(fan_out, dtype=prototype.dtype, device=prototype.device) * 2 - 1) * bound
        layers.append((weight, bias))
    layers.append((prototype.new_zeros(widths[-1], num_components),
                   prototype.new_zeros(num_components)))
    return layers


def init_component_flows(
    input_dim: int,
    num_components: int,
    flow_layers: int,
    prototype: torch.Tensor,
    *,
    hidden_dims: Sequence[int] = FLOW_HIDDEN_DIMS,
    max_log_scale: float = FLOW_MAX_LOG_SCALE,
) -> nn.ModuleList | None:
    """``K`` identity-initialized RealNVP flows for the components (None if ``flow_layers == 0``).

    Each is :func:`~pyro_mixvi.flows.RealNVP` with ``flow_layers`` coupling layers whose output
    layers are zero, so every ``F_k`` starts as the identity and a CWM built with them equals the
    affine one. Hidden layers use torch's default initialization from the global RNG; the
    modules follow ``prototype``'s dtype and device.

    Raises:
        ValueError: If ``flow_layers`` is not an integer >= 0, or ``flow_layers > 0`` and
            ``input_dim < 2`` (a coupling layer splits the coordinates in two).
    """
    check_flow_layers(flow_layers, input_dim)
    if flow_layers == 0:
        return None
    return nn.ModuleList(
        zero_last_layers(RealNVP(input_dim, num_transforms=flow_layers, hidden_dims=hidden_dims,
                                 max_log_scale=max_log_scale).to(prototype))
        for _ in range(num_components)
    )


class ClassifierWeightedMixture(IndexMixture):
    r"""Mixture of ``K`` affine maps of ``N(0, I)`` weighted by a classifier of the base point.

    .. math:: q(x) = \sum_k w_k(z_k)\, \mathcal{N}(z_k; 0, I)\, |\det L_k|^{-1},
              \qquad z_k = L_k^{-1}(x - \mathrm{loc}_k)

    With flow components (``flows``) the sampling map of component ``k`` is
    ``x = loc_k + L_k F_k(z)`` with ``F_k`` an invertible coupling flow, and
    ``z_k = F_k^{-1}(L_k^{-1}(x - loc_k))`` with the flow's log-Jacobian added to the density.
    The flow acts before the affine map, on the standardized point, so its networks see
    unit-scale inputs whatever the scale of ``x`` (as AutoFlowMixture's experts). The classifier
    still acts on the shared base point ``z``.

    It is a finite mixture in the sense of :mod:`pyro_mixvi.guides.base`:
    :meth:`rsample_components` returns all ``K`` images of one base draw with the weights
    ``w(z)``, so ``E_q[h] = E_z[sum_k w_k(z) h(x_k(z))]`` can be estimated without sampling the
    discrete index (the Rao-Blackwellized estimator). The ancestral :meth:`sample` is not
    reparameterizable (``has_rsample = False``): gradient-based fitting goes through
    :meth:`log_prob` (maximum likelihood, :meth:`fit`) or through :meth:`rsample_components`
    (variational inference, ``RBMixture_ELBO``).

    Shapes:
        ``locs``: ``(K, D)``; ``scale``: ``(K, D)`` (diagonal components) or ``scale_tril``:
        ``(K, D, D)`` (lower-triangular, positive diagonal); ``logits``: ``(K,)``.
        ``log_prob`` maps ``(..., D)`` to ``(...)``; ``sample(sample_shape)`` returns
        ``sample_shape + (D,)``. ``batch_shape`` is ``()``, ``event_shape`` is ``(D,)``.

    Args:
        locs: Component locations.
        scale: Diagonal component scales (positive). Exactly one of ``scale``/``scale_tril``.
        scale_tril: Lower-triangular component scale matrices.
        logits: Constant part of the classifier's logits; defaults to zeros (uniform weights).
        classifier_params: Layers ``(weight (d_in, d_out), bias (d_out,))`` of the Tanh MLP
            ``f``; the first ``d_in`` is ``D`` and the last ``d_out`` is ``K``. Empty (default):
            constant weights ``softmax(logits)``, i.e. a Gaussian mixture.
        flows: Optional ``K`` unconditional zuko flows over ``R^D`` (e.g. from
            :func:`init_component_flows`); ``flows[k].transform()`` is ``F_k^{-1}`` (zuko's
            data-to-base direction). None (default): affine components.
        validate_args: Passed to the torch ``Distribution``.

    Example:
        >>> cwm = ClassifierWeightedMixture(torch.randn(3, 2), scale=torch.ones(3, 2))
        >>> cwm.log_prob(cwm.sample((5,))).shape
        torch.Size([5])

    Cost:
        ``log_prob`` evaluates the classifier at ``K`` points per input (``O(K^2)`` outputs);
        ``rsample_components`` and ``sample`` evaluate it once per base draw. Flows add ``K``
        flow passes (inverse in ``log_prob``, forward in sampling), run as a loop over ``K``.

    Raises:
        ValueError: If the shapes of the parameters disagree or ``flows`` is not ``K`` zuko
            flows over ``R^D`` (the message names the argument).

    References:
        Classifier Weighted Mixture models (Argouarc'h, Septier, Desbouvries, 2025).
        https://arxiv.org/abs/2501.02989
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        locs: torch.Tensor,
        *,
        scale: torch.Tensor | None = None,
        scale_tril: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        classifier_params: ClassifierParams = (),
        flows: Sequence[zuko.flows.Flow] | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if locs.dim() != 2 or locs.shape[0] < 1:
            raise ValueError(f"locs must have shape (K, D) with K >= 1; got {tuple(locs.shape)}")
        num_components, dim = locs.shape
        if (scale is None) == (scale_tril is None):
            raise ValueError("pass exactly one of scale (K, D) or scale_tril (K, D, D)")
        if scale is not None and scale.shape != locs.shape:
            raise ValueError(
                f"scale must have shape {tuple(locs.shape)}; got {tuple(scale.shape)}"
            )
        if scale_tril is not None and scale_tril.shape != (num_components, dim, dim):
            raise ValueError(
                f"scale_tril must have shape {(num_components, dim, dim)}; "
                f"got {tuple(scale_tril.shape)}"
            )
        logits = locs.new_zeros(num_components) if logits is None else logits
        if logits.shape != (num_components,):
            raise ValueError(
                f"logits must have shape ({num_components},); got {tuple(logits.shape)}"
            )
        _check_classifier(classifier_params, dim, num_components)
        _check_flows(flows, dim, num_components)
        self.locs, self.scale, self.scale_tril = locs, scale, scale_tril
        self.logits = logits
        self.classifier_params = tuple(classifier_params)
        self.flows = None if flows is None else tuple(flows)
        super().__init__(torch.Size(), torch.Size([dim]), validate_args=validate_args)

    @property
    def num_components(self) -> int:
        """Number of components ``K``."""
        return self.locs.shape[0]

    def log_weights(self, z: torch.Tensor) -> torch.Tensor:
        """Log classifier weights ``log w(z)``: ``(..., D)`` to ``(..., K)``."""
        return torch.log_softmax(classifier_logits(z, self.logits, self.classifier_params), -1)

    def _log_det_scale(self) -> torch.Tensor:
        if self.scale is not None:
            return self.scale.log().sum(-1)
        return self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    def component_forward(self, z: torch.Tensor) -> torch.Tensor:
        """All ``K`` sampling maps ``x_k = loc_k + L_k F_k(z)``: ``(..., D)`` to ``(..., K, D)``.

        Without flows ``F_k`` is the identity.
        """
        if self.flows is None:
            u = z.unsqueeze(-2)
        else:
            u = torch.stack([flow.transform().inv(z) for flow in self.flows], -2)
        if self.scale is not None:
            return self.locs + self.scale * u
        return self.locs + (self.scale_tril @ u.unsqueeze(-1)).squeeze(-1)

    def component_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's maps ``z_k = T_k(x) = F_k^{-1}(L_k^{-1}(x - loc_k))``.

        Shapes:
            ``(..., D)`` to ``(..., K, D)``.
        """
        return self._inverse_and_log_det(x)[0]

    def _inverse_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z_k = T_k(x)`` ``(..., K, D)`` and ``log |det dT_k/dx|`` ``(..., K)``."""
        centred = x.unsqueeze(-2) - self.locs
        if self.scale is not None:
            u = centred / self.scale
        else:
            u = torch.linalg.solve_triangular(
                self.scale_tril, centred.unsqueeze(-1), upper=False
            ).squeeze(-1)
        log_det = -self._log_det_scale()
        if self.flows is None:
            return u, log_det.expand(u.shape[:-1])
        pairs = [flow.transform().call_and_ladj(u[..., k, :]) for k, flow in enumerate(self.flows)]
        z = torch.stack([z_k for z_k, _ in pairs], -2)
        return z, log_det + torch.stack([ladj for _, ladj in pairs], -1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z, log_det = self._inverse_and_log_det(value)  # (..., K, D), (..., K)
        dim = z.shape[-1]
        log_normal = -0.5 * z.pow(2).sum(-1) - 0.5 * dim * math.log(2 * math.pi)
        log_w = self.log_weights(z).diagonal(dim1=-2, dim2=-1)  # w_k evaluated at z_k
        return torch.logsumexp(log_normal + log_w + log_det, -1)

    def rsample_components(
        self, sample_shape: torch.Size | tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rao-Blackwellized draws: ``x_k = T_k^{-1}(z)`` for one shared ``z`` and ``log w(z)``.

        ``E_q[h(x)] = E_z[sum_k exp(log_weights_k) h(x_k)]``; both outputs are differentiable
        in every parameter (the finite-mixture protocol of :mod:`pyro_mixvi.guides.base`).

        Shapes:
            Returns ``x``: ``sample_shape + (K, D)`` and ``log_weights``: ``sample_shape + (K,)``.
        """
        shape = torch.Size(sample_shape) + self.event_shape
        z = torch.randn(shape, dtype=self.locs.dtype, device=self.locs.device)
        return self.component_forward(z), self.log_weights(z)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Ancestral draws ``z -> r ~ Cat(w(z)) -> x = T_r^{-1}(z)``: ``sample_shape + (D,)``."""
        with torch.no_grad():
            x, log_weights = self.rsample_components(sample_shape)
            index = torch.distributions.Categorical(logits=log_weights).sample()
            return x.gather(-2, index[..., None, None].expand(index.shape + (1, x.shape[-1])))[
                ..., 0, :
            ]

    @classmethod
    def from_samples(
        cls,
        samples: torch.Tensor,
        num_components: int,
        *,
        hidden_dims: Sequence[int] | None = (32, 32),
        covariance: str = "diag",
        em_steps: int = 100,
        flow_layers: int = 0,
        generator: torch.Generator | None = None,
    ) -> ClassifierWeightedMixture:
        """A CWM that equals the Gaussian mixture fitted to ``samples`` by EM (the paper's init).

        The classifier's last layer is zero and ``logits`` are the EM log-weights, so the
        classifier starts constant; with ``flow_layers > 0`` every component also gets an
        identity-initialized RealNVP flow of that many coupling layers
        (:func:`init_component_flows`). :meth:`fit` then trains every parameter.

        Shapes:
            ``samples``: ``(N, D)`` with ``N >= num_components``.

        Raises:
            ValueError: If ``num_components < 1``, ``samples`` is not ``(N, D)`` with
                ``N >= num_components``, ``samples`` holds non-finite values, ``covariance``
                is not ``"diag"`` or ``"full"``, or ``flow_layers`` is negative (or positive
                with ``D = 1``).
        """
        from pyro_mixvi.distributions._gmm_em import gaussian_mixture_em

        _check_samples(samples, num_components)
        if covariance not in ("diag", "full"):
            raise ValueError(f"covariance must be 'diag' or 'full'; got {covariance!r}")
        check_flow_layers(flow_layers, samples.shape[-1])
        weights, locs, scales = gaussian_mixture_em(
            samples, num_components, covariance=covariance, num_steps=em_steps, generator=generator
        )
        kind = "scale" if covariance == "diag" else "scale_tril"
        return cls(
            locs,
            **{kind: scales},
            logits=weights.log(),
            classifier_params=init_classifier_params(
                samples.shape[-1], num_components, hidden_dims, samples
            ),
            flows=init_component_flows(samples.shape[-1], num_components, flow_layers, samples),
        )

    def fit(
        self,
        samples: torch.Tensor,
        *,
        num_steps: int = 1000,
        batch_size: int = 1024,
        lr: float = 5e-3,
        progress_bar: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[ClassifierWeightedMixture, torch.Tensor]:
        """Maximum-likelihood fit of every parameter by Adam on minibatches of ``samples``.

        Starts from this distribution's parameters (e.g. :meth:`from_samples`) and returns a
        new distribution; ``self`` is unchanged.

        Shapes:
            ``samples``: ``(N, D)``. Returns the fitted distribution and the per-step mean
            negative log-likelihood ``(num_steps,)``.

        Raises:
            ValueError: If ``samples`` is not ``(N, D)`` or holds non-finite values.
            FloatingPointError: If the loss or a parameter becomes non-finite (names the step).
        """
        from pyro_mixvi.distributions._cwm_fit import fit_cwm

        _check_samples(samples, 1, dim=self.event_shape[0])
        return fit_cwm(
            self, samples, num_steps=num_steps, batch_size=batch_size, lr=lr,
            progress_bar=progress_bar, generator=generator,
        )


def _check_classifier(classifier_params: ClassifierParams, dim: int, num_components: int) -> None:
    width = dim
    for i, layer in enumerate(classifier_params):
        weight, bias = layer
        if weight.dim() != 2 or weight.shape[0] != width or bias.shape != weight.shape[-1:]:
            raise ValueError(
                f"classifier_params[{i}] must be (weight ({width}, d), bias (d,)); got shapes "
                f"{tuple(weight.shape)}, {tuple(bias.shape)}"
            )
        width = weight.shape[1]
    if classifier_params and width != num_components:
        raise ValueError(
            f"the last classifier layer must output K={num_components} logits; got {width}"
        )


def _check_flows(flows: Sequence[zuko.flows.Flow] | None, dim: int, num_components: int) -> None:
    if flows is None:
        return
    if len(flows) != num_components:
        raise ValueError(f"flows must hold K={num_components} flows; got {len(flows)}")
    for k, flow in enumerate(flows):
        if not isinstance(flow, zuko.flows.Flow) or flow.base().event_shape != (dim,):
            raise ValueError(
                f"flows[{k}] must be an unconditional zuko flow over R^{dim} (e.g. from "
                f"init_component_flows); got {type(flow).__name__}"
            )


def _check_samples(samples: torch.Tensor, num_components: int, *, dim: int | None = None) -> None:
    if not isinstance(num_components, int) or num_components < 1:
        raise ValueError(f"num_components must be an int >= 1; got {num_components}")
    if samples.dim() != 2 or (dim is not None and samples.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"samples must have shape {want}; got {tuple(samples.shape)}")
    if samples.shape[0] < num_components:
        raise ValueError(
            f"need at least num_components={num_components} samples; got {samples.shape[0]}"
        )
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).any(-1).sum())
        raise ValueError(f"samples hold {bad} rows with non-finite values; drop or fix them")
