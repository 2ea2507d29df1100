r"""Aggregation baselines for ``JNF``, in the same code: ``PoEVAE`` (MVAE) and ``MoEVAE`` (MMVAE).

Both have one diagonal Gaussian encoder ``q_j(z|x_j) = N(μ_j(x_j), σ_j(x_j)²)`` per modality and
share ``MultimodalVAE``'s decoders, likelihoods and stage-1 ``SVI`` loop.

* ``PoEVAE``: ``q(z|X_S) ∝ p(z) Π_{j∈S} q_j(z|x_j)`` in closed form (the prior is an expert).
  Trained on the sum of β-ELBOs of the full set and of every single modality, each
  reconstructing all modalities (MVAE's sub-sampled objective).
* ``MoEVAE``: ``q(z|X_S) = |S|^{-1} Σ_{j∈S} q_j(z|x_j)``. Trained on the stratified β-ELBO
  ``M^{-1} Σ_j E_{z~q_j}[log p(X|z) + β(log p(z) − log q(z|X))]`` with the mixture density in
  ``log q`` (MMVAE with the standard ELBO).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from ._base import MultimodalVAE, gaussian_encoder, mlp
from .poe import gaussian_product_of_experts

__all__ = ["MoEVAE", "PoEVAE"]


class _UnimodalEncoders(MultimodalVAE):
    """``MultimodalVAE`` with one Gaussian encoder per modality (shared by both baselines)."""

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
        super().__init__(
            input_dims,
            latent_dim=latent_dim,
            hidden_dims=hidden_dims,
            likelihood=likelihood,
            likelihood_scale=likelihood_scale,
            beta=beta,
        )
        self.encoders = None

    def init_networks(self, rng_key: jax.Array) -> None:
        """Create decoders and unimodal encoders from ``rng_key``."""
        decoder_key, encoder_key = jax.random.split(rng_key)
        super().init_networks(decoder_key)
        keys = jax.random.split(encoder_key, self.num_modalities)
        self.encoders = tuple(
            mlp(k, d, self.hidden_dims, 2 * self.latent_dim)
            for k, d in zip(keys, self.input_dims, strict=True)
        )

    def encoder_module(self):
        """The unimodal encoders."""
        return self.encoders

    def set_encoder_module(self, module) -> None:
        """Store the trained unimodal encoders."""
        self.encoders = module

    def _experts(self, observed: dict, encoders=None):
        encoders = self.encoders if encoders is None else encoders
        params = [gaussian_encoder(encoders[j], x) for j, x in observed.items()]
        return [loc for loc, _ in params], [scale for _, scale in params]

    def subset_posterior(self, observed, encoders=None) -> dist.Distribution:
        """``q(z|X_S)``: batch ``(N,)``, event ``(D,)``. Defined by each baseline."""
        raise NotImplementedError

    def sample_posterior(self, rng_key: jax.Array, observed, *, num_samples: int = 1) -> jax.Array:
        """``z ~ q(z|X_S)`` for the observed subset; ``(num_samples, N, D)``."""
        self._require_networks()
        return self.subset_posterior(observed).sample(rng_key, (num_samples,))


class PoEVAE(_UnimodalEncoders):
    r"""Product-of-Gaussian-experts multimodal VAE (MVAE): ``q(z|X_S) ∝ p(z) Π_{j∈S} q_j(z|x_j)``.

    Shapes:
        Data: ``M`` arrays ``(N, d_j)``; ``sample_posterior`` returns ``(num_samples, N, D)``.

    Args:
        input_dims: ``d_j`` of each modality.
        latent_dim: ``D``.
        hidden_dims: Widths of encoders and decoders.
        likelihood: Decoder family, one or per modality.
        likelihood_scale: Decoder scale for normal/Laplace.
        beta: KL weight.

    Example:
        >>> vae = PoEVAE([64, 64], latent_dim=4)
        >>> vae.fit(jax.random.key(0), [x0, x1], num_steps=2000)
        >>> x1_given_x0 = vae.generate(jax.random.key(1), {0: x0_test})[1]

    References:
        Multimodal Generative Models for Scalable Weakly-Supervised Learning (Wu and Goodman,
        2018). https://arxiv.org/abs/1802.05335
    """

    def latent_sites(self) -> list[tuple[str, float]]:
        """The full set ``z_all`` and every single modality ``z_j``, weight 1 each."""
        singles = [(f"z_{j}", 1.0) for j in range(self.num_modalities)]
        return [("z_all", 1.0)] + (singles if self.num_modalities > 1 else [])

    def subset_posterior(self, observed, encoders=None) -> dist.Distribution:
        """Closed-form product of the prior and the observed Gaussian experts."""
        observed = self._check_observed(observed)
        if not observed:
            raise ValueError("subset_posterior needs at least one observed modality; got none")
        locs, scales = self._experts(observed, encoders)
        loc, scale = gaussian_product_of_experts(locs, scales, prior_power=1.0)
        return dist.Normal(loc, scale).to_event(1)

    def guide_distribution(self, name: str, xs, encoders) -> dist.Distribution:
        """Site ``z_all``: all experts; site ``z_j``: prior times expert ``j``."""
        if name == "z_all":
            return self.subset_posterior(list(xs), encoders)
        j = int(name.split("_")[1])
        return self.subset_posterior({j: xs[j]}, encoders)


class _StratifiedMixture(dist.Distribution):
    """Draws from expert ``component`` but scores with the uniform mixture of all experts."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    reparametrized_params = ["locs", "scales"]

    def __init__(self, locs: jax.Array, scales: jax.Array, component: int) -> None:
        self.locs, self.scales, self.component = locs, scales, component
        super().__init__(batch_shape=locs.shape[:-2], event_shape=locs.shape[-1:])

    def sample(self, key, sample_shape=()):
        loc, scale = self.locs[..., self.component, :], self.scales[..., self.component, :]
        return loc + scale * jax.random.normal(key, tuple(sample_shape) + loc.shape, loc.dtype)

    def log_prob(self, value):
        experts = dist.Normal(self.locs, self.scales).to_event(1)
        log_probs = experts.log_prob(value[..., None, :])
        return jax.nn.logsumexp(log_probs, -1) - math.log(self.locs.shape[-2])


class MoEVAE(_UnimodalEncoders):
    r"""Mixture-of-experts multimodal VAE (MMVAE): ``q(z|X_S) = |S|^{-1} Σ_{j∈S} q_j(z|x_j)``.

    Shapes:
        Data: ``M`` arrays ``(N, d_j)``; ``sample_posterior`` returns ``(num_samples, N, D)``.

    Args:
        input_dims: ``d_j`` of each modality.
        latent_dim: ``D``.
        hidden_dims: Widths of encoders and decoders.
        likelihood: Decoder family, one or per modality.
        likelihood_scale: Decoder scale for normal/Laplace.
        beta: KL weight.

    Example:
        >>> vae = MoEVAE([64, 64], latent_dim=4)
        >>> vae.fit(jax.random.key(0), [x0, x1], num_steps=2000)
        >>> x1_given_x0 = vae.generate(jax.random.key(1), {0: x0_test})[1]

    References:
        Variational Mixture-of-Experts Autoencoders for Multi-Modal Deep Generative Models
        (Shi, Siddharth, Paige and Torr, 2019). https://arxiv.org/abs/1911.03393
    """

    def latent_sites(self) -> list[tuple[str, float]]:
        """One stratified site ``z_j`` per expert, weight ``1/M``."""
        return [(f"z_{j}", 1.0 / self.num_modalities) for j in range(self.num_modalities)]

    def subset_posterior(self, observed, encoders=None) -> dist.Distribution:
        """Uniform mixture of the observed Gaussian experts."""
        observed = self._check_observed(observed)
        if not observed:
            raise ValueError("subset_posterior needs at least one observed modality; got none")
        locs, scales = self._experts(observed, encoders)
        components = dist.Normal(jnp.stack(locs, -2), jnp.stack(scales, -2)).to_event(1)
        mixing = dist.Categorical(
            logits=jnp.zeros(locs[0].shape[:-1] + (len(locs),), locs[0].dtype)
        )
        return dist.MixtureSameFamily(mixing, components)

    def guide_distribution(self, name: str, xs, encoders) -> dist.Distribution:
        """Site ``z_j``: drawn from expert ``j``, scored by the mixture of all experts."""
        locs, scales = self._experts(dict(enumerate(xs)), encoders)
        return _StratifiedMixture(
            jnp.stack(locs, -2), jnp.stack(scales, -2), int(name.split("_")[1])
        )
