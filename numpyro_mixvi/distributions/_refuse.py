"""Refuse gradients through ancestral mixture draws (a discrete index stock ELBOs would miss)."""

from __future__ import annotations

from functools import partial

import jax


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def refuse_gradient(x: jax.Array, message: str) -> jax.Array:
    """Identity whose reverse-mode derivative raises ``NotImplementedError(message)``.

    Mixture guides wrap their ancestral ``sample`` with it, so ``Trace_ELBO`` & co. fail loudly
    (pointing to ``RBMixture_ELBO``) instead of silently dropping the component index's
    contribution to the gradient.
    """
    return x


def _fwd(x: jax.Array, message: str) -> tuple[jax.Array, None]:
    return x, None


def _bwd(message: str, _: None, cotangent: jax.Array):  # noqa: ANN202
    raise NotImplementedError(message)


refuse_gradient.defvjp(_fwd, _bwd)
