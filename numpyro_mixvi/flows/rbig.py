r"""Rotation-based iterative Gaussianization (RBIG) for JAX, fit from samples; exact, invertible.

Same model as ``pyro_mixvi.flows.rbig``: each layer applies ``u_d = Phi^{-1}(F_{l,d}(x_d))``
(``F`` a Gaussian-kernel CDF with ``M`` quantile knots plus one wide tail kernel, smooth and
strictly increasing with Gaussian tails beyond the data) and a rotation ``y = u @ R_l``.

Direction: :class:`RBIGTransform` maps data to base; :class:`RBIG` is a flowjax transformed
distribution whose ``bijection`` (base to data, used for sampling) is its inverse.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from flowjax.bijections import AbstractBijection, Invert
from flowjax.distributions import AbstractTransformed, StandardNormal
from jax import Array, lax
from jax.scipy.special import log_ndtr, ndtri
from tqdm.auto import tqdm

TAIL_WEIGHT = 0.05
"""Weight of the wide kernel that gives every marginal robust tails beyond the data."""
TAIL_SCALE = 2.0
"""Scale of the first layer's wide kernel in data sds (later layers use 1; see the torch docs)."""
_BISECTION_STEPS = 30
_NEWTON_STEPS = 4


def _log_std_normal(z: Array) -> Array:
    return -0.5 * z**2 - 0.5 * math.log(2 * math.pi)


def _kernel_terms(x: Array, centers: Array, bandwidth: Array) -> tuple[Array, Array, Array]:
    """``log F``, ``log(1 - F)``, ``log f`` per coordinate: ``x (D,)``, knots ``(D, M)``."""
    t = (x[:, None] - centers) / bandwidth
    m = centers.shape[-1]
    log_w = jnp.full((m,), math.log((1 - TAIL_WEIGHT) / (m - 1)), x.dtype)
    log_w = log_w.at[-1].set(math.log(TAIL_WEIGHT))
    log_cdf = jax.nn.logsumexp(log_ndtr(t) + log_w, -1)
    log_sf = jax.nn.logsumexp(log_ndtr(-t) + log_w, -1)
    log_pdf = jax.nn.logsumexp(_log_std_normal(t) + log_w - jnp.log(bandwidth), -1)
    return log_cdf, log_sf, log_pdf


def _newton_log_ndtr(z: Array, log_p: Array) -> Array:
    log_cdf = log_ndtr(z)
    return z - (log_cdf - log_p) * jnp.exp(log_cdf - _log_std_normal(z))


def _ndtri_log(log_p: Array) -> Array:
    """``Phi^{-1}(exp(log_p))`` for ``log_p <= log 1/2``; last Newton step carries the gradient."""
    fixed = lax.stop_gradient(log_p)
    y = -2.0 * jnp.minimum(fixed, -30.0)
    asymptote = -jnp.sqrt(y - jnp.log(y) - math.log(2 * math.pi))
    z = jnp.where(fixed > -30.0, ndtri(jnp.exp(jnp.maximum(fixed, -30.0))), asymptote)
    z = lax.fori_loop(0, _NEWTON_STEPS, lambda _, z: _newton_log_ndtr(z, fixed), z)
    return _newton_log_ndtr(lax.stop_gradient(z), log_p)


def marginal_gaussianize(x: Array, centers: Array, bandwidth: Array) -> tuple[Array, Array]:
    """``u = Phi^{-1}(F(x))`` and ``log f(x) - log phi(u)`` per coordinate, for one point."""
    log_cdf, log_sf, log_pdf = _kernel_terms(x, centers, bandwidth)
    tail = _ndtri_log(jnp.minimum(log_cdf, log_sf))
    u = jnp.where(log_cdf <= log_sf, tail, -tail)
    return u, log_pdf - _log_std_normal(u)


def _newton_logit(x: Array, target: Array, centers: Array, bandwidth: Array) -> Array:
    log_cdf, log_sf, log_pdf = _kernel_terms(x, centers, bandwidth)
    return x - (log_cdf - log_sf - target) * jnp.exp(log_cdf + log_sf - log_pdf)


def marginal_degaussianize(u: Array, centers: Array, bandwidth: Array) -> Array:
    """Inverse of :func:`marginal_gaussianize` (bisection in the kernels' bracket, then Newton)."""
    target = log_ndtr(u) - log_ndtr(-u)
    fixed_target = lax.stop_gradient(target)
    roots = centers + bandwidth * lax.stop_gradient(u)[:, None]

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        log_cdf, log_sf, _ = _kernel_terms(mid, centers, bandwidth)
        above = log_cdf - log_sf - fixed_target > 0
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    lo, hi = lax.fori_loop(0, _BISECTION_STEPS, bisect, (roots.min(-1), roots.max(-1)))
    x = 0.5 * (lo + hi)
    x = lax.fori_loop(
        0, _NEWTON_STEPS, lambda _, x: _newton_logit(x, fixed_target, centers, bandwidth), x
    )
    return _newton_logit(lax.stop_gradient(x), target, centers, bandwidth)


class RBIGTransform(AbstractBijection):
    """The fitted RBIG map from data to base (one point; flowjax vectorizes).

    Shapes:
        ``centers (L, D, M)``, ``bandwidths (L, D, M)``, ``rotations (L, D, D)``.

    Cost:
        Forward ``O(L D M)`` per point; inverse adds 30 bisection and 5 Newton steps.
    """

    shape: tuple[int, ...]
    cond_shape: ClassVar[None] = None
    centers: Array
    bandwidths: Array
    rotations: Array

    def __init__(self, centers: Array, bandwidths: Array, rotations: Array) -> None:
        self.shape = (centers.shape[1],)
        self.centers, self.bandwidths, self.rotations = centers, bandwidths, rotations

    def _params(self):
        # Fitted, not trained: no gradient reaches the parameters (inputs stay differentiable).
        return lax.stop_gradient((self.centers, self.bandwidths, self.rotations))

    def transform_and_log_det(self, x: Array, condition: Array | None = None):
        def layer(carry, params):
            y, ladj = carry
            u, layer_ladj = marginal_gaussianize(y, params[0], params[1])
            return (u @ params[2], ladj + layer_ladj.sum()), None

        (y, ladj), _ = lax.scan(layer, (x, jnp.zeros((), x.dtype)), self._params())
        return y, ladj

    def inverse_and_log_det(self, y: Array, condition: Array | None = None):
        def layer(carry, params):
            z, ladj = carry
            x = marginal_degaussianize(z @ params[2].T, params[0], params[1])
            return (x, ladj - marginal_gaussianize(x, params[0], params[1])[1].sum()), None

        (x, ladj), _ = lax.scan(layer, (y, jnp.zeros((), y.dtype)), self._params(), reverse=True)
        return x, ladj


class RBIGState(NamedTuple):
    """Fitting state: layers so far, mapped data ``(N, D)``, per-point log-det ``(N,)``."""

    layers: tuple[tuple[Array, Array, Array], ...]
    data: Array
    log_det: Array
    num_knots: int
    bandwidth_factor: float


class RBIGInfo(NamedTuple):
    """Mean training log-likelihood of the current model, in nats."""

    log_likelihood: Array


def rbig_init(x: Array, *, num_knots: int = 100, bandwidth_factor: float = 1.0) -> RBIGState:
    """Start fitting RBIG to ``x (N, D)``; raises on non-finite or too few samples."""
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x must have shape (N, D) with N >= 2; got {x.shape}")
    if not bool(jnp.isfinite(x).all()):
        raise ValueError("x contains non-finite values; RBIG is fit to finite samples only")
    if num_knots < 2:
        raise ValueError(f"num_knots must be >= 2; got {num_knots}")
    if bandwidth_factor <= 0:
        raise ValueError(f"bandwidth_factor must be > 0; got {bandwidth_factor}")
    return RBIGState((), x, jnp.zeros(x.shape[0], x.dtype), int(num_knots), float(bandwidth_factor))


@eqx.filter_jit
def _fit_layer(key: Array, x: Array, num_knots: int, factor: float, tail_scale: float,
               rotation: str):
    n, m = x.shape[0], min(num_knots, x.shape[0])
    levels = (jnp.arange(m, dtype=x.dtype) + 0.5) / m
    centers = jnp.quantile(x, levels, axis=0).T
    q75, q25 = jnp.quantile(x, jnp.array([0.75, 0.25], x.dtype), axis=0)
    sd = x.std(0, ddof=1)
    spread = jnp.minimum(sd, (q75 - q25) / 1.349)
    spread = jnp.where(spread > 0, spread, sd)
    knot_h = jnp.broadcast_to((factor * 0.9 * spread * n ** (-0.2))[:, None], centers.shape)
    centers = jnp.concatenate([centers, jnp.median(x, 0)[:, None]], -1)
    bandwidth = jnp.concatenate([knot_h, tail_scale * sd[:, None]], -1)
    u, ladj = jax.vmap(marginal_gaussianize, (0, None, None))(x, centers, bandwidth)
    if rotation == "pca":
        rot = jnp.linalg.eigh(jnp.cov(u.T).reshape(x.shape[1], x.shape[1]))[1][:, ::-1]
    else:
        q, r = jnp.linalg.qr(jax.random.normal(key, (x.shape[1],) * 2, x.dtype))
        rot = q * jnp.sign(jnp.diagonal(r))
    return centers, bandwidth, rot, u @ rot, ladj.sum(-1), spread


def rbig_step(
    rng_key: Array, state: RBIGState, *, rotation: Literal["random", "pca"] = "random"
) -> tuple[RBIGState, RBIGInfo]:
    """Fit one more layer (jitted) to the current data; raises on non-finite output."""
    if rotation not in ("random", "pca"):
        raise ValueError(f"rotation must be 'random' or 'pca'; got {rotation!r}")
    tail_scale = TAIL_SCALE if not state.layers else 1.0
    centers, bandwidth, rot, data, ladj, spread = _fit_layer(
        rng_key, state.data, state.num_knots, state.bandwidth_factor, tail_scale, rotation
    )
    if not bool((spread > 0).all()):
        raise ValueError("a coordinate of x is constant; RBIG needs spread in every coordinate")
    log_det = state.log_det + ladj
    if not bool(jnp.isfinite(data).all() & jnp.isfinite(log_det).all()):
        raise FloatingPointError(f"RBIG layer {len(state.layers)} produced non-finite values")
    log_lik = (_log_std_normal(data).sum(-1) + log_det).mean()
    layers = (*state.layers, (centers, bandwidth, rot))
    return state._replace(layers=layers, data=data, log_det=log_det), RBIGInfo(log_lik)


class RBIG(AbstractTransformed):
    r"""A fitted RBIG density (flowjax distribution): ``log_prob``, ``sample``, fused method.

    Shapes:
        ``log_prob`` maps ``(..., D)`` to ``(...)``; ``sample(key, sample_shape)`` returns
        ``sample_shape + (D,)``.

    Args:
        centers: ``(L, D, M)`` kernel knots (the last per coordinate is the tail kernel).
        bandwidths: ``(L, D, M)`` kernel scales.
        rotations: ``(L, D, D)`` orthogonal matrices.

    Example:
        >>> x = jnp.exp(jax.random.normal(jax.random.key(0), (500, 3)))
        >>> rbig = RBIG.fit(jax.random.key(1), x, max_layers=10, progress_bar=False)
        >>> rbig.log_prob(x[:4]).shape
        (4,)

    Cost:
        ``log_prob`` is ``O(L D M)`` per point; sampling adds the bisection of each layer.

    References:
        Iterative Gaussianization: from ICA to Random Rotations (Laparra, Camps-Valls and Malo,
        2011). https://arxiv.org/abs/1602.00229
    """

    base_dist: StandardNormal
    bijection: Invert

    def __init__(self, centers: Array, bandwidths: Array, rotations: Array) -> None:
        self.base_dist = StandardNormal((centers.shape[1],))
        self.bijection = Invert(RBIGTransform(centers, bandwidths, rotations))

    @classmethod
    def from_state(cls, state: RBIGState) -> RBIG:
        """Stack the layers of a fitting state into a distribution."""
        if not state.layers:
            raise ValueError("the RBIG state has no layer yet; call rbig_step at least once")
        centers, bandwidths, rotations = (jnp.stack(t) for t in zip(*state.layers, strict=True))
        return cls(centers, bandwidths, rotations)

    @classmethod
    def fit(
        cls,
        rng_key: Array,
        x: Array,
        *,
        max_layers: int = 50,
        min_layers: int = 2,
        tol: float = 1e-3,
        patience: int = 3,
        rotation: Literal["random", "pca"] = "random",
        num_knots: int = 100,
        bandwidth_factor: float = 1.0,
        progress_bar: bool = True,
    ) -> RBIG:
        """Fit layers until ``patience`` layers in a row improve the training NLL by < ``tol``."""
        if max_layers < 1 or min_layers < 1:
            raise ValueError(
                f"max_layers and min_layers must be >= 1; got {max_layers}, {min_layers}"
            )
        state = rbig_init(x, num_knots=num_knots, bandwidth_factor=bandwidth_factor)
        previous, stalled = -math.inf, 0
        bar = tqdm(jax.random.split(rng_key, max_layers), desc="RBIG", disable=not progress_bar)
        for step, key in enumerate(bar):
            state, info = rbig_step(key, state, rotation=rotation)
            gain, previous = float(info.log_likelihood) - previous, float(info.log_likelihood)
            bar.set_postfix(log_lik=f"{previous:.4f}")
            stalled = stalled + 1 if gain < tol else 0
            if step + 1 >= min_layers and stalled >= patience:
                break
        return cls.from_state(state)
