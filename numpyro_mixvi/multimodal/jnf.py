r"""Joint normalizing flows for multimodal VAEs: ``JNF`` and ``JNFShared`` (JAX + NumPyro).

Stage 1 trains a joint VAE — Gaussian joint encoder ``q(z|X)``, decoders ``p(x_j|z)`` — by the
β-ELBO through NumPyro's ``SVI`` (networks registered with ``eqx_module``), jitted. Stage 2
freezes it and fits one conditional masked autoregressive flow ``q_j(z|x_j)`` per modality
(``numpyro_mixvi.flows.MAF`` over flowjax, condition = an embedding of ``x_j``) by maximizing
``log q_j(z|x_j)`` at ``z ~ q(z|X)``. For an observed subset ``S`` the posterior is

.. math:: p(z|X_S) \propto \prod_{j\in S} q_j(z|x_j) \,/\, p(z)^{|S|-1},

sampled with NumPyro's NUTS, one adapted chain per observation, vmapped. ``JNFShared`` first
trains projections ``g_j(x_j)`` contrastively (InfoNCE) and conditions ``q_j`` on them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import optax
import paramax

from ..flows import MAF
from ._base import MultimodalVAE, apply, gaussian_encoder, mlp, optax_fit, random_indices
from .poe import product_of_experts_log_prob, sample_product_of_experts

__all__ = ["JNF", "JNFShared"]


def _is_non_trainable(leaf) -> bool:
    return isinstance(leaf, paramax.NonTrainable)


class JNF(MultimodalVAE):
    r"""Joint-normalizing-flow multimodal VAE with product-of-experts subset posteriors.

    .. math:: p(z|X_S) \propto \prod_{j\in S} q_j(z|x_j) / p(z)^{|S|-1}

    Shapes:
        Data: ``M`` arrays ``(N, d_j)``. ``log_prob(z, observed)`` maps ``(..., N, D)`` to
        ``(..., N)``; ``sample_posterior`` returns ``(num_samples, N, D)``.

    Args:
        input_dims: ``d_j`` of each modality.
        latent_dim: ``D``.
        hidden_dims: Widths of the joint encoder, decoders and context networks.
        likelihood: Decoder family, one or per modality (see ``MultimodalVAE``).
        likelihood_scale: Decoder scale for normal/Laplace.
        beta: KL weight of stage 1.
        num_transforms: MADE blocks per unimodal flow; at least 1.
        flow_hidden_dims: Hidden widths inside each MADE block (one repeated width: flowjax
            MLPs have a single width).
        context_dim: Size of the learned embedding of ``x_j`` that conditions the flow.

    Example:
        >>> jnf = JNF([64, 64], latent_dim=4)
        >>> stages = jnf.fit(jax.random.key(0), [x0, x1], num_steps=2000)
        >>> z = jnf.sample_posterior(jax.random.key(1), {0: x0_test}, num_samples=10)
        >>> x1_given_x0 = jnf.generate(jax.random.key(2), {0: x0_test})[1]

    Cost:
        Subset posteriors run ``num_warmup + num_samples`` NUTS iterations per row, vectorized.

    Raises:
        ValueError: On bad sizes, a wrong number of modalities or wrong shapes (names the modality).

    References:
        Bridging the inference gap in Multimodal Variational Autoencoders (Senellart and
        Allassonnière, 2025). https://arxiv.org/abs/2502.03952
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
        num_transforms: int = 2,
        flow_hidden_dims: Sequence[int] = (64, 64),
        context_dim: int = 32,
    ) -> None:
        super().__init__(
            input_dims,
            latent_dim=latent_dim,
            hidden_dims=hidden_dims,
            likelihood=likelihood,
            likelihood_scale=likelihood_scale,
            beta=beta,
        )
        if num_transforms < 1:
            raise ValueError(f"num_transforms must be >= 1; got {num_transforms}")
        if context_dim < 1:
            raise ValueError(f"context_dim must be >= 1; got {context_dim}")
        self.num_transforms, self.context_dim = int(num_transforms), int(context_dim)
        self.flow_hidden_dims = tuple(flow_hidden_dims)
        self.joint_encoder = self.context_nets = self.flows = None

    def init_networks(self, rng_key: jax.Array) -> None:
        """Create the decoders, joint encoder, context networks and flows from ``rng_key``."""
        keys = jax.random.split(rng_key, 4)
        super().init_networks(keys[0])
        self.joint_encoder = mlp(
            keys[1], sum(self.input_dims), self.hidden_dims, 2 * self.latent_dim
        )
        context_keys = jax.random.split(keys[2], self.num_modalities)
        self.context_nets = tuple(
            mlp(k, d, self.hidden_dims, self.context_dim)
            for k, d in zip(context_keys, self._context_input_dims(), strict=True)
        )
        self.flows = tuple(
            MAF(
                k,
                self.latent_dim,
                context_dim=self.context_dim,
                num_transforms=self.num_transforms,
                hidden_dims=self.flow_hidden_dims,
            )
            for k in jax.random.split(keys[3], self.num_modalities)
        )

    def _context_input_dims(self) -> tuple[int, ...]:
        return self.input_dims

    def _context(self, context_nets, j: int, x: jax.Array) -> jax.Array:
        return apply(context_nets[j], x)

    # ------------------------------------------------------------------------------------ stage 1
    def encoder_module(self):
        """The joint encoder (the only network the stage-1 guide trains)."""
        return self.joint_encoder

    def set_encoder_module(self, module) -> None:
        """Store the trained joint encoder."""
        self.joint_encoder = module

    def joint_posterior(self, xs: Sequence[jax.Array], encoder=None) -> dist.Distribution:
        """``q(z|X)``: diagonal Gaussian, batch ``(N,)``, event ``(D,)``."""
        encoder = self.joint_encoder if encoder is None else encoder
        loc, scale = gaussian_encoder(encoder, jnp.concatenate(list(xs), axis=-1))
        return dist.Normal(loc, scale).to_event(1)

    def guide_distribution(self, name: str, xs, encoders) -> dist.Distribution:
        """Stage-1 guide at site ``"z"``: the joint encoder."""
        return self.joint_posterior(xs, encoders)

    # ------------------------------------------------------------------------------------ stage 2
    def unimodal_log_prob(self, j: int, z: jax.Array, x: jax.Array, networks=None) -> jax.Array:
        """``log q_j(z|x_j)``: ``z (..., N, D)``, ``x (N, d_j)`` to ``(..., N)``."""
        context_nets, flows = (self.context_nets, self.flows) if networks is None else networks
        flow = paramax.unwrap(flows[j])
        return flow.log_prob(z, self._context(context_nets, j, x))

    def sample_unimodal(self, rng_key: jax.Array, j: int, x: jax.Array, num_samples: int = 1):
        """``z ~ q_j(z|x_j)``: ``(num_samples, N, D)``."""
        self._require_networks()
        x = self._check_observed({j: x})[j]
        flow = paramax.unwrap(self.flows[j])
        return flow.sample(
            rng_key, (num_samples,), condition=self._context(self.context_nets, j, x)
        )

    def _stage2_loss(self, xs, batch_size: int, static):
        def loss_fn(params, key):
            networks = paramax.unwrap(eqx.combine(params, static))
            index_key, noise_key = jax.random.split(key)
            index = random_indices(index_key, xs[0].shape[0], batch_size, 1)[0]
            batch = [x[index] for x in xs]
            posterior = self.joint_posterior(batch)
            z = jax.lax.stop_gradient(posterior.sample(noise_key))
            return -sum(
                self.unimodal_log_prob(j, z, x, networks).mean() for j, x in enumerate(batch)
            )

        return loss_fn

    def fit_unimodal(
        self,
        rng_key: jax.Array,
        data: Sequence[jax.Array],
        *,
        num_steps: int = 1000,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        progress_bar: bool = False,
    ) -> jax.Array:
        """Stage 2: joint VAE frozen; maximize ``Σ_j log q_j(z|x_j)`` at ``z ~ q(z|X)``.

        Returns:
            Per-step losses ``-Σ_j mean log q_j``, shape ``(num_steps,)``.

        Raises:
            FloatingPointError: If a loss is non-finite (names the step).
        """
        xs = self._check_complete(data)
        self._require_networks()
        params, static = eqx.partition(
            (self.context_nets, self.flows), eqx.is_inexact_array, is_leaf=_is_non_trainable
        )
        params, losses = optax_fit(
            rng_key,
            self._stage2_loss(xs, batch_size, static),
            params,
            num_steps=num_steps,
            learning_rate=learning_rate,
            progress_bar=progress_bar,
            desc="stage 2 (unimodal flows)",
        )
        self.context_nets, self.flows = eqx.combine(params, static)
        return losses

    def fit(self, rng_key: jax.Array, data: Sequence[jax.Array], **kwargs) -> dict[str, jax.Array]:
        """Stage 1 (:meth:`fit_joint`) then stage 2 (:meth:`fit_unimodal`), same settings."""
        joint_key, unimodal_key = jax.random.split(rng_key)
        return {
            "joint": self.fit_joint(joint_key, data, **kwargs),
            "unimodal": self.fit_unimodal(unimodal_key, data, **kwargs),
        }

    # ---------------------------------------------------------------------------------- inference
    def log_prob(self, z: jax.Array, observed) -> jax.Array:
        """Unnormalized ``log p(z|X_S) = Σ_{j∈S} log q_j(z|x_j) − (|S|−1) log p(z)``.

        Shapes:
            ``z``: ``(..., N, D)``; result ``(..., N)``.

        Raises:
            ValueError: If nothing is observed, or on wrong shapes.
        """
        self._require_networks()
        observed = self._check_observed(observed)
        if not observed:
            raise ValueError("log_prob needs at least one observed modality; got none")
        experts = [self.unimodal_log_prob(j, z, x) for j, x in observed.items()]
        return product_of_experts_log_prob(experts, self._prior(z).log_prob(z))

    def sample_posterior(
        self,
        rng_key: jax.Array,
        observed,
        *,
        num_samples: int = 1,
        num_warmup: int = 300,
        chunk_size: int | None = None,
        use_joint_encoder: bool = True,
        progress_bar: bool = False,
    ) -> jax.Array:
        """``z ~ p(z|X_S)``: joint encoder (all observed), flow (one), NUTS on the PoE (else).

        Shapes:
            Returns ``(num_samples, N, D)``.

        Args:
            rng_key: PRNG key.
            observed: ``{j: (N, d_j)}`` or an ``M``-sequence with ``None`` for missing ones.
            num_samples: Draws per row.
            num_warmup: NUTS adaptation steps (per row: every row adapts its own chain).
            chunk_size: Rows per vectorized NUTS call (memory bound); default all.
            use_joint_encoder: With every modality observed, draw from ``q(z|X)`` (the paper);
                ``False`` samples the PoE of all flows instead.
            progress_bar: Unused by the vectorized sampler (kept for parity with Pyro).
        """
        self._require_networks()
        observed = self._check_observed(observed)
        if not observed:
            raise ValueError("sample_posterior needs at least one observed modality; got none")
        if len(observed) == self.num_modalities and use_joint_encoder:
            return self.joint_posterior(list(observed.values())).sample(rng_key, (num_samples,))
        if len(observed) == 1:
            ((j, x),) = observed.items()
            return self.sample_unimodal(rng_key, j, x, num_samples)
        rows = next(iter(observed.values())).shape[0]
        chunk_size = rows if chunk_size is None else chunk_size
        draws = []
        for start in range(0, rows, chunk_size):
            part = {j: x[start : start + chunk_size] for j, x in observed.items()}
            rng_key, init_key, nuts_key = jax.random.split(rng_key, 3)
            draws.append(
                sample_product_of_experts(
                    nuts_key,
                    lambda z, row: self.log_prob(z[None], {j: x[None] for j, x in row.items()})[0],
                    self._initial_points(init_key, part),
                    part,
                    num_samples=num_samples,
                    num_warmup=num_warmup,
                )
            )
        return jnp.concatenate(draws, axis=1)

    def _initial_points(self, rng_key: jax.Array, observed) -> jax.Array:
        """Start NUTS from one draw of a randomly chosen observed unimodal flow per row."""
        keys = jax.random.split(rng_key, len(observed) + 1)
        draws = jnp.stack(
            [
                self.sample_unimodal(k, j, x)[0]
                for k, (j, x) in zip(keys, observed.items(), strict=False)
            ]
        )
        rows = draws.shape[1]
        pick = jax.random.randint(keys[-1], (rows,), 0, len(observed))
        return draws[pick, jnp.arange(rows)]


class JNFShared(JNF):
    r"""``JNF`` whose unimodal flows see only a shared projection ``g_j(x_j)`` of each modality.

    Stage 0 (:meth:`fit_projections`) trains ``g_j`` (an MLP to ``shared_dim``, L2-normalized) with
    the symmetric InfoNCE loss over every pair of modalities at ``temperature``, then freezes
    them. Stages 1 and 2 are those of ``JNF``; stage 2 conditions ``q_j(z|g_j(x_j))``.

    Args:
        input_dims: ``d_j`` of each modality; at least two modalities.
        shared_dim: Size of the shared projections.
        temperature: InfoNCE temperature; positive.
        **kwargs: As for ``JNF`` (``latent_dim``, ``hidden_dims``, ``num_transforms``, ...).

    Example:
        >>> model = JNFShared([64, 64], latent_dim=4, shared_dim=16)
        >>> stages = model.fit(jax.random.key(0), [x0, x1], num_steps=2000)

    References:
        Senellart and Allassonnière (2025), JNF-Shared with contrastive projections (GMC-style).
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
        num_transforms: int = 2,
        flow_hidden_dims: Sequence[int] = (64, 64),
        context_dim: int = 32,
        shared_dim: int = 16,
        temperature: float = 0.1,
    ) -> None:
        if len(tuple(input_dims)) < 2:
            raise ValueError("JNFShared needs at least two modalities to learn shared projections")
        if shared_dim < 1:
            raise ValueError(f"shared_dim must be >= 1; got {shared_dim}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive; got {temperature}")
        self.shared_dim, self.temperature = int(shared_dim), float(temperature)
        super().__init__(
            input_dims,
            latent_dim=latent_dim,
            hidden_dims=hidden_dims,
            likelihood=likelihood,
            likelihood_scale=likelihood_scale,
            beta=beta,
            num_transforms=num_transforms,
            flow_hidden_dims=flow_hidden_dims,
            context_dim=context_dim,
        )
        self.projectors = None

    def init_networks(self, rng_key: jax.Array) -> None:
        """Create every network, the projections ``g_j`` included."""
        key, projector_key = jax.random.split(rng_key)
        super().init_networks(key)
        self.projectors = tuple(
            mlp(k, d, self.hidden_dims, self.shared_dim)
            for k, d in zip(
                jax.random.split(projector_key, self.num_modalities), self.input_dims, strict=True
            )
        )

    def _context_input_dims(self) -> tuple[int, ...]:
        return (self.shared_dim,) * len(self.input_dims)

    def project(self, j: int, x: jax.Array, projectors=None) -> jax.Array:
        """``g_j(x_j)``, L2-normalized: ``(N, d_j)`` to ``(N, shared_dim)``."""
        out = apply((self.projectors if projectors is None else projectors)[j], x)
        return out / jnp.linalg.norm(out, axis=-1, keepdims=True).clip(1e-12)

    def _context(self, context_nets, j: int, x: jax.Array) -> jax.Array:
        return apply(context_nets[j], jax.lax.stop_gradient(self.project(j, x)))

    def contrastive_loss(self, xs: Sequence[jax.Array], projectors=None) -> jax.Array:
        """Symmetric InfoNCE summed over modality pairs; positives are the rows' own pairs."""
        embeddings = [self.project(j, x, projectors) for j, x in enumerate(xs)]
        target = jnp.arange(xs[0].shape[0])
        loss = jnp.zeros((), xs[0].dtype)
        for a, b in itertools.combinations(embeddings, 2):
            logits = a @ b.T / self.temperature
            loss = loss + optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
            loss = loss + optax.softmax_cross_entropy_with_integer_labels(logits.T, target).mean()
        return loss

    def fit_projections(
        self,
        rng_key: jax.Array,
        data: Sequence[jax.Array],
        *,
        num_steps: int = 1000,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        progress_bar: bool = False,
    ) -> jax.Array:
        """Stage 0: train the projections ``g_j`` contrastively (they stay fixed afterwards).

        Returns:
            Per-step InfoNCE losses, shape ``(num_steps,)``.
        """
        xs = self._check_complete(data)
        init_key, rng_key = jax.random.split(rng_key)
        if self.decoders is None:
            self.init_networks(init_key)
        params, static = eqx.partition(self.projectors, eqx.is_inexact_array)

        def loss_fn(params, key):
            index = jax.random.permutation(key, xs[0].shape[0])[:batch_size]
            return self.contrastive_loss([x[index] for x in xs], eqx.combine(params, static))

        params, losses = optax_fit(
            rng_key,
            loss_fn,
            params,
            num_steps=num_steps,
            learning_rate=learning_rate,
            progress_bar=progress_bar,
            desc="stage 0 (contrastive)",
        )
        self.projectors = eqx.combine(params, static)
        return losses

    def fit(self, rng_key: jax.Array, data: Sequence[jax.Array], **kwargs) -> dict[str, jax.Array]:
        """Stage 0 (projections), 1 (joint VAE) and 2 (flows on ``g_j(x_j)``), same settings."""
        projection_key, rng_key = jax.random.split(rng_key)
        return {
            "projections": self.fit_projections(projection_key, data, **kwargs),
            **super().fit(rng_key, data, **kwargs),
        }
