"""Helpers shared by the flowjax-backed factories: hidden widths and the base distribution."""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from flowjax.bijections import Affine
from flowjax.distributions import Normal, Transformed
from paramax import Parameterize


def mlp_shape(hidden_dims: Sequence[int]) -> dict[str, int]:
    """flowjax MLPs have one width: map ``hidden_dims`` to ``nn_width``/``nn_depth`` or raise."""
    hidden = tuple(hidden_dims)
    if len(set(hidden)) != 1:
        raise ValueError(
            f"hidden_dims must repeat one width in the JAX backend (flowjax MLPs have a single "
            f"nn_width); got {hidden}. Use e.g. hidden_dims=({max(hidden)},) * {len(hidden)}."
        )
    return {"nn_width": hidden[0], "nn_depth": len(hidden)}


def standard_normal(input_dim: int) -> Normal:
    """The flows' base ``N(0, I_D)`` in the default float dtype (follows ``jax_enable_x64``)."""
    return Normal(jnp.zeros(input_dim, dtype=jnp.result_type(float)))


def typed_key(rng_key: jax.Array) -> jax.Array:
    """A typed PRNG key (flowjax rejects legacy ``uint32`` keys; NumPyro hands those out)."""
    if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        return rng_key
    return jax.random.wrap_key_data(rng_key)


def bounded_affine(max_log_scale: float | None) -> Affine:
    """flowjax's ``Affine`` transformer, its scale ``exp(a / (1 + |a| / bound))`` if bounded.

    At ``a = 0`` the scale is 1 (the identity, which flowjax's zero conditioner output gives);
    ``|log-scale| < max_log_scale`` everywhere (zuko's soft clamp, so both backends bound alike).

    Raises:
        ValueError: If ``max_log_scale`` is not positive.
    """
    if max_log_scale is None:
        return Affine()
    if not max_log_scale > 0:
        raise ValueError(f"max_log_scale must be > 0 or None; got {max_log_scale}")
    raw = jnp.zeros((), dtype=jnp.result_type(float))
    return eqx.tree_at(lambda affine: affine.scale, Affine(),
                       Parameterize(_soft_clamped_exp, raw, float(max_log_scale)))


def _soft_clamped_exp(raw: jax.Array, bound: float) -> jax.Array:
    return jnp.exp(raw / (1 + jnp.abs(raw) / bound))


def zero_last_layers(flow: Transformed) -> Transformed:
    """Zero the output layer of every conditioner MLP: the flow starts as the identity.

    flowjax builds each layer's transformer from ``initial + conditioner output``, so a zero
    output layer gives the initial ``Affine(0, 1)`` (Glow-style init, as the Pyro twin zeroes
    zuko's hyper-networks). A masked layer's mask (boolean) is kept; only its weight and bias
    are zeroed, so every weight still gets a gradient. Shared by AutoFlowMixture's experts
    and AutoSIVI's flow proposal.
    """
    is_mlp = lambda node: isinstance(node, eqx.nn.MLP)  # noqa: E731
    last = lambda tree: [m.layers[-1] for m in jax.tree.leaves(tree, is_leaf=is_mlp)  # noqa: E731
                         if is_mlp(m)]
    zero = lambda a: jnp.zeros_like(a) if eqx.is_inexact_array(a) else a  # noqa: E731
    return eqx.tree_at(last, flow, replace=[jax.tree.map(zero, layer) for layer in last(flow)])
