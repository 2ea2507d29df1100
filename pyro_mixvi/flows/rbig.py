r"""Rotation-based iterative Gaussianization (RBIG), fit from samples; exact, invertible, smooth.

Each layer ``l`` maps data towards the base ``N(0, I)`` by a marginal Gaussianization followed by
a rotation:

.. math:: u_d = \Phi^{-1}(F_{l,d}(x_d)), \qquad y = R_l^\top u,

where ``F_{l,d}`` is the CDF of a Gaussian-kernel density with ``M`` knots at the empirical
quantiles of coordinate ``d`` plus one wide kernel at the data's scale (smooth, strictly
increasing, with Gaussian tails beyond the training range, so every real point has a finite
image both ways and ``Phi^{-1} o F`` is asymptotically linear) and ``R_l`` is orthogonal
(a random rotation or the PCA basis). The log-det of a layer is
``sum_d log f_{l,d}(x_d) - log phi(u_d)``; rotations add nothing.

Direction: :class:`RBIGTransform` maps data to base (Gaussianization; zuko's convention for
``NormalizingFlow``); mixvi's forward (base to latent) is ``transform.inv``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Independent, Normal, Transform, constraints
from tqdm.auto import tqdm
from zuko.distributions import NormalizingFlow

TAIL_WEIGHT = 0.05
"""Weight of the wide kernel that gives every marginal robust tails beyond the data."""
TAIL_SCALE = 2.0
"""Scale of the first layer's wide kernel, in units of the data's sd, for heavy-tailed raw data.
Later layers see Gaussianized data and use 1: a wider kernel there would widen the tails by
that factor again at every layer (``TAIL_SCALE ** L`` overall)."""
_BISECTION_STEPS = 30
_NEWTON_STEPS = 4


def _kernel_terms(x: Tensor, centers: Tensor, bandwidth: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-coordinate ``log F``, ``log (1 - F)`` and ``log f`` of the Gaussian-kernel CDF.

    The knots carry equal weight except the last, the wide "tail" kernel, whose weight is
    encoded in front of its bandwidth (see :func:`_fit_marginals`).

    Shapes: ``x (..., D)``, ``centers (D, M)``, ``bandwidth (D, M)`` -> three ``(..., D)``.
    """
    t = (x.unsqueeze(-1) - centers) / bandwidth
    log_w = _log_knot_weights(centers)
    log_cdf = torch.logsumexp(torch.special.log_ndtr(t) + log_w, -1)
    log_sf = torch.logsumexp(torch.special.log_ndtr(-t) + log_w, -1)
    log_pdf = torch.logsumexp(_log_std_normal(t) + log_w - bandwidth.log(), -1)
    return log_cdf, log_sf, log_pdf


def _log_knot_weights(centers: Tensor) -> Tensor:
    """``log w (M,)``: ``TAIL_WEIGHT`` on the last (tail) knot, the rest shared equally."""
    m = centers.shape[-1]
    log_w = centers.new_full((m,), math.log((1 - TAIL_WEIGHT) / (m - 1)))
    log_w[-1] = math.log(TAIL_WEIGHT)
    return log_w


def _log_std_normal(z: Tensor) -> Tensor:
    return -0.5 * z.square() - 0.5 * math.log(2 * math.pi)


def _ndtri_log(log_p: Tensor) -> Tensor:
    """``Phi^{-1}(exp(log_p))`` for ``log_p <= log(1/2)``, accurate far into the tail.

    An initial guess (``ndtri``, or the Mills-ratio asymptote where ``exp`` would underflow) is
    refined by Newton steps on ``log_ndtr(z) = log_p`` without a graph; a last step with the graph
    attached gives the exact implicit derivative ``dz/dlog_p = Phi(z) / phi(z)``.
    """
    with torch.no_grad():
        safe = log_p.clamp(max=-30.0)
        y = -2.0 * safe
        asymptote = -torch.sqrt(y - torch.log(y) - math.log(2 * math.pi))
        z = torch.where(log_p > -30.0, torch.special.ndtri(log_p.exp()), asymptote)
        for _ in range(_NEWTON_STEPS):
            z = _newton_log_ndtr(z, log_p)
    return _newton_log_ndtr(z.detach(), log_p)


def _newton_log_ndtr(z: Tensor, log_p: Tensor) -> Tensor:
    log_cdf = torch.special.log_ndtr(z)
    return z - (log_cdf - log_p) * torch.exp(log_cdf - _log_std_normal(z))


def marginal_gaussianize(x: Tensor, centers: Tensor, bandwidth: Tensor) -> tuple[Tensor, Tensor]:
    """``u = Phi^{-1}(F(x))`` per coordinate and its log-derivative ``log f(x) - log phi(u)``.

    The lower tail uses ``log F`` and the upper tail ``log (1 - F)``, so neither saturates.

    Shapes: ``x (..., D)``, ``centers``/``bandwidth (D, M)`` -> ``u (..., D)``, ``ladj (..., D)``.
    """
    log_cdf, log_sf, log_pdf = _kernel_terms(x, centers, bandwidth)
    tail = _ndtri_log(torch.minimum(log_cdf, log_sf))
    u = torch.where(log_cdf <= log_sf, tail, -tail)
    return u, log_pdf - _log_std_normal(u)


def marginal_degaussianize(u: Tensor, centers: Tensor, bandwidth: Tensor) -> Tensor:
    """Inverse of :func:`marginal_gaussianize`: solve ``logit F(x) = logit Phi(u)`` for ``x``.

    ``F`` is a mixture of ``Phi((x - c_k) / h_k)``, so the root lies between the kernels' own
    roots ``c_k + h_k u``, which brackets it
    for any finite ``u``; bisection then Newton (no graph) and one graph-attached Newton step
    (exact implicit derivative) solve it.

    Shapes: ``u (..., D)`` -> ``x (..., D)``.
    """
    target = torch.special.log_ndtr(u) - torch.special.log_ndtr(-u)
    h = bandwidth
    with torch.no_grad():
        roots = centers + h * u.unsqueeze(-1)  # where each kernel's own CDF hits Phi(u)
        lo, hi = roots.min(-1).values, roots.max(-1).values
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            above = _logit_gap(mid, target, centers, h) > 0
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        x = 0.5 * (lo + hi)
        for _ in range(_NEWTON_STEPS):
            x = _newton_logit(x, target, centers, h)
    return _newton_logit(x.detach(), target, centers, h)


def _logit_gap(x: Tensor, target: Tensor, centers: Tensor, bandwidth: Tensor) -> Tensor:
    log_cdf, log_sf, _ = _kernel_terms(x, centers, bandwidth)
    return log_cdf - log_sf - target


def _newton_logit(x: Tensor, target: Tensor, centers: Tensor, bandwidth: Tensor) -> Tensor:
    log_cdf, log_sf, log_pdf = _kernel_terms(x, centers, bandwidth)
    return x - (log_cdf - log_sf - target) * torch.exp(log_cdf + log_sf - log_pdf)


class RBIGTransform(Transform):
    r"""The fitted RBIG map from data to base, a stack of ``L`` Gaussianization layers.

    Shapes:
        ``centers (L, D, M)``, ``bandwidths (L, D, M)``, ``rotations (L, D, D)``; the transform
        maps ``(..., D)`` to ``(..., D)`` and ``log_abs_det_jacobian`` to ``(...)``.

    Args:
        centers: Gaussian-kernel knots of each layer's marginal CDFs.
        bandwidths: Positive kernel scales, one per knot.
        rotations: Orthogonal matrices; layer ``l`` applies ``y = u @ rotations[l]``.

    Cost:
        Forward: ``O(L D M)`` per point plus three Newton refinements of ``Phi^{-1}``.
        Inverse: ``O(L D M)`` times 30 bisection and 5 Newton steps per point.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, centers: Tensor, bandwidths: Tensor, rotations: Tensor) -> None:
        super().__init__()
        self.centers, self.bandwidths, self.rotations = centers, bandwidths, rotations

    def __eq__(self, other: object) -> bool:
        return self is other

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data to base and the log-det, in one pass (zuko's fused method)."""
        ladj = x.new_zeros(x.shape[:-1])
        for centers, bandwidth, rotation in zip(
            self.centers, self.bandwidths, self.rotations, strict=True
        ):
            u, layer_ladj = marginal_gaussianize(x, centers, bandwidth)
            x, ladj = u @ rotation, ladj + layer_ladj.sum(-1)
        return x, ladj

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        for centers, bandwidth, rotation in zip(
            reversed(self.centers), reversed(self.bandwidths), reversed(self.rotations), strict=True
        ):
            y = marginal_degaussianize(y @ rotation.mT, centers, bandwidth)
        return y

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]


class RBIGState(NamedTuple):
    """State of the RBIG fitting procedure.

    Attributes:
        layers: Fitted ``(centers, bandwidth, rotation)`` triples, first layer first.
        data: Training points mapped through the fitted layers, ``(N, D)``.
        log_det: Accumulated per-point log-det of the fitted layers, ``(N,)``.
        num_knots: Quantile knots ``M`` per coordinate (plus one tail kernel).
        bandwidth_factor: Multiplier of the rule-of-thumb bandwidth.
    """

    layers: tuple[tuple[Tensor, Tensor, Tensor], ...]
    data: Tensor
    log_det: Tensor
    num_knots: int
    bandwidth_factor: float


class RBIGInfo(NamedTuple):
    """Per-step diagnostics: mean training log-likelihood of the current model, in nats."""

    log_likelihood: Tensor


def rbig_init(x: Tensor, *, num_knots: int = 100, bandwidth_factor: float = 1.0) -> RBIGState:
    """Start fitting RBIG to samples ``x (N, D)``; raises on non-finite or too few samples."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x must have shape (N, D) with N >= 2; got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains non-finite values; RBIG is fit to finite samples only")
    if num_knots < 2:
        raise ValueError(f"num_knots must be >= 2; got {num_knots}")
    if bandwidth_factor <= 0:
        raise ValueError(f"bandwidth_factor must be > 0; got {bandwidth_factor}")
    x = x.detach()
    return RBIGState((), x, x.new_zeros(x.shape[0]), int(num_knots), float(bandwidth_factor))


def _fit_marginals(
    x: Tensor, num_knots: int, factor: float, tail_scale: float
) -> tuple[Tensor, Tensor]:
    """Knots ``(D, M + 1)`` and kernel scales ``(D, M + 1)`` of each coordinate's CDF.

    ``M`` Gaussian knots sit at the empirical quantiles with Silverman's bandwidth; one more,
    at the median with ``tail_scale`` times the data's sd, holds weight ``TAIL_WEIGHT``, so
    points far outside the training range keep a density of the data's scale rather than the
    kernel's. Gaussian tails make ``Phi^{-1} o F`` asymptotically linear, so stacked layers never
    blow up the tails.
    """
    n, m = x.shape[0], min(num_knots, x.shape[0])
    levels = (torch.arange(m, dtype=x.dtype, device=x.device) + 0.5) / m
    centers = torch.quantile(x, levels, dim=0).T.contiguous()
    q75, q25 = torch.quantile(x, x.new_tensor([0.75, 0.25]), dim=0)
    spread = torch.minimum(x.std(0), (q75 - q25) / 1.349)
    spread = torch.where(spread > 0, spread, x.std(0))
    if not (spread > 0).all():
        raise ValueError("a coordinate of x is constant; RBIG needs spread in every coordinate")
    knot_h = (factor * 0.9 * spread * n ** (-0.2)).unsqueeze(-1).expand(-1, m)
    tail_h = tail_scale * x.std(0).unsqueeze(-1)
    centers = torch.cat([centers, x.median(0).values.unsqueeze(-1)], -1)
    return centers, torch.cat([knot_h, tail_h], -1)


def _rotation(u: Tensor, kind: str, generator: torch.Generator | None) -> Tensor:
    d = u.shape[-1]
    if kind == "pca":
        return torch.linalg.eigh(torch.cov(u.T).reshape(d, d)).eigenvectors.flip(-1)
    if kind == "random":
        a = torch.randn(d, d, generator=generator, dtype=torch.float64).to(u)
        q, r = torch.linalg.qr(a)
        return q * torch.sign(torch.diagonal(r))
    raise ValueError(f"rotation must be 'random' or 'pca'; got {kind!r}")


def rbig_step(
    state: RBIGState,
    *,
    rotation: Literal["random", "pca"] = "random",
    generator: torch.Generator | None = None,
) -> tuple[RBIGState, RBIGInfo]:
    """Fit one more layer to the current (partly Gaussianized) training data.

    Raises:
        FloatingPointError: If the new layer maps a training point to a non-finite value.
    """
    tail_scale = TAIL_SCALE if not state.layers else 1.0
    centers, bandwidth = _fit_marginals(
        state.data, state.num_knots, state.bandwidth_factor, tail_scale
    )
    with torch.no_grad():
        u, ladj = marginal_gaussianize(state.data, centers, bandwidth)
        rot = _rotation(u, rotation, generator)
        data, log_det = u @ rot, state.log_det + ladj.sum(-1)
    if not (torch.isfinite(data).all() and torch.isfinite(log_det).all()):
        raise FloatingPointError(f"RBIG layer {len(state.layers)} produced non-finite values")
    log_lik = (_log_std_normal(data).sum(-1) + log_det).mean()
    layers = (*state.layers, (centers, bandwidth, rot))
    return state._replace(layers=layers, data=data, log_det=log_det), RBIGInfo(log_lik)


class RBIG(nn.Module):
    r"""A fitted RBIG density with the flow-expert interface: ``rbig()`` returns a distribution.

    .. math:: \log q(x) = \log \mathcal{N}(f(x); 0, I) + \log |\det \partial_x f(x)|

    The fitted parameters are buffers (no gradients; RBIG is fit, not trained), but the density
    and samples are differentiable in their inputs. Build it with :meth:`fit`, or from an
    :class:`RBIGState` with :meth:`from_state`.

    Shapes:
        ``rbig()`` has ``event_shape == (D,)``; ``log_prob`` maps ``(..., D)`` to ``(...)``.

    Args:
        centers: ``(L, D, M)`` kernel knots (the last one per coordinate is the tail kernel).
        bandwidths: ``(L, D, M)`` kernel scales.
        rotations: ``(L, D, D)`` orthogonal matrices.

    Example:
        >>> x = torch.randn(500, 3).exp()
        >>> rbig = RBIG.fit(x, max_layers=10, progress_bar=False)
        >>> rbig().log_prob(x[:4]).shape
        torch.Size([4])

    Cost:
        ``log_prob`` is ``O(L D M)`` per point; sampling adds a 30-step bisection per
        coordinate and layer (see :class:`RBIGTransform`).

    References:
        Iterative Gaussianization: from ICA to Random Rotations (Laparra, Camps-Valls and Malo,
        2011). https://arxiv.org/abs/1602.00229
    """

    def __init__(self, centers: Tensor, bandwidths: Tensor, rotations: Tensor) -> None:
        super().__init__()
        self.register_buffer("centers", centers)
        self.register_buffer("bandwidths", bandwidths)
        self.register_buffer("rotations", rotations)

    @classmethod
    def from_state(cls, state: RBIGState) -> RBIG:
        """Stack the layers of a fitting state into a module."""
        if not state.layers:
            raise ValueError("the RBIG state has no layer yet; call rbig_step at least once")
        centers, bandwidths, rotations = (torch.stack(t) for t in zip(*state.layers, strict=True))
        return cls(centers, bandwidths, rotations)

    @classmethod
    def fit(
        cls,
        x: Tensor,
        *,
        max_layers: int = 50,
        min_layers: int = 2,
        tol: float = 1e-3,
        patience: int = 3,
        rotation: Literal["random", "pca"] = "random",
        num_knots: int = 100,
        bandwidth_factor: float = 1.0,
        generator: torch.Generator | None = None,
        progress_bar: bool = True,
    ) -> RBIG:
        """Fit layers until the training log-likelihood stops improving by ``tol`` nats per point.

        Args:
            x: Samples ``(N, D)``.
            max_layers: Upper bound on the layer count ``L``.
            min_layers: Layers fit before the stopping rule applies.
            tol: A layer "stalls" when it improves the mean training log-likelihood by less
                than this; ``0`` fits exactly ``max_layers``.
            patience: Stop after this many consecutive stalled layers.
            rotation: ``"random"`` orthogonal matrices or ``"pca"`` bases.
            num_knots: Kernel knots per coordinate (quantiles of the data).
            bandwidth_factor: Multiplier of Silverman's bandwidth.
            generator: Random source for the rotations.
            progress_bar: Show a tqdm bar.
        """
        if max_layers < 1 or min_layers < 1:
            raise ValueError(
                f"max_layers and min_layers must be >= 1; got {max_layers}, {min_layers}"
            )
        state = rbig_init(x, num_knots=num_knots, bandwidth_factor=bandwidth_factor)
        previous, stalled = -math.inf, 0
        bar = tqdm(range(max_layers), desc="RBIG", disable=not progress_bar)
        for step in bar:
            state, info = rbig_step(state, rotation=rotation, generator=generator)
            gain, previous = info.log_likelihood.item() - previous, info.log_likelihood.item()
            bar.set_postfix(log_lik=f"{previous:.4f}")
            stalled = stalled + 1 if gain < tol else 0
            if step + 1 >= min_layers and stalled >= patience:
                break
        return cls.from_state(state)

    def forward(self, context: Tensor | None = None) -> NormalizingFlow:
        """The fitted density; ``context`` must be None (RBIG is unconditional)."""
        if context is not None:
            raise ValueError("RBIG is unconditional; call it without a context")
        zeros = self.centers.new_zeros(self.centers.shape[1])
        base = Independent(Normal(zeros, torch.ones_like(zeros)), 1)
        return NormalizingFlow(RBIGTransform(self.centers, self.bandwidths, self.rotations), base)
