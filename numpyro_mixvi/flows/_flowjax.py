"""Helpers shared by the flowjax-backed factories: hidden widths and the base distribution."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flowjax.distributions import Normal


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
