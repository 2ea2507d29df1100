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

import equinox as eqx
import jax
import jax.numpy as jnp
import paramax
from jax import lax, random
from numpyro.distributions import Distribution, constraints

from mixvi._checks import check_flow_layers
from numpyro_mixvi.distributions._refuse import refuse_gradient
from numpyro_mixvi.flows._flowjax import typed_key, zero_last_layers
from numpyro_mixvi.flows.realnvp import RealNVP

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

ClassifierParams = Sequence[tuple[jax.Array, jax.Array]]

_NOT_REPARAMETERIZABLE = (
    "ClassifierWeightedMixture draws a discrete component index, so stock ELBOs (Trace_ELBO, "
    "TraceGraph_ELBO, ...) cannot differentiate through its samples without bias; use "
    "numpyro_mixvi.RBMixture_ELBO, which sums the index out"
)


def classifier_logits(z: jax.Array, logits: jax.Array, classifier_params: ClassifierParams):  # noqa: ANN201
    """Logits ``b + f(z)`` of the classifier: a Tanh MLP ``f`` (no final activation) plus a bias.

    Shapes:
        ``z``: ``(..., D)``; ``logits``: ``(K,)``; layer ``i`` of ``classifier_params`` is
        ``(weight (d_i, d_{i+1}), bias (d_{i+1},))`` with ``d_0 = D`` and last width ``K``.
        Returns ``(..., K)``. An empty ``classifier_params`` gives constant logits.
    """
    if not classifier_params:
        return jnp.broadcast_to(logits, z.shape[:-1] + logits.shape)
    h = z
    for i, (weight, bias) in enumerate(classifier_params):
        h = h @ weight + bias
        if i + 1 < len(classifier_params):
            h = jnp.tanh(h)
    return h + logits


def init_classifier_params(
    rng_key: jax.Array,
    input_dim: int,
    num_components: int,
    hidden_dims: Sequence[int] | None,
    dtype: jnp.dtype,
) -> list[tuple[jax.Array, jax.Array]]:
    """Classifier layers for ``hidden_dims``; the last layer is zero, so weights start constant.

    Hidden layers are uniform in ``±1/sqrt(fan_in)`` (torch's ``nn.Linear`` default);
    ``hidden_dims=None`` gives no layers (a constant-weight Gaussian mixture).
    """
    if hidden_dims is None:
        return []
    widths = [input_dim, *hidden_dims]
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        rng_key, key_w, key_b = random.split(rng_key, 3)
        bound = 1.0 / math.sqrt(fan_in)
        layers.append((random.uniform(key_w, (fan_in, fan_out), dtype, -bound, bound),
                       random.uniform(key_b, (fan_out,), dtype, -bound, bound)))
    layers.append((jnp.zeros((widths[-1], num_components), dtype),
                   jnp.zeros((num_components,), dtype)))
    return layers


def init_component_flows(
    rng_key: jax.Array,
    input_dim: int,
    num_components: int,
    flow_layers: int,
    dtype: jnp.dtype,
    *,
    hidden_dims: Sequence[int] = FLOW_HIDDEN_DIMS,
    max_log_scale: float = FLOW_MAX_LOG_SCALE,
):  # noqa: ANN201 - a flowjax bijection or None
    """``K`` identity-initialized RealNVP flows, stacked (None if ``flow_layers == 0``).

    Each is the ``bijection`` (base to latent) of :func:`~numpyro_mixvi.flows.RealNVP` with
    ``flow_layers`` coupling layers whose output layers are zero, so every ``F_k`` starts as the
    identity and a CWM built with them equals the affine one. The ``K`` flows are built with
    ``eqx.filter_vmap``: one bijection whose arrays have a leading axis of size ``K``. Floating
    arrays are cast to ``dtype``.

    Raises:
        ValueError: If ``flow_layers`` is not an integer >= 0, or ``flow_layers > 0`` and
            ``input_dim < 2`` (a coupling layer splits the coordinates in two).
    """
    check_flow_layers(flow_layers, input_dim)
    if flow_layers == 0:
        return None

    def one(key: jax.Array):  # noqa: ANN202
        flow = RealNVP(key, input_dim, num_transforms=flow_layers, hidden_dims=hidden_dims,
                       max_log_scale=max_log_scale)
        return zero_last_layers(flow).bijection

    keys = random.split(typed_key(rng_key), num_components)
    flows = eqx.filter_vmap(one)(keys)
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, flows)


# Both flow passes are filter_jit-ed: called eagerly (sample_posterior, Predictive) a flowjax
# flow under vmap dispatches op by op, seconds per call; under an outer jit this is inlined.
@eqx.filter_jit
def _flows_forward(flows, z: jax.Array) -> jax.Array:  # noqa: ANN001
    """``F_k(z)`` for every stacked flow: ``(N, D)`` to ``(K, N, D)``."""
    return eqx.filter_vmap(lambda flow: jax.vmap(paramax.unwrap(flow).transform)(z))(flows)


@eqx.filter_jit
def _flows_inverse(flows, u: jax.Array) -> tuple[jax.Array, jax.Array]:  # noqa: ANN001
    """``F_k^{-1}(u_k)`` ``(K, N, D)`` and its log-Jacobian ``(K, N)`` from ``u``: ``(K, N, D)``."""
    return eqx.filter_vmap(
        lambda flow, u_k: jax.vmap(paramax.unwrap(flow).inverse_and_log_det)(u_k)
    )(flows, u)


class ClassifierWeightedMixture(Distribution):
    r"""Mixture of ``K`` affine maps of ``N(0, I)`` weighted by a classifier of the base point.

    .. math:: q(x) = \sum_k w_k(z_k)\, \mathcal{N}(z_k; 0, I)\, |\det L_k|^{-1},
              \qquad z_k = L_k^{-1}(x - \mathrm{loc}_k)

    With flow components (``flows``) the sampling map of component ``k`` is
    ``x = loc_k + L_k F_k(z)`` with ``F_k`` an invertible coupling flow, and
    ``z_k = F_k^{-1}(L_k^{-1}(x - loc_k))`` with the flow's log-Jacobian added to the density.
    The flow acts before the affine map, on the standardized point, so its networks see
    unit-scale inputs whatever the scale of ``x`` (as AutoFlowMixture's experts). The classifier
    still acts on the shared base point ``z``.

    It is a finite mixture in the sense of :mod:`numpyro_mixvi.guides.base`:
    :meth:`sample_components` returns all ``K`` images of one base draw with the weights
    ``w(z)``, so ``E_q[h] = E_z[sum_k w_k(z) h(x_k(z))]`` can be estimated without sampling the
    discrete index (the Rao-Blackwellized estimator). Ancestral :meth:`sample` draws are not
    differentiable: differentiating through them raises ``NotImplementedError`` (pointing to
    ``RBMixture_ELBO``) instead of silently dropping the index's contribution.

    Shapes:
        ``locs``: ``(K, D)``; ``scale``: ``(K, D)`` (diagonal components) or ``scale_tril``:
        ``(K, D, D)`` (lower-triangular, positive diagonal); ``logits``: ``(K,)``.
        ``log_prob`` maps ``(..., D)`` to ``(...)``; ``sample(key, sample_shape)`` returns
        ``sample_shape + (D,)``. ``batch_shape`` is ``()``, ``event_shape`` is ``(D,)``.

    Args:
        locs: Component locations.
        scale: Diagonal component scales (positive). Exactly one of ``scale``/``scale_tril``.
        scale_tril: Lower-triangular component scale matrices.
        logits: Constant part of the classifier's logits; defaults to zeros (uniform weights).
        classifier_params: Layers ``(weight (d_in, d_out), bias (d_out,))`` of the Tanh MLP
            ``f``; the first ``d_in`` is ``D`` and the last ``d_out`` is ``K``. Empty (default):
            constant weights ``softmax(logits)``, i.e. a Gaussian mixture.
        flows: Optional ``K`` flows ``F_k`` over ``R^D`` as one flowjax bijection (base to
            latent) whose arrays are stacked along a leading axis of size ``K`` (e.g. from
            :func:`init_component_flows`); applied with ``eqx.filter_vmap``. None (default):
            affine components.
        validate_args: Passed to the NumPyro ``Distribution``.

    Example:
        >>> cwm = ClassifierWeightedMixture(jnp.zeros((3, 2)), scale=jnp.ones((3, 2)))
        >>> cwm.log_prob(cwm.sample(random.key(0), (5,))).shape
        (5,)

    Cost:
        ``log_prob`` evaluates the classifier at ``K`` points per input (``O(K^2)`` outputs);
        ``sample_components`` and ``sample`` evaluate it once per base draw. Flows add ``K``
        flow passes (inverse in ``log_prob``, forward in sampling), vectorized over ``K``.

    Raises:
        ValueError: If the shapes of the parameters disagree or ``flows`` is not ``K`` stacked
            flows over ``R^D`` (the message names the argument).

    References:
        Classifier Weighted Mixture models (Argouarc'h, Septier, Desbouvries, 2025).
        https://arxiv.org/abs/2501.02989
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    reparametrized_params: list = []
    pytree_data_fields = ("locs", "scale", "scale_tril", "logits", "classifier_params", "flows")

    def __init__(
        self,
        locs: jax.Array,
        *,
        scale: jax.Array | None = None,
        scale_tril: jax.Array | None = None,
        logits: jax.Array | None = None,
        classifier_params: ClassifierParams = (),
        flows=None,  # noqa: ANN001 - a stacked flowjax bijection
        validate_args: bool | None = None,
    ) -> None:
        if jnp.ndim(locs) != 2 or jnp.shape(locs)[0] < 1:
            raise ValueError(f"locs must have shape (K, D) with K >= 1; got {jnp.shape(locs)}")
        num_components, dim = jnp.shape(locs)
        if (scale is None) == (scale_tril is None):
            raise ValueError("pass exactly one of scale (K, D) or scale_tril (K, D, D)")
        if scale is not None and jnp.shape(scale) != jnp.shape(locs):
            raise ValueError(f"scale must have shape {jnp.shape(locs)}; got {jnp.shape(scale)}")
        if scale_tril is not None and jnp.shape(scale_tril) != (num_components, dim, dim):
            raise ValueError(
                f"scale_tril must have shape {(num_components, dim, dim)}; "
                f"got {jnp.shape(scale_tril)}"
            )
        logits = jnp.zeros(num_components, jnp.result_type(locs)) if logits is None else logits
        if jnp.shape(logits) != (num_components,):
            raise ValueError(
                f"logits must have shape ({num_components},); got {jnp.shape(logits)}"
            )
        _check_classifier(classifier_params, dim, num_components)
        _check_flows(flows, dim, num_components)
        self.locs, self.scale, self.scale_tril = locs, scale, scale_tril
        self.logits = logits
        self.classifier_params = tuple(tuple(layer) for layer in classifier_params)
        self.flows = flows
        super().__init__(batch_shape=(), event_shape=(dim,), validate_args=validate_args)

    @property
    def num_components(self) -> int:
        """Number of components ``K``."""
        return jnp.shape(self.locs)[0]

    def log_weights(self, z: jax.Array) -> jax.Array:
        """Log classifier weights ``log w(z)``: ``(..., D)`` to ``(..., K)``."""
        return jax.nn.log_softmax(classifier_logits(z, self.logits, self.classifier_params), -1)

    def _log_det_scale(self) -> jax.Array:
        if self.scale is not None:
            return jnp.log(self.scale).sum(-1)
        return jnp.log(jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1)).sum(-1)

    def component_forward(self, z: jax.Array) -> jax.Array:
        """All ``K`` sampling maps ``x_k = loc_k + L_k F_k(z)``: ``(..., D)`` to ``(..., K, D)``.

        Without flows ``F_k`` is the identity.
        """
        if self.flows is None:
            u = z[..., None, :]
        else:
            flat = _flows_forward(self.flows, z.reshape(-1, z.shape[-1]))  # (K, N, D)
            u = jnp.moveaxis(flat, 0, -2).reshape(z.shape[:-1] + flat.shape[::2])
        if self.scale is not None:
            return self.locs + self.scale * u
        return self.locs + (self.scale_tril @ u[..., None])[..., 0]

    def component_inverse(self, x: jax.Array) -> jax.Array:
        """The paper's maps ``z_k = T_k(x) = F_k^{-1}(L_k^{-1}(x - loc_k))``.

        Shapes:
            ``(..., D)`` to ``(..., K, D)``.
        """
        return self._inverse_and_log_det(x)[0]

    def _inverse_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``z_k = T_k(x)`` ``(..., K, D)`` and ``log |det dT_k/dx|`` ``(..., K)``."""
        centred = x[..., None, :] - self.locs
        if self.scale is not None:
            u = centred / self.scale
        else:
            tril = jnp.broadcast_to(self.scale_tril,
                                    centred.shape[:-1] + self.scale_tril.shape[-2:])
            u = lax.linalg.triangular_solve(tril, centred[..., None], left_side=True,
                                            lower=True)[..., 0]
        log_det = -self._log_det_scale()
        if self.flows is None:
            return u, jnp.broadcast_to(log_det, u.shape[:-1])
        k, d = u.shape[-2:]
        stacked = jnp.moveaxis(u.reshape(-1, k, d), 1, 0)  # (K, N, D)
        z, flow_log_det = _flows_inverse(self.flows, stacked)
        z = jnp.moveaxis(z, 0, 1).reshape(u.shape)
        return z, log_det + jnp.moveaxis(flow_log_det, 0, 1).reshape(u.shape[:-1])

    def log_prob(self, value: jax.Array) -> jax.Array:
        z, log_det = self._inverse_and_log_det(value)  # (..., K, D), (..., K)
        dim = z.shape[-1]
        log_normal = -0.5 * (z**2).sum(-1) - 0.5 * dim * math.log(2 * math.pi)
        log_w = jnp.diagonal(self.log_weights(z), axis1=-2, axis2=-1)  # w_k evaluated at z_k
        return jax.nn.logsumexp(log_normal + log_w + log_det, -1)

    def sample_components(
        self, rng_key: jax.Array, sample_shape: tuple[int, ...] = ()
    ) -> tuple[jax.Array, jax.Array]:
        """Rao-Blackwellized draws: ``x_k = T_k^{-1}(z)`` for one shared ``z`` and ``log w(z)``.

        ``E_q[h(x)] = E_z[sum_k exp(log_weights_k) h(x_k)]``; both outputs are differentiable
        in every parameter (the finite-mixture protocol of :mod:`numpyro_mixvi.guides.base`).

        Shapes:
            Returns ``x``: ``sample_shape + (K, D)`` and ``log_weights``: ``sample_shape + (K,)``.
        """
        z = random.normal(rng_key, tuple(sample_shape) + self.event_shape,
                          jnp.result_type(self.locs))
        return self.component_forward(z), self.log_weights(z)

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        """Ancestral draws ``z -> r ~ Cat(w(z)) -> x = T_r^{-1}(z)``: ``sample_shape + (D,)``.

        Differentiating through the draws raises ``NotImplementedError`` (see the class doc).
        """
        key_z, key_r = random.split(key)
        x, log_weights = self.sample_components(key_z, sample_shape)
        index = random.categorical(key_r, log_weights)
        draw = jnp.take_along_axis(x, index[..., None, None], axis=-2)[..., 0, :]
        return refuse_gradient(draw, _NOT_REPARAMETERIZABLE)

    @classmethod
    def from_samples(
        cls,
        rng_key: jax.Array,
        samples: jax.Array,
        num_components: int,
        *,
        hidden_dims: Sequence[int] | None = (32, 32),
        covariance: str = "diag",
        em_steps: int = 100,
        flow_layers: int = 0,
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
        from numpyro_mixvi.distributions._gmm_em import gaussian_mixture_em

        samples = jnp.asarray(samples)
        _check_samples(samples, num_components)
        if covariance not in ("diag", "full"):
            raise ValueError(f"covariance must be 'diag' or 'full'; got {covariance!r}")
        check_flow_layers(flow_layers, samples.shape[-1])
        key_em, key_init = random.split(rng_key)
        key_init, key_flows = random.split(key_init)
        weights, locs, scales = gaussian_mixture_em(
            key_em, samples, num_components, covariance=covariance, num_steps=em_steps
        )
        kind = "scale" if covariance == "diag" else "scale_tril"
        return cls(
            locs,
            **{kind: scales},
            logits=jnp.log(weights),
            classifier_params=init_classifier_params(
                key_init, samples.shape[-1], num_components, hidden_dims, samples.dtype
            ),
            flows=init_component_flows(key_flows, samples.shape[-1], num_components,
                                       flow_layers, samples.dtype),
        )

    def fit(
        self,
        rng_key: jax.Array,
        samples: jax.Array,
        *,
        num_steps: int = 1000,
        batch_size: int = 1024,
        lr: float = 5e-3,
        progress_bar: bool = True,
    ) -> tuple[ClassifierWeightedMixture, jax.Array]:
        """Maximum-likelihood fit of every parameter by Adam on minibatches of ``samples``.

        Starts from this distribution's parameters (e.g. :meth:`from_samples`) and returns a
        new distribution. The steps run jitted in chunks; each chunk's losses are checked.

        Shapes:
            ``samples``: ``(N, D)``. Returns the fitted distribution and the per-step mean
            negative log-likelihood ``(num_steps,)``.

        Raises:
            ValueError: If ``samples`` is not ``(N, D)`` or holds non-finite values.
            FloatingPointError: If the loss becomes non-finite (names the step).
        """
        from numpyro_mixvi.distributions._cwm_fit import fit_cwm

        samples = jnp.asarray(samples)
        _check_samples(samples, 1, dim=self.event_shape[0])
        return fit_cwm(rng_key, self, samples, num_steps=num_steps, batch_size=batch_size,
                       lr=lr, progress_bar=progress_bar)


def _check_classifier(classifier_params: ClassifierParams, dim: int, num_components: int) -> None:
    width = dim
    for i, layer in enumerate(classifier_params):
        weight, bias = layer
        if jnp.ndim(weight) != 2 or jnp.shape(weight)[0] != width or (
            jnp.shape(bias) != jnp.shape(weight)[-1:]
        ):
            raise ValueError(
                f"classifier_params[{i}] must be (weight ({width}, d), bias (d,)); got shapes "
                f"{jnp.shape(weight)}, {jnp.shape(bias)}"
            )
        width = jnp.shape(weight)[1]
    if classifier_params and width != num_components:
        raise ValueError(
            f"the last classifier layer must output K={num_components} logits; got {width}"
        )


def _check_flows(flows, dim: int, num_components: int) -> None:  # noqa: ANN001
    if flows is None:
        return
    shapes = {jnp.shape(a)[:1] for a in jax.tree.leaves(eqx.filter(flows, eqx.is_array))}
    if getattr(flows, "shape", None) != (dim,) or shapes != {(num_components,)}:
        raise ValueError(
            f"flows must be a flowjax bijection over R^{dim} whose arrays are stacked along a "
            f"leading axis of size K={num_components} (e.g. from init_component_flows); got "
            f"{type(flows).__name__} with shape {getattr(flows, 'shape', None)} and leading "
            f"array sizes {sorted(shapes)}"
        )


def _check_samples(samples: jax.Array, num_components: int, *, dim: int | None = None) -> None:
    if not isinstance(num_components, int) or num_components < 1:
        raise ValueError(f"num_components must be an int >= 1; got {num_components}")
    if samples.ndim != 2 or (dim is not None and samples.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"samples must have shape {want}; got {samples.shape}")
    if samples.shape[0] < num_components:
        raise ValueError(
            f"need at least num_components={num_components} samples; got {samples.shape[0]}"
        )
    bad = int((~jnp.isfinite(samples)).any(-1).sum())
    if bad:
        raise ValueError(f"samples hold {bad} rows with non-finite values; drop or fix them")
