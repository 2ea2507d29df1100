"""Shared pieces of the multimodal VAEs (JAX): networks, likelihoods, input checks, stage 1.

``MultimodalVAE`` holds the decoders ``p(x_j|z)`` (equinox MLPs registered in the model with
NumPyro's ``eqx_module``) and the NumPyro ``model``; subclasses say which latent sites the model
has and how the guide draws them. Stage 1 (``fit_joint``) is NumPyro's ``SVI``, jitted.
Networks are created on the first ``fit_joint`` call (or :meth:`init_networks`) from its key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.module import eqx_module
from numpyro.infer import SVI, TraceMeanField_ELBO
from tqdm.auto import trange

LIKELIHOODS = ("normal", "laplace", "bernoulli")


def mlp(rng_key: jax.Array, in_dim: int, hidden_dims: Sequence[int], out_dim: int) -> eqx.Module:
    """A ReLU multilayer perceptron ``in_dim -> hidden_dims... -> out_dim`` (one example)."""
    layers, keys = [], jax.random.split(rng_key, len(hidden_dims) + 1)
    for key, width in zip(keys, hidden_dims, strict=False):
        layers += [eqx.nn.Linear(in_dim, width, key=key), eqx.nn.Lambda(jax.nn.relu)]
        in_dim = width
    layers.append(eqx.nn.Linear(in_dim, out_dim, key=keys[-1]))
    return eqx.nn.Sequential(layers)


def apply(network, x: jax.Array) -> jax.Array:
    """Apply a per-example network over all leading dimensions of ``x``."""
    flat = x.reshape((-1, x.shape[-1]))
    out = jax.vmap(network)(flat)
    return out.reshape(x.shape[:-1] + out.shape[-1:])


def gaussian_encoder(encoder, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(loc, scale)`` from an MLP with ``2 D`` outputs; ``scale = softplus(.) + 1e-4``."""
    loc, raw_scale = jnp.split(apply(encoder, x), 2, axis=-1)
    return loc, jax.nn.softplus(raw_scale) + 1e-4


def load_params(module, params):
    """``module`` with its inexact arrays replaced by ``params`` (from an SVI ``param`` site)."""
    return eqx.combine(params, eqx.partition(module, eqx.is_inexact_array)[1])


def _per_modality(value, num_modalities: int, name: str) -> tuple:
    if isinstance(value, str | int | float):
        return (value,) * num_modalities
    value = tuple(value)
    if len(value) != num_modalities:
        raise ValueError(f"{name} must be one value or {num_modalities} values; got {len(value)}")
    return value


def random_indices(rng_key: jax.Array, num_rows: int, batch_size: int, num_steps: int):
    """``(num_steps, batch)`` minibatch row indices, drawn with replacement across steps."""
    return jax.random.randint(rng_key, (num_steps, min(batch_size, num_rows)), 0, num_rows)


class MultimodalVAE:
    """Base of ``JNF``, ``JNFShared``, ``PoEVAE`` and ``MoEVAE``: decoders, checks, stage 1.

    Args:
        input_dims: Feature size ``d_j`` of each of the ``M >= 1`` modalities (flattened).
        latent_dim: Size ``D`` of the shared latent ``z`` with prior ``N(0, I)``.
        hidden_dims: Hidden widths of every encoder and decoder network.
        likelihood: ``"normal"``, ``"laplace"`` or ``"bernoulli"`` (logits), one or per modality.
        likelihood_scale: Fixed scale of normal/Laplace decoders, one or per modality.
        beta: Weight of the KL term in the β-ELBO; positive.
    """

    def __init__(
        self,
        input_dims: Sequence[int],
        *,
        latent_dim: int = 8,
        hidden_dims: Sequence[int] = (128, 128),
        likelihood: str | Sequence[str] = "normal",
        likelihood_scale: float | Sequence[float] = 0.1,
        beta: float = 1.0,
    ) -> None:
        input_dims = tuple(int(d) for d in input_dims)
        if len(input_dims) < 1 or min(input_dims) < 1:
            raise ValueError(f"input_dims must list >= 1 positive sizes; got {input_dims}")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1; got {latent_dim}")
        if beta <= 0:
            raise ValueError(f"beta must be positive; got {beta}")
        self.likelihoods = _per_modality(likelihood, len(input_dims), "likelihood")
        for name in self.likelihoods:
            if name not in LIKELIHOODS:
                raise ValueError(f"likelihood must be one of {LIKELIHOODS}; got {name!r}")
        self.likelihood_scales = _per_modality(
            likelihood_scale, len(input_dims), "likelihood_scale"
        )
        if min(self.likelihood_scales) <= 0:
            raise ValueError(f"likelihood_scale must be positive; got {self.likelihood_scales}")
        self.input_dims, self.latent_dim, self.beta = input_dims, int(latent_dim), float(beta)
        self.hidden_dims = tuple(hidden_dims)
        self.decoders = None

    @property
    def num_modalities(self) -> int:
        """``M``, the number of modalities."""
        return len(self.input_dims)

    def init_networks(self, rng_key: jax.Array) -> None:
        """Create every network from ``rng_key`` (called by the first ``fit_joint``)."""
        keys = jax.random.split(rng_key, self.num_modalities)
        self.decoders = tuple(
            mlp(k, self.latent_dim, self.hidden_dims, d)
            for k, d in zip(keys, self.input_dims, strict=True)
        )

    def _require_networks(self) -> None:
        if self.decoders is None:
            raise RuntimeError(
                f"{type(self).__name__} has no networks yet; call fit(rng_key, data) or "
                "init_networks(rng_key) first"
            )

    # ----------------------------------------------------------------------------- input checks
    def _check_observed(self, observed) -> dict[int, jax.Array]:
        """``{j: x_j}`` from a mapping or an ``M``-sequence with ``None`` for missing ones."""
        if isinstance(observed, Mapping):
            items = dict(observed)
        elif isinstance(observed, Sequence):
            if len(observed) != self.num_modalities:
                raise ValueError(
                    f"expected {self.num_modalities} modalities (None for unobserved ones); "
                    f"got {len(observed)}"
                )
            items = {j: x for j, x in enumerate(observed) if x is not None}
        else:
            raise TypeError(
                "observed must be a mapping {modality index: (N, d_j) array} or a sequence of "
                f"{self.num_modalities} arrays/None; got {type(observed).__name__}"
            )
        num_rows, checked = None, {}
        for j, x in items.items():
            if not isinstance(j, int) or not 0 <= j < self.num_modalities:
                raise ValueError(f"modality index must be in 0..{self.num_modalities - 1}; got {j}")
            if (
                not isinstance(x, jax.Array | np.ndarray)
                or x.ndim != 2
                or x.shape[-1] != self.input_dims[j]
            ):
                shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
                raise ValueError(
                    f"modality {j} must be an array of shape (N, {self.input_dims[j]}); got {shape}"
                )
            if num_rows is not None and x.shape[0] != num_rows:
                raise ValueError(
                    f"modality {j} has {x.shape[0]} rows but an earlier one has {num_rows}; "
                    "observed modalities must be paired row by row"
                )
            num_rows = x.shape[0]
            checked[j] = jnp.asarray(x)
        return dict(sorted(checked.items()))

    def _check_complete(self, data) -> list[jax.Array]:
        observed = self._check_observed(data)
        if len(observed) != self.num_modalities:
            missing = sorted(set(range(self.num_modalities)) - set(observed))
            raise ValueError(
                f"training needs all {self.num_modalities} modalities; {missing} missing"
            )
        return list(observed.values())

    # -------------------------------------------------------------------------------- the model
    def likelihood(self, j: int, z: jax.Array, decoders=None) -> dist.Distribution:
        """``p(x_j | z)`` with event shape ``(d_j,)``."""
        out = apply((self.decoders if decoders is None else decoders)[j], z)
        name = self.likelihoods[j]
        if name == "bernoulli":
            return dist.Bernoulli(logits=out).to_event(1)
        family = dist.Normal if name == "normal" else dist.Laplace
        return family(out, jnp.asarray(self.likelihood_scales[j], out.dtype)).to_event(1)

    def decode(self, z: jax.Array) -> tuple[jax.Array, ...]:
        """Means of every ``p(x_j|z)``: ``(..., D)`` to ``M`` arrays ``(..., d_j)``."""
        self._require_networks()
        return tuple(self.likelihood(j, z).mean for j in range(self.num_modalities))

    def _prior(self, like: jax.Array) -> dist.Distribution:
        shape = like.shape[:-1] + (self.latent_dim,)
        return dist.Normal(jnp.zeros(shape, like.dtype), jnp.ones(shape, like.dtype)).to_event(1)

    def latent_sites(self) -> list[tuple[str, float]]:
        """``(site name, weight)`` of each latent site of the model; overridden by subclasses."""
        return [("z", 1.0)]

    def encoder_module(self):
        """The networks the guide trains in stage 1 (a pytree of equinox modules)."""
        raise NotImplementedError

    def set_encoder_module(self, module) -> None:
        """Store the trained stage-1 encoder networks."""
        raise NotImplementedError

    def guide_distribution(self, name: str, xs: Sequence[jax.Array], encoders) -> dist.Distribution:
        """The guide's distribution at latent site ``name``; defined by subclasses."""
        raise NotImplementedError

    def model(self, *xs: jax.Array) -> None:
        """NumPyro model: per latent site, ``z ~ N(0, I)`` then every ``x_j ~ p(x_j|z)``."""
        decoders = eqx_module("decoders", self.decoders)
        with numpyro.plate("data", xs[0].shape[0]):
            for name, weight in self.latent_sites():
                with handlers.scale(scale=weight):
                    with handlers.scale(scale=self.beta):
                        z = numpyro.sample(name, self._prior(xs[0]))
                    for j, x in enumerate(xs):
                        numpyro.sample(f"{name}/x{j}", self.likelihood(j, z, decoders), obs=x)

    def guide(self, *xs: jax.Array) -> None:
        """NumPyro guide: each latent site from :meth:`guide_distribution`, KL weighted by β."""
        encoders = eqx_module("encoders", self.encoder_module())
        with numpyro.plate("data", xs[0].shape[0]):
            for name, weight in self.latent_sites():
                with handlers.scale(scale=weight * self.beta):
                    numpyro.sample(name, self.guide_distribution(name, xs, encoders))

    # ------------------------------------------------------------------------------ stage 1 (SVI)
    def fit_joint(
        self,
        rng_key: jax.Array,
        data: Sequence[jax.Array],
        *,
        num_steps: int = 1000,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        progress_bar: bool = False,
    ) -> jax.Array:
        """Stage 1: maximize the β-ELBO of ``model``/``guide`` with NumPyro's ``SVI`` and Adam.

        Each step is jitted; losses are checked for finiteness after every chunk of steps.

        Returns:
            Per-step losses (negative β-ELBO of the minibatch), shape ``(num_steps,)``.

        Raises:
            ValueError: On missing modalities or wrong shapes.
            FloatingPointError: If a loss is non-finite (names the step).
        """
        xs = self._check_complete(data)
        init_key, svi_key, batch_key = jax.random.split(rng_key, 3)
        if self.decoders is None:
            self.init_networks(init_key)
        svi = SVI(self.model, self.guide, numpyro.optim.Adam(learning_rate), TraceMeanField_ELBO())
        indices = random_indices(batch_key, xs[0].shape[0], batch_size, num_steps)
        state = svi.init(svi_key, *[x[indices[0]] for x in xs])

        @jax.jit
        def chunk(state, index_chunk):
            def body(state, index):
                return svi.update(state, *[x[index] for x in xs])

            return jax.lax.scan(body, state, index_chunk)

        losses = []
        chunk_size = max(1, min(100, num_steps))
        bar = trange(num_steps, disable=not progress_bar, desc="stage 1 (joint VAE)")
        for start in range(0, num_steps, chunk_size):
            state, chunk_losses = chunk(state, indices[start : start + chunk_size])
            bad = np.flatnonzero(~np.isfinite(np.asarray(chunk_losses)))
            if bad.size:
                raise FloatingPointError(
                    f"stage 1 step {start + bad[0]}: the β-ELBO loss is {chunk_losses[bad[0]]}"
                )
            losses.append(chunk_losses)
            bar.update(len(chunk_losses))
        bar.close()
        params = svi.get_params(state)
        self.decoders = load_params(self.decoders, params["decoders$params"])
        self.set_encoder_module(load_params(self.encoder_module(), params["encoders$params"]))
        return jnp.concatenate(losses)

    def fit(self, rng_key: jax.Array, data: Sequence[jax.Array], **kwargs) -> dict[str, jax.Array]:
        """Run every training stage (here stage 1 only); returns ``{stage: losses}``."""
        return {"joint": self.fit_joint(rng_key, data, **kwargs)}

    # ---------------------------------------------------------------------------------- inference
    def sample_posterior(self, rng_key: jax.Array, observed, *, num_samples: int = 1, **kwargs):
        """``z ~ p(z | X_S)`` for the observed subset; ``(num_samples, N, D)``. Subclasses."""
        raise NotImplementedError

    def generate(
        self, rng_key: jax.Array, observed=None, *, num_samples: int = 1, **kwargs
    ) -> tuple[jax.Array, ...]:
        """Decode ``z ~ p(z|X_S)`` (or the prior when nothing is observed) into every modality.

        Shapes:
            Observed rows ``N``: ``M`` arrays ``(num_samples, N, d_j)`` of decoder means. With
            ``observed`` ``None`` or empty: ``(num_samples, d_j)`` from the prior.

        Args:
            rng_key: PRNG key.
            observed: ``{j: (N, d_j)}`` or an ``M``-sequence with ``None`` for missing ones.
            num_samples: Latent draws per row.
            **kwargs: Passed to :meth:`sample_posterior` (e.g. NUTS settings).
        """
        self._require_networks()
        if observed is None or len(self._check_observed(observed)) == 0:
            dtype = jax.tree_util.tree_leaves(eqx.filter(self.decoders, eqx.is_inexact_array))[
                0
            ].dtype
            z = jax.random.normal(rng_key, (num_samples, self.latent_dim), dtype)
        else:
            z = self.sample_posterior(rng_key, observed, num_samples=num_samples, **kwargs)
        return self.decode(z)


def optax_fit(
    rng_key: jax.Array,
    loss_fn,
    params,
    *,
    num_steps: int,
    learning_rate: float,
    progress_bar: bool,
    desc: str,
):
    """Minimize ``loss_fn(params, key)`` with optax Adam; jitted chunks of ``lax.scan`` steps.

    Returns:
        ``(params, losses)`` with ``losses`` of shape ``(num_steps,)``.

    Raises:
        FloatingPointError: If a loss is non-finite (names the step and ``desc``).
    """
    import optax

    optimizer = optax.adam(learning_rate)

    @jax.jit
    def chunk(carry, keys):
        def body(carry, key):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, key)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return jax.lax.scan(body, carry, keys)

    carry, losses = (params, optimizer.init(params)), []
    keys = jax.random.split(rng_key, num_steps)
    chunk_size = max(1, min(100, num_steps))
    bar = trange(num_steps, disable=not progress_bar, desc=desc)
    for start in range(0, num_steps, chunk_size):
        carry, chunk_losses = chunk(carry, keys[start : start + chunk_size])
        bad = np.flatnonzero(~np.isfinite(np.asarray(chunk_losses)))
        if bad.size:
            raise FloatingPointError(
                f"{desc} step {start + bad[0]}: loss is {chunk_losses[bad[0]]}"
            )
        losses.append(chunk_losses)
        bar.update(len(chunk_losses))
    bar.close()
    return carry[0], jnp.concatenate(losses)
