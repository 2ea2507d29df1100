r"""Semi-implicit Gaussian family and its importance-sampled score (private SIVI math, JAX).

Same estimator as ``pyro_mixvi._sivi``: with proposal draws
:math:`\epsilon_j \sim \tau(\cdot \mid \tilde z)` and log-weights
:math:`r_j = \log p(\epsilon_j) + \log q(z \mid \epsilon_j) - \log \tau(\epsilon_j \mid \tilde z)`,
:math:`\log \hat q(z) = \operatorname{logsumexp}_j r_j - \log k` and
:math:`\hat s(z) = \sum_j \operatorname{softmax}(r)_j (\mu(\epsilon_j) - z) / \sigma(\epsilon_j)^2`.
Every input is wrapped in ``stop_gradient`` (the proposal's context :math:`\tilde z = z` is
detached), so no tangent is carried through the ``k`` draws, which run in a ``lax.scan`` over
chunks: memory is ``O(chunk_size * N * (m + D))`` whatever ``k`` is.

The four choices that keep training stable at ``AutoNormal``'s learning rates are those of
``pyro_mixvi._sivi`` (measured on centered eight schools): the mixing network's output is scaled
by :func:`output_multiplier` ``= 1 / fan_in`` of its last layer, its hidden layers by
:func:`hidden_multiplier` ``= 1 / sqrt(fan_in)`` (stored divided by it), the flow
proposal sees the standardized point ``(z - loc) / sigma`` (:class:`StandardizedProposal`) and
starts as the prior, and in training the draw's own ``eps`` takes one of the ``k`` slots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from numpyro.distributions import Distribution, constraints

from numpyro_mixvi.flows._flowjax import typed_key

__all__ = [
    "SemiImplicitNormal",
    "StandardizedProposal",
    "generator_apply",
    "generator_init",
    "hidden_multiplier",
    "importance_score",
    "output_multiplier",
]


SPREAD_INIT_DRAWS = 4096


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


def generator_init(
    rng_key: jax.Array,
    mixing_dim: int,
    init_loc: jax.Array,
    hidden_dims: Sequence[int],
    *,
    init_scale: float,
    conditional_scale: bool = False,
    init_mixing_fraction: float = 0.0,
) -> dict[str, Any]:
    """Parameters of ``q(z | eps) = N(mu(eps), sigma(eps)^2)``; ``q`` starts with mean
    ``init_loc`` and per-coordinate variance ``init_scale^2``.

    ``mu(eps) = loc + MLP(eps) * m`` (ReLU, torch-style uniform fan-in init of the hidden
    layers, stored divided by :func:`hidden_multiplier`);
    ``sigma = softplus(raw_scale [+ MLP_scale(eps) * m])``, with
    ``m = output_multiplier(fan_in)`` of the last layer (see :func:`output_multiplier`). The
    share ``init_mixing_fraction`` of the initial variance is the spread of ``mu(eps)`` (random
    ``mu`` rows of the last layer, rescaled on ``SPREAD_INIT_DRAWS`` draws of ``eps``), the rest
    ``sigma^2``; with 0 the last layer is zero and ``q = N(init_loc, init_scale^2)``, a saddle
    the network leaves only by noise (see ``pyro_mixvi._sivi.ConditionalNormalGenerator``).
    """
    latent_dim = init_loc.shape[-1]
    dtype = init_loc.dtype
    widths = [mixing_dim, *hidden_dims]
    layers = []
    keys = jax.random.split(rng_key, max(len(widths) - 1, 1))
    for key, fan_in, fan_out in zip(keys, widths[:-1], widths[1:], strict=False):
        # torch's uniform(+-1/sqrt(fan_in)) init, stored divided by hidden_multiplier(fan_in).
        bound = 1.0 / math.sqrt(fan_in) / hidden_multiplier(fan_in)
        w_key, b_key = jax.random.split(key)
        layers.append(
            (
                jax.random.uniform(w_key, (fan_in, fan_out), dtype, -bound, bound),
                jax.random.uniform(b_key, (fan_out,), dtype, -bound, bound),
            )
        )
    out_dim = latent_dim * (2 if conditional_scale else 1)
    weight = jnp.zeros((widths[-1], out_dim), dtype)
    bias = jnp.zeros((out_dim,), dtype)
    fraction = init_mixing_fraction if hidden_dims else 0.0
    if fraction > 0:
        w_key, e_key = jax.random.split(jax.random.fold_in(rng_key, len(widths)))
        mu_weight = jax.random.normal(w_key, (widths[-1], latent_dim), dtype)
        eps = jax.random.normal(e_key, (SPREAD_INIT_DRAWS, mixing_dim), dtype)
        hidden = _hidden_features(layers, eps)
        raw_sd = (hidden @ mu_weight).std(0, ddof=1) * output_multiplier(widths[-1])
        mu_weight = mu_weight * (init_scale * math.sqrt(fraction) / raw_sd)
        weight = weight.at[:, :latent_dim].set(mu_weight)
        bias = bias.at[:latent_dim].set(-(hidden @ mu_weight).mean(0))
    layers.append((weight, bias))
    sigma = init_scale * math.sqrt(1 - fraction)
    return {
        "loc": jnp.asarray(init_loc),
        "raw_scale": jnp.full((latent_dim,), _inverse_softplus(sigma), dtype),
        "net": layers,
    }


def _hidden_features(layers, eps):
    hidden = eps
    for weight, bias in layers:
        hidden = jax.nn.relu((hidden @ weight + bias) * hidden_multiplier(weight.shape[0]))
    return hidden


def hidden_multiplier(fan_in: int) -> float:
    """Factor on a hidden layer's weight and bias: ``1 / sqrt(fan_in)`` (NTK parametrization).

    The parameters are stored divided by it (same initial function as torch's init), so one
    Adam step changes a hidden layer by ``lr`` relative instead of ``lr * sqrt(fan_in)``:
    without it, ``init_mixing_fraction > 0`` diverged on centered eight schools at lr 3e-2
    (measurements in ``pyro_mixvi._sivi.hidden_multiplier``).
    """
    return 1.0 / math.sqrt(fan_in)


def output_multiplier(fan_in: int) -> float:
    """Factor on the mixing network's output: ``1 / fan_in`` of its last layer.

    With Adam every last-layer weight moves by about ``lr`` per step, so the output moves by
    ``O(lr * fan_in * multiplier)``: ``1 / fan_in`` keeps that at ``O(lr)``, as ``loc`` moves
    (measurements in ``pyro_mixvi._sivi.output_multiplier``).
    """
    return 1.0 / fan_in


def generator_apply(params: dict[str, Any], eps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``eps (..., m) -> (loc (..., D), scale (..., D))``."""
    hidden = _hidden_features(params["net"][:-1], eps)
    weight, bias = params["net"][-1]
    out = (hidden @ weight + bias) * output_multiplier(weight.shape[0])
    latent_dim = params["loc"].shape[-1]
    loc = params["loc"] + out[..., :latent_dim]
    raw_scale = params["raw_scale"]
    if out.shape[-1] > latent_dim:
        raw_scale = raw_scale + out[..., latent_dim:]
    return loc, jnp.broadcast_to(jax.nn.softplus(raw_scale), loc.shape)


def _detach(tree):
    """``stop_gradient`` on every float array leaf of a pytree (modules keep their callables)."""

    def leaf(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact):
            return lax.stop_gradient(x)
        return x

    return jax.tree.map(leaf, tree)


def _log_weights_at(z, generator_params, eps, log_ratio):
    loc, scale = generator_apply(generator_params, eps)
    diff = z - loc
    log_cond = (-0.5 * (diff / scale) ** 2 - jnp.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)
    return log_cond + log_ratio, -diff / scale**2


class StandardizedProposal(eqx.Module):
    r"""Proposal :math:`\tau(\epsilon \mid z) = \mathrm{flow}(\epsilon \mid (z - loc) / \sigma)`.

    ``loc`` and ``scale`` are the generator's global location and scale (held under
    ``stop_gradient``), so the flow sees contexts of order one whatever the posterior's location
    and scale; at fixed generator parameters this is a function of ``z`` alone, as importance
    sampling needs. Same methods as a flowjax conditional distribution.

    Args:
        flow: flowjax conditional distribution over ``eps`` with ``cond_shape == (D,)``.
        loc: ``(D,)``.
        scale: ``(D,)``, positive.
    """

    flow: Any
    loc: jax.Array
    scale: jax.Array

    def _context(self, condition):
        return (condition - lax.stop_gradient(self.loc)) / lax.stop_gradient(self.scale)

    def sample_and_log_prob(self, key, sample_shape=(), condition=None):
        return self.flow.sample_and_log_prob(key, sample_shape, condition=self._context(condition))

    def log_prob(self, x, condition=None):
        return self.flow.log_prob(x, condition=self._context(condition))


def _log_prior(eps, mixing_dim):
    return -0.5 * (eps**2).sum(-1) - 0.5 * mixing_dim * math.log(2 * math.pi)


def _draw_chunk(rng_key, z, generator_params, proposal, mixing_dim, num_draws):
    if proposal is None:
        eps = jax.random.normal(rng_key, (num_draws, z.shape[0], mixing_dim), z.dtype)
        return _log_weights_at(z, generator_params, eps, 0.0)
    eps, log_tau = proposal.sample_and_log_prob(typed_key(rng_key), (num_draws,), condition=z)
    return _log_weights_at(z, generator_params, eps, _log_prior(eps, mixing_dim) - log_tau)


def _merge(carry, log_w, grads):
    log_total, score = carry
    chunk_total = jax.nn.logsumexp(log_w, 0)
    new_total = jnp.logaddexp(log_total, chunk_total)
    chunk_score = (jax.nn.softmax(log_w, 0)[..., None] * grads).sum(0)
    old = jnp.exp(log_total - new_total)[..., None]
    new = jnp.exp(chunk_total - new_total)[..., None]
    return new_total, old * score + new * chunk_score


def importance_score(
    rng_key: jax.Array,
    z: jax.Array,
    generator_params: dict[str, Any],
    proposal: Any | None,
    *,
    mixing_dim: int,
    num_importance_samples: int,
    chunk_size: int | None = None,
    own_mixing: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Self-normalized importance estimates of :math:`\log q(z)` and :math:`\nabla_z \log q(z)`.

    Shapes:
        ``z`` is ``(..., D)``; returns ``log_q (...)`` and ``score (..., D)``.

    Args:
        rng_key: Key for the ``k`` proposal draws.
        z: Points; detached (the proposal's context is not differentiated).
        generator_params: From :func:`generator_init`; detached.
        proposal: A flowjax conditional distribution over ``eps`` (context ``z``), or ``None``
            for the prior ``N(0, I_m)`` (BSIVI); detached.
        mixing_dim: ``m``.
        num_importance_samples: ``k >= 1`` (a Python int: it fixes shapes).
        chunk_size: Draws per ``lax.scan`` step (default ``k``); merged exactly.
        own_mixing: ``(..., m)``, the ``eps`` that generated each ``z`` (a draw from
            ``q(eps | z)``). It takes one of the ``k`` slots with the proposal draws' weight
            formula: the SIVI bound of Yin & Zhou 2018 for the prior, the importance-weighted
            hierarchical bound of Sobolev & Vetrov 2019 for a flow. ``E log_q >= log q`` (biased
            high by ``O(1/k)``), the weights stay bounded when the proposal misses
            ``q(eps | z)``, and the score is unchanged in expectation when ``tau = q(eps | z)``.

    Cost:
        ``k`` generator (and proposal) passes per point, no tangents.
    """
    if num_importance_samples < 1:
        raise ValueError(f"num_importance_samples must be >= 1; got {num_importance_samples}")
    chunk = num_importance_samples if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk}")
    z, generator_params, proposal = _detach((z, generator_params, proposal))
    batch_shape = z.shape[:-1]
    flat = z.reshape(-1, z.shape[-1])
    log_total = jnp.full(flat.shape[:1], -jnp.inf, flat.dtype)
    score = jnp.zeros_like(flat)
    num_fresh = num_importance_samples
    if own_mixing is not None:
        eps = lax.stop_gradient(own_mixing).reshape(1, -1, mixing_dim)
        log_ratio = 0.0
        if proposal is not None:
            log_tau = proposal.log_prob(eps[0], condition=flat)[None]
            log_ratio = _log_prior(eps, mixing_dim) - log_tau
        own = _log_weights_at(flat, generator_params, eps, log_ratio)
        log_total, score = _merge((log_total, score), *own)
        num_fresh -= 1
    if num_fresh > 0:
        chunk = min(chunk, num_fresh)
        num_chunks = -(-num_fresh // chunk)

        def body(carry, inputs):
            index, key = inputs
            log_w, grads = _draw_chunk(key, flat, generator_params, proposal, mixing_dim, chunk)
            valid = index * chunk + jnp.arange(chunk) < num_fresh
            log_w = jnp.where(valid[:, None], log_w, -jnp.inf)
            return _merge(carry, log_w, grads), None

        keys = jax.random.split(rng_key, num_chunks)
        (log_total, score), _ = lax.scan(body, (log_total, score), (jnp.arange(num_chunks), keys))
    log_q = log_total - math.log(num_importance_samples)
    return log_q.reshape(batch_shape), score.reshape(z.shape)


class SemiImplicitNormal(Distribution):
    r"""Semi-implicit Gaussian :math:`q(z) = E_{\epsilon} N(z; \mu(\epsilon), \sigma(\epsilon)^2)`.

    ``sample_with_intermediates`` returns ``z`` and ``[eps, key]``; ``log_prob(z, intermediates)``
    is the importance estimate :math:`\log \hat q(z)` (biased low by ``O(1/k)``) whose gradient
    is the path-gradient surrogate: :math:`\hat s(z)` in ``z``, zero in the parameters at fixed
    ``z``. Given the intermediates of a flow-proposal draw it adds the proposal's forward-KL
    surrogate ``-log tau(eps | z) + stop_gradient(...)`` (value 0), so ``Trace_ELBO`` trains the
    proposal jointly; with intermediates the draw's own ``eps`` takes one of the ``k`` slots (see
    :func:`importance_score`), so that ``log_prob`` is biased high and the ELBO it gives low.

    Shapes:
        ``sample(key, sample_shape)`` is ``sample_shape + batch_shape + (D,)``;
        ``log_prob`` maps ``(..., D)`` to ``(...)``.

    Args:
        generator_params: From :func:`generator_init`.
        proposal: flowjax conditional distribution ``tau(eps | z)`` or ``None`` (prior).
        mixing_dim: ``m``.
        num_importance_samples: ``k`` for ``log_prob``; at least 1.
        chunk_size: Importance draws per scan step; default ``k``.
        rng_key: Key for ``log_prob`` calls made without intermediates (e.g. on given points);
            without it such calls raise.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    reparametrized_params: list = []

    def __init__(
        self,
        generator_params: dict[str, Any],
        proposal: Any | None,
        *,
        mixing_dim: int,
        num_importance_samples: int,
        chunk_size: int | None = None,
        proposal_batch_size: int = 0,
        rng_key: jax.Array | None = None,
        batch_shape: tuple[int, ...] = (),
        validate_args: bool | None = None,
    ) -> None:
        if num_importance_samples < 1:
            raise ValueError(f"num_importance_samples must be >= 1; got {num_importance_samples}")
        self.generator_params, self.proposal = generator_params, proposal
        self.mixing_dim, self.num_importance_samples = int(mixing_dim), int(num_importance_samples)
        self.chunk_size, self.rng_key = chunk_size, rng_key
        self.proposal_batch_size = int(proposal_batch_size)
        latent_dim = generator_params["loc"].shape[-1]
        super().__init__(tuple(batch_shape), (latent_dim,), validate_args=False)

    def expand(self, batch_shape) -> SemiImplicitNormal:
        return SemiImplicitNormal(
            self.generator_params,
            self.proposal,
            mixing_dim=self.mixing_dim,
            num_importance_samples=self.num_importance_samples,
            chunk_size=self.chunk_size,
            proposal_batch_size=self.proposal_batch_size,
            rng_key=self.rng_key,
            batch_shape=tuple(batch_shape),
        )

    def sample_with_intermediates(self, key, sample_shape=()) -> tuple[jax.Array, list]:
        eps_key, noise_key, score_key = jax.random.split(key, 3)
        shape = tuple(sample_shape) + self.batch_shape
        dtype = self.generator_params["loc"].dtype
        eps = jax.random.normal(eps_key, shape + (self.mixing_dim,), dtype)
        loc, scale = generator_apply(self.generator_params, eps)
        z = loc + scale * jax.random.normal(noise_key, loc.shape, dtype)
        return z, [eps, score_key]

    def sample(self, key, sample_shape=()) -> jax.Array:
        return self.sample_with_intermediates(key, sample_shape)[0]

    def importance_score(self, rng_key, value, own_mixing=None) -> tuple[jax.Array, jax.Array]:
        """``(log_q_hat, score)`` at ``value``, without tangents."""
        return importance_score(
            rng_key,
            value,
            self.generator_params,
            self.proposal,
            mixing_dim=self.mixing_dim,
            num_importance_samples=self.num_importance_samples,
            chunk_size=self.chunk_size,
            own_mixing=own_mixing,
        )

    def log_prob(self, value: jax.Array, intermediates: list | None = None) -> jax.Array:
        if intermediates:
            eps, key = intermediates
        elif self.rng_key is not None:
            eps, key = None, self.rng_key
        else:
            raise ValueError(
                "SemiImplicitNormal.log_prob is a Monte Carlo estimate and needs a key: build the "
                "distribution with rng_key=... (AutoSIVI.get_posterior(params, rng_key=...))"
            )
        log_q, score = self.importance_score(key, value, eps)
        log_q = log_q + (score * (value - lax.stop_gradient(value))).sum(-1)
        if eps is not None and self.proposal is not None:
            nll = self.proposal_loss(jax.random.fold_in(key, 1), value, eps)
            log_q = log_q + (nll - lax.stop_gradient(nll))
        return log_q

    def proposal_loss(self, rng_key: jax.Array, value: jax.Array, eps: jax.Array) -> jax.Array:
        """Forward-KL loss of the proposal for the draws ``value`` (mixing draws ``eps``).

        The mean of ``-log tau(eps | z)`` over the drawn pair and ``proposal_batch_size`` fresh
        pairs ``eps ~ N(0, I_m)``, ``z ~ q(z | eps)`` per draw (generator under
        ``stop_gradient``: no tangent to the guide's parameters; the context ``z`` is detached
        as the paper's estimator needs).

        Shapes:
            ``value`` is ``batch_shape + (D,)``, ``eps`` ``batch_shape + (m,)``; returns
            ``batch_shape``.
        """
        eps, z = lax.stop_gradient((eps[None], value[None]))
        if self.proposal_batch_size:
            eps_key, noise_key = jax.random.split(rng_key)
            shape = (self.proposal_batch_size, *eps.shape[1:])
            fresh_eps = jax.random.normal(eps_key, shape, eps.dtype)
            loc, scale = generator_apply(_detach(self.generator_params), fresh_eps)
            fresh_z = loc + scale * jax.random.normal(noise_key, loc.shape, loc.dtype)
            eps = jnp.concatenate([eps, fresh_eps])
            z = jnp.concatenate([z, fresh_z])
        return -self.proposal.log_prob(eps, condition=z).mean(0)
