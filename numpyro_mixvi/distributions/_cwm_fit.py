"""Maximum-likelihood fitting of a ClassifierWeightedMixture (the loop behind ``fit``)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax, random
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from tqdm.auto import tqdm

from numpyro_mixvi.distributions.cwm import ClassifierWeightedMixture
from numpyro_mixvi.distributions.flow_mixture import partition_trainable

_POSITIVE = constraints.softplus_positive
_CHOLESKY = constraints.softplus_lower_cholesky
_CHUNK = 50  # steps per jitted scan between finiteness checks and progress updates


def _to_unconstrained(cwm: ClassifierWeightedMixture) -> tuple[dict, object]:
    """Unconstrained trainable arrays, and the flows' non-trainable part (None without flows)."""
    flows, static_flows = (None, None) if cwm.flows is None else partition_trainable(cwm.flows)
    params = {"locs": cwm.locs, "logits": cwm.logits, "flows": flows,
              "classifier_params": [tuple(layer) for layer in cwm.classifier_params]}
    if cwm.scale is not None:
        params["scale"] = biject_to(_POSITIVE).inv(cwm.scale)
    else:
        params["scale_tril"] = biject_to(_CHOLESKY).inv(cwm.scale_tril)
    return params, static_flows


def _from_unconstrained(params: dict, static_flows: object) -> ClassifierWeightedMixture:
    if "scale" in params:
        scales = {"scale": biject_to(_POSITIVE)(params["scale"])}
    else:
        scales = {"scale_tril": biject_to(_CHOLESKY)(params["scale_tril"])}
    flows = None if static_flows is None else eqx.combine(params["flows"], static_flows)
    return ClassifierWeightedMixture(
        params["locs"], logits=params["logits"],
        classifier_params=params["classifier_params"], flows=flows, **scales,
    )


def fit_cwm(
    rng_key: jax.Array,
    cwm: ClassifierWeightedMixture,
    samples: jax.Array,
    *,
    num_steps: int,
    batch_size: int,
    lr: float,
    progress_bar: bool,
) -> tuple[ClassifierWeightedMixture, jax.Array]:
    """Adam on the mean negative log-likelihood of random minibatches (with replacement).

    Scales are optimized through softplus (diagonal) or the softplus-Cholesky bijection, so
    they stay positive; flow components (if any) train their inexact arrays outside
    ``paramax.NonTrainable``. Steps run in jitted chunks of 50; after each chunk the losses are
    checked on the host and the first non-finite step is reported.
    """
    num_samples = samples.shape[0]
    batch = min(batch_size, num_samples)
    optimizer = optax.adam(lr)
    params, static_flows = _to_unconstrained(cwm)

    def loss_fn(params, index):  # noqa: ANN001, ANN202
        return -_from_unconstrained(params, static_flows).log_prob(samples[index]).mean()

    def step(carry, key):  # noqa: ANN001, ANN202
        params, opt_state = carry
        index = random.randint(key, (batch,), 0, num_samples)
        loss, grads = jax.value_and_grad(loss_fn)(params, index)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def run_chunk(carry, keys):  # noqa: ANN001, ANN202
        return lax.scan(step, carry, keys)

    carry = (params, optimizer.init(params))
    losses = []
    bar = tqdm(total=num_steps, disable=not progress_bar, desc="CWM fit")
    keys = random.split(rng_key, num_steps)
    for start in range(0, num_steps, _CHUNK):
        carry, chunk = run_chunk(carry, keys[start : start + _CHUNK])
        chunk = np.asarray(chunk)
        if not np.isfinite(chunk).all():
            bad = start + int(np.argmin(np.isfinite(chunk)))
            raise FloatingPointError(
                f"step {bad}: the CWM negative log-likelihood is {chunk[bad - start]}; "
                "lower lr or start from ClassifierWeightedMixture.from_samples"
            )
        losses.append(chunk)
        bar.update(len(chunk))
        bar.set_postfix(nll=f"{chunk[-1]:.4f}")
    bar.close()
    return _from_unconstrained(carry[0], static_flows), jnp.asarray(np.concatenate(losses))
