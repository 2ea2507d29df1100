"""Named test targets over R^D with exact ``log_prob``, exact samplers and known entropies.

Every target is a :class:`numpyro.distributions.Distribution` with ``event_shape = (D,)`` and
support ``real_vector``; :func:`target_model` turns one into a NumPyro model whose posterior it
is, so guides can be fit to it. ``TARGETS`` maps the names shared with ``pyro_mixvi.targets`` to
constructors with sensible defaults.

The 2-D targets carry a plot box ``bounds = (x0, x1, y0, y1)`` holding all but ``< 1e-3`` of
their mass. ``entropy()`` is exact where a closed form exists (``banana``, Gaussians, ``funnel``)
and otherwise a documented numeric value (midpoint rule on a 4000x4000 grid over a box holding
all but ``< 1e-6`` of the mass, in float64; error ``< 5e-4`` nats). The entropy is the oracle NLL:
the lowest expected negative log-likelihood any density model can reach on the target's draws.

Randomness: ``sample(rng_key, sample_shape)``. dtype: ``log_prob`` follows its input; samples
follow the parameters' dtype (the default float, per ``jax_enable_x64``, for targets without
parameters).

Example:
    >>> import jax
    >>> target = TARGETS["banana"]()
    >>> x = target.sample(jax.random.PRNGKey(0), (5,))
    >>> target.log_prob(x).shape
    (5,)

References:
    AISIVI toy targets: Pielok et al., "Revisiting Unbiased Implicit Variational Inference" (2025).
    AMF-VI targets: "Adaptive heterogeneous mixtures of normalising flows" (AMF-VI, 2025).
    Neal, "Slice sampling" (2003) for the funnel.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import gammaln, logsumexp
from numpyro.distributions import Distribution, constraints

from mixvi import target_specs

__all__ = [
    "CONJUGATE_MODELS",
    "TARGETS",
    "AMFBanana",
    "Banana",
    "ConjugateModel",
    "CorrelatedGaussian",
    "Funnel",
    "GaussianMixture",
    "Rings",
    "TwoMoons",
    "eight_modes",
    "target_model",
]

LOG_2PI = math.log(2 * math.pi)


def _float_dtype():
    return jnp.result_type(float)


def _normal_log_prob(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - jnp.log(scale) - 0.5 * LOG_2PI


class _Target(Distribution):
    """Base of the fixed targets: no batch shape, event ``(dim,)``, real-vector support."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    reparametrized_params: list = []
    pytree_aux_fields = ("dim", "bounds", "_entropy")
    bounds: tuple[float, float, float, float] | None = None
    _entropy: float | None = None

    def __init__(self, dim: int, *, validate_args=None):
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1; got {dim}")
        self.dim = int(dim)
        super().__init__(batch_shape=(), event_shape=(self.dim,), validate_args=validate_args)

    def log_prob(self, value):
        # One compiled function per target class and input shape (eager JAX would compile each
        # primitive separately); inside an outer jit/vmap this is simply inlined.
        return _jit_log_prob(self, value)

    def sample(self, key, sample_shape=()):
        return _jit_sample(self, key, tuple(sample_shape))

    def entropy(self):
        """Differential entropy in nats (the oracle NLL); exact or documented numeric value."""
        if self._entropy is None:
            raise NotImplementedError(f"{type(self).__name__} has no known entropy")
        return jnp.asarray(self._entropy, dtype=_float_dtype())


_jit_log_prob = jax.jit(lambda target, value: target._log_prob(value))
_jit_sample = jax.jit(lambda target, key, shape: target._sample(key, shape), static_argnums=2)


class Banana(_Target):
    """AISIVI's banana: ``y = (x1, x1^2 + x2 + 1) ~ N(0, [[1, .9], [.9, 1]])``, unit Jacobian.

    ``log p(x) = log N(y(x); 0, Sigma)``; exact sampler ``x = (-y1, -(y2 + y1^2 + 1))`` (the sign
    flip keeps the density, which is symmetric under ``y -> -y``). Entropy exact:
    ``1 + log(2 pi) + log(det Sigma) / 2``.

    Shapes:
        ``log_prob``: ``(..., 2) -> (...)``; ``sample(key, S)``: ``S + (2,)``.
    """

    bounds = (-4.0, 4.0, -14.0, 3.0)
    _entropy = 1 + LOG_2PI + 0.5 * math.log(0.19)

    def __init__(self, *, validate_args=None):
        super().__init__(2, validate_args=validate_args)

    def _log_prob(self, value):
        y1 = value[..., 0]
        y2 = value[..., 0] ** 2 + value[..., 1] + 1
        quad = (y1**2 - 1.8 * y1 * y2 + y2**2) / 0.19
        return -0.5 * quad - LOG_2PI - 0.5 * math.log(0.19)

    def _sample(self, key, sample_shape):
        eps = jax.random.normal(key, tuple(sample_shape) + (2,), _float_dtype())
        y1 = eps[..., 0]
        y2 = 0.9 * eps[..., 0] + math.sqrt(0.19) * eps[..., 1]
        return jnp.stack([-y1, -(y2 + y1**2 + 1)], -1)


class GaussianMixture(_Target):
    """Finite mixture of full-covariance Gaussians in any dimension.

    ``p(x) = sum_k w_k N(x; mu_k, Sigma_k)``.

    Args:
        locs: Component means, shape ``(K, D)``.
        covariances: Component covariances, shape ``(K, D, D)`` (symmetric positive definite).
        weights: Mixture weights ``(K,)``, normalized here; uniform if omitted.
        bounds: Optional 2-D plot box ``(x0, x1, y0, y1)``.
        entropy: Optional documented entropy value (nats); mixtures have no closed form.

    Shapes:
        ``log_prob``: ``(..., D) -> (...)``; ``sample(key, S)``: ``S + (D,)``.

    Example:
        >>> gmm = GaussianMixture(jnp.array([[-2., 0.], [2., 0.]]), jnp.stack([jnp.eye(2)] * 2))
        >>> gmm.sample(jax.random.PRNGKey(0), (3,)).shape
        (3, 2)
    """

    pytree_data_fields = ("locs", "covariances", "weights")

    def __init__(self, locs, covariances, weights=None, *, bounds=None, entropy=None,
                 validate_args=None):
        locs = jnp.asarray(locs)
        if locs.ndim != 2:
            raise ValueError(f"locs must have shape (K, D); got {tuple(locs.shape)}")
        num_components, dim = locs.shape
        covariances = jnp.asarray(covariances, dtype=locs.dtype)
        if covariances.shape != (num_components, dim, dim):
            raise ValueError(
                f"covariances must have shape (K, D, D) = {(num_components, dim, dim)}; "
                f"got {tuple(covariances.shape)}"
            )
        weights = jnp.ones(num_components, locs.dtype) if weights is None else weights
        weights = jnp.asarray(weights, dtype=locs.dtype)
        if weights.shape != (num_components,) or not bool(np.all(np.asarray(weights) > 0)):
            raise ValueError(f"weights must be positive with shape (K,) = ({num_components},)")
        self.locs, self.covariances = locs, covariances
        self.weights = weights / weights.sum()
        self.bounds, self._entropy = bounds, entropy
        super().__init__(dim, validate_args=validate_args)

    def _components(self, dtype) -> dist.MultivariateNormal:
        return dist.MultivariateNormal(self.locs.astype(dtype),
                                       covariance_matrix=self.covariances.astype(dtype))

    def _log_prob(self, value):
        component_lp = self._components(value.dtype).log_prob(value[..., None, :])
        return logsumexp(component_lp + jnp.log(self.weights.astype(value.dtype)), -1)

    def _sample(self, key, sample_shape):
        key_index, key_draw = jax.random.split(key)
        shape = tuple(sample_shape)
        index = jax.random.categorical(key_index, jnp.log(self.weights), shape=shape)
        draws = self._components(self.locs.dtype).sample(key_draw, shape)  # S + (K, D)
        return jnp.take_along_axis(draws, index[..., None, None], -2)[..., 0, :]

    @property
    def mean(self):
        return (self.weights[:, None] * self.locs).sum(0)


def _gmm_2d(spec: target_specs.GaussianMixtureSpec) -> GaussianMixture:
    """The host distribution for a 2-D mixture spec, in the default float dtype."""
    dtype = _float_dtype()
    weights = None if spec.weights is None else jnp.asarray(spec.weights, dtype)
    return GaussianMixture(jnp.asarray(spec.locs, dtype), jnp.asarray(spec.covariances, dtype),
                           weights, bounds=spec.bounds, entropy=spec.entropy)


def _from_spec(make_spec: Callable[..., target_specs.GaussianMixtureSpec]):
    """A target factory with ``make_spec``'s name, signature and docstring."""

    @functools.wraps(make_spec)
    def factory(*args, **kwargs) -> GaussianMixture:
        return _gmm_2d(make_spec(*args, **kwargs))

    factory.__signature__ = inspect.signature(make_spec).replace(return_annotation=GaussianMixture)
    return factory


x_shape = _from_spec(target_specs.x_shape)
multimodal = _from_spec(target_specs.multimodal)
eight_modes = _from_spec(target_specs.eight_modes)
amf_x_shape = _from_spec(target_specs.amf_x_shape)
bimodal_shared = _from_spec(target_specs.bimodal_shared)
bimodal_different = _from_spec(target_specs.bimodal_different)
amf_multimodal = _from_spec(target_specs.amf_multimodal)
multimodal_5 = _from_spec(target_specs.multimodal_5)


class Rings(_Target):
    """Two concentric rings: radius ``r ~ 1/2 N(1, .1^2) + 1/2 N(2.5, .1^2)``, angle uniform.

    Exact density ``p(x) = (p_r(|x|) + p_r(-|x|)) / (2 pi |x|)``: the ``p_r(-|x|)`` term counts the
    (``~1e-23``) radial mass below zero, which the sampler maps to the opposite angle. AMF-VI's
    ``rings`` (no extra noise). Entropy (numeric) 2.1026.

    Shapes:
        ``log_prob``: ``(..., 2) -> (...)``; ``sample(key, S)``: ``S + (2,)``.
    """

    bounds = (-3.2, 3.2, -3.2, 3.2)
    _entropy = 2.1026
    radii = (1.0, 2.5)
    width = 0.1

    def __init__(self, *, validate_args=None):
        super().__init__(2, validate_args=validate_args)

    def _log_radial(self, r):
        terms = jnp.stack([_normal_log_prob(r, c, self.width) for c in self.radii], -1)
        return logsumexp(terms, -1) - math.log(len(self.radii))

    def _log_prob(self, value):
        r = jnp.linalg.norm(value, axis=-1)
        radial = jnp.logaddexp(self._log_radial(r), self._log_radial(-r))
        return radial - math.log(2 * math.pi) - jnp.log(r)

    def _sample(self, key, sample_shape):
        shape = tuple(sample_shape)
        key_ring, key_r, key_theta = jax.random.split(key, 3)
        dtype = _float_dtype()
        centre = jnp.asarray(self.radii, dtype)[jax.random.randint(key_ring, shape, 0, 2)]
        r = centre + self.width * jax.random.normal(key_r, shape, dtype)
        theta = 2 * math.pi * jax.random.uniform(key_theta, shape, dtype)
        return jnp.stack([r * jnp.cos(theta), r * jnp.sin(theta)], -1)


def _gauss_legendre(a: float, b: float, num_panels: int, num_nodes: int):
    """Composite Gauss-Legendre nodes and log-weights on ``[a, b]`` (numpy float64)."""
    x, w = np.polynomial.legendre.leggauss(num_nodes)
    edges = np.linspace(a, b, num_panels + 1)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    nodes = (edges[:-1, None] + half * (x + 1)).ravel()
    return nodes, np.log((half * w).ravel())


class TwoMoons(_Target):
    """scikit-learn's ``make_moons`` as a density: two half-circle arcs, each picked with
    probability 1/2, arc parameter ``t ~ U(0, pi)``, plus ``N(0, noise^2 I)``.

    Upper arc ``(cos t, sin t)``, lower arc ``(1 - cos t, 1/2 - sin t)``. The density
    ``p(x) = 1/2 sum_arcs (1/pi) int_0^pi N(x; c(t), noise^2 I) dt`` is evaluated by composite
    Gauss-Legendre quadrature (10 panels x 16 nodes per arc); on the plot box its relative error
    is below ``1e-6`` for ``noise = 0.1``, and below ``1e-9`` where ``p > 1e-10`` (checked
    against a dense trapezoid rule in the tests). The sampler draws fresh ``t`` (not sklearn's
    fixed ``random_state`` and evenly spaced ``t``). Entropy at ``noise = 0.1`` (numeric):
    1.0076 (AMF-VI's table: 1.007 by Monte Carlo).

    Args:
        noise: Standard deviation of the isotropic Gaussian noise (sklearn's ``noise``).

    Shapes:
        ``log_prob``: ``(..., 2) -> (...)``; ``sample(key, S)``: ``S + (2,)``.
    """

    bounds = (-1.7, 2.7, -1.2, 1.7)
    pytree_aux_fields = ("noise", "_nodes", "_log_weights")

    def __init__(self, noise: float = 0.1, *, validate_args=None):
        if not noise > 0:
            raise ValueError(f"noise must be > 0 (the density of noise-free moons is singular); "
                             f"got {noise}")
        self.noise = float(noise)
        self._entropy = 1.0076 if self.noise == 0.1 else None
        nodes, log_w = _gauss_legendre(0.0, math.pi, 10, 16)
        self._nodes, self._log_weights = tuple(nodes), tuple(log_w - math.log(math.pi))
        super().__init__(2, validate_args=validate_args)

    @staticmethod
    def _arcs(t):
        upper = jnp.stack([jnp.cos(t), jnp.sin(t)], -1)
        lower = jnp.stack([1 - jnp.cos(t), 0.5 - jnp.sin(t)], -1)
        return jnp.stack([upper, lower])  # (2, ..., 2)

    def _log_prob(self, value):
        centres = self._arcs(jnp.asarray(self._nodes, value.dtype))  # (2, M, 2)
        sq = ((value[..., None, None, :] - centres) ** 2).sum(-1)  # (..., 2, M)
        log_kernel = -0.5 * sq / self.noise**2 - LOG_2PI - 2 * math.log(self.noise)
        log_w = jnp.asarray(self._log_weights, value.dtype)
        return logsumexp(log_kernel + log_w, axis=(-2, -1)) - math.log(2)

    def _sample(self, key, sample_shape):
        shape = tuple(sample_shape)
        key_t, key_arc, key_noise = jax.random.split(key, 3)
        dtype = _float_dtype()
        t = math.pi * jax.random.uniform(key_t, shape, dtype)
        arc = jax.random.bernoulli(key_arc, 0.5, shape)
        centres = self._arcs(t)
        centre = jnp.where(arc[..., None], centres[1], centres[0])
        return centre + self.noise * jax.random.normal(key_noise, shape + (2,), dtype)


class AMFBanana(_Target):
    """AMF-VI's banana: ``x1 ~ N(0, 2)``, ``x2 | x1 ~ N(x1^2 / 4, 1)``, plus ``N(0, noise^2 I)``.

    With noise ``e``, ``y = x + e`` has ``p(y) = N(y1; 0, 2 + s^2) E[N(y2; u^2/4, 1 + s^2)]``,
    the expectation over ``u ~ p(x1 | y1) = N(m, v)`` (``v = 1/(1/2 + 1/s^2)``, ``m = v y1/s^2``)
    computed by 40-point Gauss-Hermite quadrature: the integrand is smooth on the scale ``sqrt(v)
    < 0.1``, and the result agrees with a 400-point rule to ``< 1e-10`` relative error on the plot
    box. ``noise = 0`` gives the exact noise-free density. Entropy: 3.1845 at ``noise = 0``
    (exact: ``log(2 pi e) + log(2) / 2``); 3.1944 at ``noise = 0.1`` (numeric; de Bruijn's
    identity, with Fisher information trace 2, predicts ``+ 0.01``). AMF-VI's table gives 3.204,
    a Monte Carlo estimate 0.01 too high.

    Shapes:
        ``log_prob``: ``(..., 2) -> (...)``; ``sample(key, S)``: ``S + (2,)``.
    """

    bounds = (-6.0, 6.0, -5.0, 13.0)
    pytree_aux_fields = ("noise", "_nodes", "_log_weights")

    def __init__(self, noise: float = 0.1, *, validate_args=None):
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0; got {noise}")
        self.noise = float(noise)
        self._entropy = {0.1: 3.1944, 0.0: 1 + LOG_2PI + 0.5 * math.log(2)}.get(self.noise)
        nodes, weights = np.polynomial.hermite.hermgauss(40)
        self._nodes = tuple(nodes * math.sqrt(2))
        self._log_weights = tuple(np.log(weights / math.sqrt(math.pi)))
        super().__init__(2, validate_args=validate_args)

    def _log_prob(self, value):
        y1, y2 = value[..., 0], value[..., 1]
        if self.noise == 0:
            return _normal_log_prob(y1, 0, math.sqrt(2)) + _normal_log_prob(y2, y1**2 / 4, 1.0)
        v = 1 / (0.5 + 1 / self.noise**2)
        m = v * y1 / self.noise**2
        u = m[..., None] + math.sqrt(v) * jnp.asarray(self._nodes, value.dtype)
        inner = _normal_log_prob(y2[..., None], u**2 / 4, math.sqrt(1 + self.noise**2))
        inner = logsumexp(inner + jnp.asarray(self._log_weights, value.dtype), -1)
        return _normal_log_prob(y1, 0, math.sqrt(2 + self.noise**2)) + inner

    def _sample(self, key, sample_shape):
        key_x, key_noise = jax.random.split(key)
        shape = tuple(sample_shape) + (2,)
        eps = jax.random.normal(key_x, shape, _float_dtype())
        x1 = math.sqrt(2) * eps[..., 0]
        x = jnp.stack([x1, x1**2 / 4 + eps[..., 1]], -1)
        return x + self.noise * jax.random.normal(key_noise, shape, x.dtype)


class Funnel(_Target):
    """Neal's funnel: ``x1 ~ N(0, 3^2)``, ``x_{2:D} | x1 ~ N(0, e^{x1} I)``.

    Moments: ``E x = 0``, ``Var x1 = 9``, ``Var x_i = E e^{x1} = e^{9/2}``. Entropy exact:
    ``log(3) + D log(2 pi e) / 2`` (the ``x1/2`` terms average to zero).

    Args:
        dim: Dimension ``D >= 2``.

    Shapes:
        ``log_prob``: ``(..., D) -> (...)``; ``sample(key, S)``: ``S + (D,)``.
    """

    def __init__(self, dim: int = 10, *, validate_args=None):
        if int(dim) < 2:
            raise ValueError(f"dim must be >= 2 for a funnel; got {dim}")
        super().__init__(dim, validate_args=validate_args)
        self._entropy = math.log(3) + self.dim * 0.5 * (1 + LOG_2PI)
        if self.dim == 2:
            self.bounds = (-9.0, 9.0, -15.0, 15.0)

    def _log_prob(self, value):
        x1, rest = value[..., 0], value[..., 1:]
        scale = jnp.exp(x1 / 2)[..., None]
        return _normal_log_prob(x1, 0, 3.0) + _normal_log_prob(rest, 0, scale).sum(-1)

    def _sample(self, key, sample_shape):
        eps = jax.random.normal(key, tuple(sample_shape) + (self.dim,), _float_dtype())
        x1 = 3 * eps[..., :1]
        return jnp.concatenate([x1, jnp.exp(x1 / 2) * eps[..., 1:]], -1)

    @property
    def mean(self):
        return jnp.zeros(self.dim, _float_dtype())

    @property
    def variance(self):
        return jnp.full((self.dim,), math.exp(4.5), _float_dtype()).at[0].set(9.0)


class CorrelatedGaussian(dist.MultivariateNormal):
    """Equicorrelated Gaussian ``N(0, (1 - rho) I + rho 11^T)``: unit variances, correlation rho.

    Known posterior for testing guides on strong correlation: ``mean = 0``,
    ``covariance_matrix`` as above, exact ``entropy()``; eigenvalues ``1 + (D - 1) rho`` and
    ``1 - rho``, so the condition number is ``(1 + (D - 1) rho) / (1 - rho)``.

    Args:
        dim: Dimension ``D >= 1``.
        rho: Correlation, ``-1 / (D - 1) < rho < 1``.
    """

    pytree_aux_fields = ("dim", "rho", "bounds")
    bounds = None

    def __init__(self, dim: int = 10, rho: float = 0.9, *, validate_args=None):
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1; got {dim}")
        lower = -1 / (dim - 1) if dim > 1 else -math.inf
        if not lower < rho < 1:
            raise ValueError(f"rho must lie in ({lower}, 1) for dim={dim}; got {rho}")
        eye = jnp.eye(int(dim), dtype=_float_dtype())
        cov = (1 - rho) * eye + rho * jnp.ones_like(eye)
        self.dim, self.rho = int(dim), float(rho)
        super().__init__(jnp.zeros(int(dim), eye.dtype), covariance_matrix=cov,
                         validate_args=validate_args)
        if self.dim == 2:
            self.bounds = (-4.5, 4.5, -4.5, 4.5)


def target_model(target: Distribution, *, name: str = "x") -> Callable:
    """A NumPyro model ``model()`` with one latent site ``name ~ target``: its posterior is the
    target.

    Example:
        >>> model = target_model(TARGETS["rings"]())
        >>> guide = numpyro.infer.autoguide.AutoNormal(model)      # doctest: +SKIP
    """
    if not isinstance(target, Distribution):
        raise TypeError(f"target must be a NumPyro Distribution; got {type(target).__name__}")

    def model():
        return numpyro.sample(name, target)

    model.target = target
    return model


TARGETS: dict[str, Callable[..., Distribution]] = {
    "banana": Banana,
    "x_shape": x_shape,
    "multimodal": multimodal,
    "eight_modes": eight_modes,
    "rings": Rings,
    "two_moons": TwoMoons,
    "amf_banana": AMFBanana,
    "amf_x_shape": amf_x_shape,
    "bimodal_shared": bimodal_shared,
    "bimodal_different": bimodal_different,
    "amf_multimodal": amf_multimodal,
    "multimodal_5": multimodal_5,
    "amf_rings": Rings,
    "funnel": Funnel,
    "correlated_gaussian": CorrelatedGaussian,
}
"""Target constructors by name (same names in ``pyro_mixvi``); call with no arguments for
the documented defaults. ``amf_rings`` is ``rings`` (AMF-VI adds no noise to its rings);
``two_moons`` is AMF-VI's ``two_moons`` (sklearn noise 0.1)."""


class ConjugateModel(NamedTuple):
    """A conjugate model, its data and its exact posterior (as in Pyro's ``test_exact``).

    Attributes:
        model: The NumPyro model, called as ``model(*args, **kwargs)``.
        args: Positional arguments (the data).
        kwargs: Keyword arguments.
        posterior: Exact posterior of each latent site, by site name.
        log_evidence: Exact ``log p(data)`` (the optimum of ``-ELBO`` loss).
    """

    model: Callable
    args: tuple
    kwargs: dict
    posterior: dict[str, Distribution]
    log_evidence: float


def _data(data, default):
    return jnp.asarray(default if data is None else data, dtype=_float_dtype())


def normal_normal(data=None, *, prior_loc: float = 0.0, prior_scale: float = 1.0,
                  obs_scale: float = 1.0) -> ConjugateModel:
    """``loc ~ N(m0, s0^2)``, ``data_i ~ N(loc, s^2)``: posterior Normal, evidence multivariate
    Normal ``N(m0 1, s^2 I + s0^2 11^T)``."""
    data = _data(data, [0.3, -1.2, 2.1, 0.7, 1.5])

    def model(data):
        loc = numpyro.sample("loc", dist.Normal(jnp.asarray(prior_loc, data.dtype), prior_scale))
        with numpyro.plate("data", len(data)):
            numpyro.sample("obs", dist.Normal(loc, obs_scale), obs=data)

    n = len(data)
    precision = 1 / prior_scale**2 + n / obs_scale**2
    post_loc = (prior_loc / prior_scale**2 + data.sum() / obs_scale**2) / precision
    cov = obs_scale**2 * jnp.eye(n, dtype=data.dtype) + prior_scale**2
    evidence = dist.MultivariateNormal(jnp.full((n,), prior_loc, data.dtype), cov).log_prob(data)
    return ConjugateModel(model, (data,), {}, {"loc": dist.Normal(post_loc, precision**-0.5)},
                          float(evidence))


def lognormal_normal(data=None, *, prior_loc: float = 0.0, prior_scale: float = 1.0,
                     obs_scale: float = 0.5) -> ConjugateModel:
    """``loc ~ N(m0, s0^2)``, ``data_i ~ LogNormal(loc, s)``: Normal-Normal on ``log data``,
    evidence minus ``sum log data``."""
    data = _data(data, [0.8, 1.9, 1.2, 0.6, 2.4, 1.1])
    inner = normal_normal(jnp.log(data), prior_loc=prior_loc, prior_scale=prior_scale,
                          obs_scale=obs_scale)

    def model(data):
        loc = numpyro.sample("loc", dist.Normal(jnp.asarray(prior_loc, data.dtype), prior_scale))
        with numpyro.plate("data", len(data)):
            numpyro.sample("obs", dist.LogNormal(loc, obs_scale), obs=data)

    return ConjugateModel(model, (data,), {}, inner.posterior,
                          inner.log_evidence - float(jnp.log(data).sum()))


def beta_bernoulli(data=None, *, concentration1: float = 2.0,
                   concentration0: float = 3.0) -> ConjugateModel:
    """``p ~ Beta(a, b)``, ``data_i ~ Bernoulli(p)``: posterior ``Beta(a + k, b + n - k)``,
    evidence ``log B(a + k, b + n - k) - log B(a, b)``."""
    data = _data(data, [1, 0, 1, 1, 0, 1, 1, 1, 0, 1])
    n, k = len(data), float(data.sum())

    def model(data):
        p = numpyro.sample("p", dist.Beta(jnp.asarray(concentration1, data.dtype),
                                          concentration0))
        with numpyro.plate("data", len(data)):
            numpyro.sample("obs", dist.Bernoulli(p), obs=data)

    a, b = concentration1 + k, concentration0 + n - k
    evidence = _log_beta(a, b) - _log_beta(concentration1, concentration0)
    posterior = {"p": dist.Beta(jnp.asarray(a, data.dtype), b)}
    return ConjugateModel(model, (data,), {}, posterior, evidence)


def gamma_poisson(data=None, *, concentration: float = 2.0, rate: float = 1.0) -> ConjugateModel:
    """``lam ~ Gamma(a, b)``, ``data_i ~ Poisson(lam)``: posterior ``Gamma(a + S, b + n)``,
    evidence ``a log b - lgamma(a) + lgamma(a + S) - (a + S) log(b + n) - sum lgamma(x_i + 1)``."""
    data = _data(data, [3, 1, 4, 2, 2, 5, 0, 3])
    n, total = len(data), float(data.sum())

    def model(data):
        lam = numpyro.sample("rate", dist.Gamma(jnp.asarray(concentration, data.dtype), rate))
        with numpyro.plate("data", len(data)):
            numpyro.sample("obs", dist.Poisson(lam), obs=data)

    a, b = concentration + total, rate + n
    evidence = (concentration * math.log(rate) - math.lgamma(concentration) + math.lgamma(a)
                - a * math.log(b) - float(gammaln(data + 1).sum()))
    posterior = {"rate": dist.Gamma(jnp.asarray(a, data.dtype), b)}
    return ConjugateModel(model, (data,), {}, posterior, evidence)


def exponential_gamma(data=None, *, concentration: float = 2.0,
                      rate: float = 1.0) -> ConjugateModel:
    """``lam ~ Gamma(a, b)``, ``data_i ~ Exponential(lam)``: posterior ``Gamma(a + n, b + S)``,
    evidence ``a log b - lgamma(a) + lgamma(a + n) - (a + n) log(b + S)``."""
    data = _data(data, [0.4, 1.3, 0.2, 0.9, 2.2, 0.5])
    n, total = len(data), float(data.sum())

    def model(data):
        lam = numpyro.sample("rate", dist.Gamma(jnp.asarray(concentration, data.dtype), rate))
        with numpyro.plate("data", len(data)):
            numpyro.sample("obs", dist.Exponential(lam), obs=data)

    a, b = concentration + n, rate + total
    evidence = (concentration * math.log(rate) - math.lgamma(concentration) + math.lgamma(a)
                - a * math.log(b))
    posterior = {"rate": dist.Gamma(jnp.asarray(a, data.dtype), b)}
    return ConjugateModel(model, (data,), {}, posterior, evidence)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


CONJUGATE_MODELS: dict[str, Callable[..., ConjugateModel]] = {
    "normal_normal": normal_normal,
    "lognormal_normal": lognormal_normal,
    "beta_bernoulli": beta_bernoulli,
    "gamma_poisson": gamma_poisson,
    "exponential_gamma": exponential_gamma,
}
"""Conjugate models with exact posteriors and log evidence, by name (same in both backends)."""
