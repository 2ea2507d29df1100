r"""Heterogeneous mixture of flow experts with global weights (AMF-VI), JAX version.

.. math:: \log q(x) = \operatorname{logsumexp}_k \big(\log \pi_k + \log q_k(x)\big)

Stage 2 (:func:`ema_weights_step`, pure and jittable): the paper's ``"ema"`` update
``pi <- beta pi + (1 - beta) softmax_k(mean_b log q_k(x_b))`` converges to
``pi_k ∝ exp(-CE(p, q_k))``, **not** to maximum-likelihood weights; ``"responsibility"``
averages per-point responsibilities (EM smoothed by the EMA), whose fixed point is the ML
weight vector. Experts are flowjax distributions (``MAF``, ``RealNVP``, ``RBIG``);
:meth:`FlowMixture.fit` runs the paper's two stages from samples (stage 1: each expert alone by
maximum likelihood with a jitted Adam step; stage 2: :func:`fit_weights`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import paramax
from flowjax.train import step as flowjax_step
from flowjax.train.losses import MaximumLikelihoodLoss
from jax import Array
from numpyro.distributions import Distribution, constraints
from tqdm.auto import tqdm

from numpyro_mixvi.distributions._refuse import refuse_gradient
from numpyro_mixvi.flows import MAF, RBIG, RealNVP
from numpyro_mixvi.flows._flowjax import typed_key

EXPERTS = ("maf", "realnvp", "rbig")
"""Expert names :meth:`FlowMixture.fit` builds (``MAF``, ``RealNVP``, ``RBIG``)."""
_ML_LOSS = MaximumLikelihoodLoss()  # one instance: the jitted step's cache is keyed on it


class EMAWeightsState(NamedTuple):
    """Stage-2 state: weights ``(K,)`` on the simplex and the step count."""

    weights: Array
    num_steps: Array


class EMAWeightsInfo(NamedTuple):
    """``n_eff = 1 / sum pi^2``, per-expert batch scores ``(K,)`` and the step's target ``(K,)``."""

    n_eff: Array
    scores: Array
    target: Array


def ema_weights_init(num_experts: int, *, dtype=None) -> EMAWeightsState:
    """Uniform weights over ``num_experts``."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1; got {num_experts}")
    dtype = dtype or jnp.result_type(float)
    return EMAWeightsState(jnp.full((num_experts,), 1.0 / num_experts, dtype), jnp.zeros((), int))


def ema_weights_step(
    state: EMAWeightsState,
    log_likelihoods: Array,
    *,
    beta: float = 0.9,
    weight_update: Literal["ema", "responsibility"] = "ema",
    sample_weights: Array | None = None,
) -> tuple[EMAWeightsState, EMAWeightsInfo]:
    """One stage-2 update from ``log q_k(x_b)`` of shape ``(K, B)`` (see the torch docs).

    Non-finite scores count as ``-inf`` (``r_k = 0``, geometric decay); an expert with a NaN
    log-likelihood gets weight exactly 0. If no expert is finite the weights become NaN and
    :func:`fit_weights` raises ``FloatingPointError`` (inside ``jit`` nothing can raise).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1); got {beta}")
    if weight_update not in ("ema", "responsibility"):
        raise ValueError(f"weight_update must be 'ema' or 'responsibility'; got {weight_update!r}")
    batch = log_likelihoods.shape[-1]
    w = jnp.full((batch,), 1.0 / batch, log_likelihoods.dtype)
    w = w if sample_weights is None else sample_weights
    finite = jnp.isfinite(log_likelihoods)
    log_lik = jnp.where(finite, log_likelihoods, -jnp.inf)  # the documented exact rule
    expert_ok = finite.all(-1)
    safe = jnp.where(expert_ok[:, None], log_lik, 0.0)
    scores = jnp.where(expert_ok, (safe * w).sum(-1), -jnp.inf)
    if weight_update == "ema":
        target = jax.nn.softmax(scores)
    else:
        joint = jnp.log(state.weights)[:, None] + log_lik
        covered = jnp.isfinite(joint).any(0)
        resp = jnp.where(covered, jax.nn.softmax(jnp.where(covered, joint, 0.0), 0), 0.0)
        target = (resp * w).sum(-1) / (w * covered).sum()
    weights = beta * state.weights + (1.0 - beta) * target
    weights = jnp.where(jnp.isnan(log_likelihoods).any(-1), 0.0, weights)
    weights = weights / weights.sum()
    info = EMAWeightsInfo(1.0 / (weights**2).sum(), scores, target)
    return EMAWeightsState(weights, state.num_steps + 1), info


_NOT_REPARAMETERIZABLE = (
    "FlowMixture draws a discrete expert index, so stock ELBOs (Trace_ELBO, TraceGraph_ELBO, "
    "...) cannot differentiate through its samples without bias; use "
    "numpyro_mixvi.RBMixture_ELBO, which sums the index out (or AutoFlowMixture.fit)"
)


class FlowMixture(Distribution):
    r"""Mixture of flow experts with global weights: ``q(x) = sum_k pi_k q_k(x)``.

    A NumPyro distribution over ``R^D`` and a finite mixture in the sense of
    :mod:`numpyro_mixvi.guides.base`: :meth:`sample_components` draws every expert once
    (reparameterized) and returns ``log pi``, so ``RBMixture_ELBO`` trains experts and weights.
    Ancestral :meth:`sample` draws are not differentiable: differentiating through them raises
    ``NotImplementedError`` (pointing to ``RBMixture_ELBO``) instead of silently dropping the
    expert index's contribution.

    Shapes:
        ``log_prob`` maps ``(..., D)`` to ``(...)``; ``component_log_probs`` to ``(..., K)``;
        ``sample(key, sample_shape)`` returns ``sample_shape + (D,)``;
        ``sample_components(key, sample_shape)`` returns ``sample_shape + (K, D)`` and
        ``sample_shape + (K,)``. ``batch_shape`` is ``()``, ``event_shape`` is ``(D,)``.

    Args:
        experts: ``K`` flowjax distributions over ``R^D`` (e.g. ``MAF``, ``RealNVP``, ``RBIG``).
        weights: Mixture weights ``(K,)``, non-negative, summing to one.

    Example:
        >>> mixture = FlowMixture.fit(jax.random.key(0), samples, progress_bar=False)
        >>> mixture.weights, mixture.n_eff
        >>> mixture.log_prob(samples[:10]).shape
        (10,)

    Cost:
        ``log_prob`` evaluates every expert. Exact sampling draws every expert ``n`` times and
        keeps the one picked by ``Categorical(pi)`` (``K`` times the cost of one expert; static
        shapes under ``jit``).

    References:
        AMF-VI: adaptive heterogeneous mixtures of normalizing flows (2025),
        https://github.com/benjaminsw/AMF-VIJ
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    reparametrized_params: list = []
    pytree_data_fields = ("experts", "weights")

    def __init__(self, experts: Sequence, weights: Array) -> None:
        if len(experts) < 1:
            raise ValueError("experts must hold at least one expert")
        weights = jnp.asarray(weights)
        if weights.shape != (len(experts),):
            raise ValueError(f"weights must have shape ({len(experts)},); got {weights.shape}")
        self.experts = tuple(experts)
        self.weights = weights / weights.sum()
        super().__init__(batch_shape=(), event_shape=tuple(self.experts[0].shape))

    @property
    def n_eff(self) -> Array:
        """Effective number of experts ``1 / sum_k pi_k^2``."""
        return 1.0 / (self.weights**2).sum()

    def component_log_probs(self, x: Array) -> Array:
        """``log q_k(x)`` stacked last: ``(..., D) -> (..., K)``."""
        return jnp.stack([e.log_prob(x) for e in self.experts], -1)

    def log_prob(self, x: Array) -> Array:
        # Zero-weight experts contribute exactly nothing (a NaN expert switched off by stage 2
        # cannot reach the density): where() selects -inf for them before the logsumexp.
        terms = jnp.log(self.weights) + self.component_log_probs(x)
        return jax.nn.logsumexp(jnp.where(self.weights > 0, terms, -jnp.inf), -1)

    def sample_components(
        self, rng_key: Array, sample_shape: tuple[int, ...] = ()
    ) -> tuple[Array, Array]:
        """One independent reparameterized draw per expert and ``log pi``.

        ``E_q[h(x)] = E[sum_k pi_k h(x_k)]`` with ``x_k ~ q_k``; ``x`` is differentiable in
        the experts' parameters and ``log_weights`` in ``pi`` (the finite-mixture protocol).

        Shapes:
            Returns ``x``: ``sample_shape + (K, D)`` and ``log_weights``: ``sample_shape + (K,)``.
        """
        keys = jax.random.split(typed_key(rng_key), len(self.experts))
        x = jnp.stack([e.sample(k, tuple(sample_shape))
                       for e, k in zip(self.experts, keys, strict=True)], -2)
        log_weights = jnp.broadcast_to(jnp.log(self.weights), x.shape[:-1])
        return x, log_weights

    def sample(self, key: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """Exact ancestral draws ``sample_shape + (D,)`` (not differentiable; see the class doc)."""
        key_x, key_index = jax.random.split(key)
        draws, log_weights = self.sample_components(key_x, sample_shape)
        index = jax.random.categorical(key_index, log_weights)
        draw = jnp.take_along_axis(draws, index[..., None, None], -2)[..., 0, :]
        return refuse_gradient(draw, _NOT_REPARAMETERIZABLE)

    def sample_and_log_prob(self, rng_key: Array, sample_shape: tuple[int, ...] = ()):
        """``(x, log q(x))`` from one call, for parity with flowjax and the torch twin."""
        x = self.sample(rng_key, sample_shape)
        return x, self.log_prob(x)

    @classmethod
    def fit(
        cls,
        rng_key: Array,
        samples: Array | Callable[[Array, int], Array],
        *,
        experts: Sequence[str | Callable[[Array, int], object]] = EXPERTS,
        num_steps: int = 1000,
        batch_size: int = 512,
        lr: float = 1e-3,
        num_weight_steps: int = 200,
        weight_batch_size: int = 1000,
        beta: float = 0.9,
        weight_update: Literal["ema", "responsibility"] = "ema",
        expert_kwargs: dict[str, dict] | None = None,
        progress_bar: bool = True,
    ) -> FlowMixture:
        """The paper's two-stage procedure from samples.

        Stage 1 trains each parametric expert alone by Adam on minibatch negative
        log-likelihood (:func:`train_expert`: ``num_steps`` ``flowjax.train.step`` updates in
        jitted chunks, on batches drawn with replacement or fresh from a sampler) and fits RBIG
        to the samples. An expert whose
        loss turns non-finite stops training with a ``RuntimeWarning`` and keeps its last
        finite parameters; stage 2 then down-weights it. (``flowjax.train.fit_to_data`` is not
        used: it trains by epochs with a validation split and early stopping, and does not
        stop on a non-finite loss.) Stage 2 runs ``num_weight_steps`` :func:`ema_weights_step`
        updates on fresh batches (:func:`fit_weights`).

        Shapes:
            ``samples``: ``(N, D)``; the result is a mixture over ``R^D``.

        Args:
            rng_key: PRNG key for initializations, minibatches, rotations and resampling.
            samples: ``(N, D)`` draws from the target, or a jittable ``sampler(key, n) -> (n, D)``
                for fresh draws (stage 2 then scores on batches the experts never saw; RBIG is
                fit to 4096 draws). With an array, both stages resample it with replacement.
            experts: Names in ``("maf", "realnvp", "rbig")`` or factories
                ``(key, input_dim) -> flowjax distribution``, trained by maximum likelihood.
            num_steps: Adam steps per parametric expert; at least 1.
            batch_size: Stage-1 minibatch size.
            lr: Adam learning rate.
            num_weight_steps: Stage-2 EMA steps.
            weight_batch_size: Stage-2 batch size.
            beta: EMA factor in ``[0, 1)``.
            weight_update: ``"ema"`` (paper) or ``"responsibility"`` (ML weights).
            expert_kwargs: Per-name keyword arguments, e.g. ``{"maf": {"num_transforms": 8}}``
                (RBIG's go to :meth:`RBIG.fit`).
            progress_bar: Show tqdm bars per stage.

        Returns:
            The fitted :class:`FlowMixture` (experts frozen, weights from stage 2).

        Cost:
            ``K * num_steps`` expert NLL steps (one compilation per expert structure) plus
            ``num_weight_steps`` evaluations of every expert on ``weight_batch_size`` points.

        Example:
            >>> x = jax.random.normal(jax.random.key(0), (1000, 2))
            >>> mixture = FlowMixture.fit(jax.random.key(1), x, num_steps=500, progress_bar=False)
            >>> mixture.weights.shape, mixture.log_prob(x[:10]).shape
            ((3,), (10,))

        Raises:
            ValueError: If ``samples`` is not a finite ``(N, D)`` array or a callable, an
                expert name is unknown, or ``num_steps < 1``.
            FloatingPointError: If every expert's stage-2 log-likelihood is non-finite.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1; got {num_steps}")
        key_train, key_build, key_weights = jax.random.split(typed_key(rng_key), 3)
        draw = _batch_source(samples)
        samples = samples if callable(samples) else jnp.asarray(samples)
        train = draw(key_train, None)
        modules = []
        for k, (spec, key) in enumerate(zip(experts, jax.random.split(key_build, len(experts)),
                                            strict=True)):
            key_init, key_fit = jax.random.split(key)
            module = _build_expert(spec, key_init, train, expert_kwargs or {}, progress_bar)
            if not isinstance(module, RBIG):
                module, _ = train_expert(key_fit, module, _minibatch_nll, samples, batch_size,
                                         num_steps=num_steps, lr=lr, label=f"expert {k}",
                                         progress_bar=progress_bar)
            modules.append(module)
        weights = fit_weights(
            key_weights, modules, lambda key: draw(key, weight_batch_size),
            num_steps=num_weight_steps, beta=beta, weight_update=weight_update,
            progress_bar=progress_bar,
        )
        return cls(modules, weights)


def fit_weights(
    rng_key: Array,
    experts: Sequence,
    batches: Callable[[Array], Array],
    *,
    num_steps: int = 200,
    beta: float = 0.9,
    weight_update: Literal["ema", "responsibility"] = "ema",
    progress_bar: bool = True,
) -> Array:
    """Stage 2: ``num_steps`` jitted updates on ``batches(key) -> (B, D)``; returns ``pi``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")

    @eqx.filter_jit
    def step(key, state, experts):
        x = batches(key)
        log_lik = jnp.stack([e.log_prob(x) for e in experts])
        return ema_weights_step(state, log_lik, beta=beta, weight_update=weight_update)

    state = ema_weights_init(len(experts))
    bar = tqdm(jax.random.split(rng_key, num_steps), desc="stage 2 (weights)",
               disable=not progress_bar)
    for key in bar:
        state, info = step(key, state, tuple(experts))
        if not bool(jnp.isfinite(state.weights).all()):
            raise FloatingPointError("every expert has a non-finite log-likelihood on a batch")
        bar.set_postfix(n_eff=f"{float(info.n_eff):.2f}")
    return state.weights


def train_expert(
    rng_key: Array,
    expert,  # noqa: ANN001 - any pytree the loss accepts (usually a flowjax distribution)
    loss_fn: Callable[..., Array],
    *loss_args,  # noqa: ANN002
    num_steps: int,
    lr: float,
    label: str = "expert",
    progress_bar: bool = True,
    optimizer: optax.GradientTransformation | None = None,
) -> tuple[object, Array]:
    """Adam on ``loss_fn(params, static, key, *loss_args)``; stops at the first non-finite loss.

    ``optimizer`` replaces ``Adam(lr)`` (e.g. per-group step sizes); pass one object per
    configuration (cached) so repeated fits reuse the compiled steps.

    The trainable leaves are the inexact arrays outside ``paramax.NonTrainable`` wrappers (as
    in flowjax's own loops). Steps run as ``flowjax.train.step`` inside a jitted ``lax.scan``
    over chunks of up to 100 steps (one dispatch and one finiteness check per chunk). From the
    first non-finite loss on, the parameters stay at their last finite values; training then
    stops with a ``RuntimeWarning`` naming ``label`` and the step, and the returned losses end
    with that loss. Arrays in ``loss_args`` are traced and everything else is static, so a
    module-level ``loss_fn`` compiles once per expert structure, not once per call.

    Shapes:
        Returns the trained pytree and the per-step losses ``(num_steps_run,)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    params, static = partition_trainable(expert)
    optimizer = _adam(lr) if optimizer is None else optimizer
    opt_state = optimizer.init(params)
    chunk = min(num_steps, 100)
    num_chunks = -(-num_steps // chunk)
    keys = jax.random.split(rng_key, num_chunks * chunk)
    keys = keys.reshape((num_chunks, chunk, *keys.shape[1:]))
    losses = []
    bar = tqdm(total=num_steps, desc=f"stage 1 ({label})", disable=not progress_bar)
    for c in range(num_chunks):
        active = jnp.arange(c * chunk, (c + 1) * chunk) < num_steps
        params, opt_state, chunk_losses = _train_chunk(
            params, opt_state, keys[c], active, static, loss_args, loss_fn, optimizer
        )
        chunk_losses = chunk_losses[: int(active.sum())]
        bad = ~jnp.isfinite(chunk_losses)
        if bool(bad.any()):
            first = int(jnp.argmax(bad))
            losses.append(chunk_losses[: first + 1])
            warnings.warn(f"{label}: non-finite loss at step {c * chunk + first}; stage 1 stops "
                          "for it (its parameters stay at their last finite values)",
                          RuntimeWarning, stacklevel=3)
            break
        losses.append(chunk_losses)
        bar.update(len(chunk_losses))
        bar.set_postfix(loss=f"{float(chunk_losses[-1]):.3f}")
    bar.close()
    return eqx.combine(params, static), jnp.concatenate(losses)


def partition_trainable(expert) -> tuple[object, object]:  # noqa: ANN001
    """``(params, static)``: inexact arrays outside ``paramax.NonTrainable`` wrappers, and the rest.

    The split flowjax's own training loops use; ``eqx.combine(params, static)`` undoes it.
    """
    return eqx.partition(
        expert, eqx.is_inexact_array, is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable)
    )


@eqx.filter_jit
def _train_chunk(params, opt_state, keys, active, static, loss_args, loss_fn, optimizer):  # noqa: ANN001, ANN202
    """``len(keys)`` Adam steps in one scan; a step that is inactive or follows a non-finite
    loss leaves the parameters and optimizer state unchanged."""

    def body(carry, inputs):  # noqa: ANN001, ANN202
        params, opt_state, healthy = carry
        key, on = inputs
        new_params, new_state, loss = flowjax_step(
            params, static, key, *loss_args, optimizer=optimizer, opt_state=opt_state,
            loss_fn=loss_fn,
        )
        healthy = healthy & (jnp.isfinite(loss) | ~on)
        keep = healthy & on
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(keep, new, old), (new_params, new_state),
            (params, opt_state),
        )
        return (params, opt_state, healthy), loss

    carry = (params, opt_state, jnp.ones((), bool))
    (params, opt_state, _), losses = jax.lax.scan(body, carry, (keys, active))
    return params, opt_state, losses


def _minibatch_nll(params, static, key: Array, samples, batch_size: int) -> Array:  # noqa: ANN001
    """Mean NLL of a minibatch: resampled from an ``(N, D)`` array or drawn by a sampler."""
    if callable(samples):
        batch = samples(key, batch_size)
    else:
        batch = samples[jax.random.randint(key, (batch_size,), 0, samples.shape[0])]
    return _ML_LOSS(params, static, batch)


@functools.lru_cache(maxsize=16)
def _adam(lr: float) -> optax.GradientTransformation:
    """One optimizer object per step size, so repeated fits reuse the compiled step."""
    return optax.adam(lr)


def _batch_source(samples) -> Callable[[Array, int | None], Array]:  # noqa: ANN001
    """``draw(key, n)``: ``n`` fresh (or resampled) points; ``draw(key, None)``: stage-1 data."""
    if callable(samples):
        return lambda key, n: samples(key, 4096 if n is None else n)
    samples = jnp.asarray(samples)
    if samples.ndim != 2 or not bool(jnp.isfinite(samples).all()):
        raise ValueError("samples must be a finite (N, D) array or a callable sampler(key, n)")

    def draw(key: Array, n: int | None) -> Array:
        if n is None:
            return samples
        return samples[jax.random.randint(key, (n,), 0, samples.shape[0])]

    return draw


def _build_expert(spec, key: Array, train: Array, kwargs: dict, progress_bar: bool):  # noqa: ANN001, ANN202
    dim = train.shape[-1]
    if callable(spec):
        return spec(key, dim)
    options = kwargs.get(spec, {})
    if spec == "maf":
        return MAF(key, dim, **options)
    if spec == "realnvp":
        return RealNVP(key, dim, **options)
    if spec == "rbig":
        return RBIG.fit(key, train, progress_bar=progress_bar, **options)
    raise ValueError(f"experts entries must be callables or one of {EXPERTS}; got {spec!r}")
