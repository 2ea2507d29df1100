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

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor, nn

from ._base import GaussianEncoder, MultimodalVAE
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
        self.encoders = nn.ModuleList(
            GaussianEncoder(d, hidden_dims, latent_dim) for d in self.input_dims
        )

    def encoder_module(self) -> nn.Module:
        """The unimodal encoders."""
        return self.encoders

    def _experts(self, observed: dict[int, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        params = [self.encoders[j](x) for j, x in observed.items()]
        return [loc for loc, _ in params], [scale for _, scale in params]

    def subset_posterior(self, observed) -> dist.Distribution:
        """``q(z|X_S)``: batch ``(N,)``, event ``(D,)``. Defined by each baseline."""
        raise NotImplementedError

    def sample_posterior(
        self, observed, *, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> Tensor:
        """``z ~ q(z|X_S)`` for the observed subset; ``(num_samples, N, D)``."""
        posterior = self.subset_posterior(observed)
        with torch.no_grad():
            return _draw(posterior, num_samples, generator)


class PoEVAE(_UnimodalEncoders):
    r"""Product-of-Gaussian-experts multimodal VAE (MVAE): ``q(z|X_S) ∝ p(z) Π_{j∈S} q_j(z|x_j)``.

    Shapes:
        Data: ``M`` tensors ``(N, d_j)``; ``sample_posterior`` returns ``(num_samples, N, D)``.

    Args:
        input_dims: ``d_j`` of each modality.
        latent_dim: ``D``.
        hidden_dims: Widths of encoders and decoders.
        likelihood: Decoder family, one or per modality.
        likelihood_scale: Decoder scale for normal/Laplace.
        beta: KL weight.

    Example:
        >>> vae = PoEVAE([64, 64], latent_dim=4)
        >>> vae.fit([x0, x1], num_steps=2000)
        >>> x1_given_x0 = vae.generate({0: x0_test})[1]

    References:
        Multimodal Generative Models for Scalable Weakly-Supervised Learning (Wu and Goodman,
        2018). https://arxiv.org/abs/1802.05335
    """

    def latent_sites(self) -> list[tuple[str, float]]:
        """The full set ``z_all`` and every single modality ``z_j``, weight 1 each."""
        singles = [(f"z_{j}", 1.0) for j in range(self.num_modalities)]
        return [("z_all", 1.0)] + (singles if self.num_modalities > 1 else [])

    def subset_posterior(self, observed) -> dist.Distribution:
        """Closed-form product of the prior and the observed Gaussian experts."""
        observed = self._check_observed(observed)
        if not observed:
            raise ValueError("subset_posterior needs at least one observed modality; got none")
        loc, scale = gaussian_product_of_experts(*self._experts(observed), prior_power=1.0)
        return dist.Normal(loc, scale).to_event(1)

    def guide_distribution(self, name: str, xs: Sequence[Tensor]) -> dist.Distribution:
        """Site ``z_all``: all experts; site ``z_j``: prior times expert ``j``."""
        if name == "z_all":
            return self.subset_posterior(list(xs))
        j = int(name.split("_")[1])
        return self.subset_posterior({j: xs[j]})


class _StratifiedMixture(dist.TorchDistribution):
    """Draws from expert ``component`` but scores with the uniform mixture of all experts."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, locs: Tensor, scales: Tensor, component: int) -> None:
        self.locs, self.scales, self.component = locs, scales, component
        super().__init__(batch_shape=locs.shape[:-2], event_shape=locs.shape[-1:])

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        loc, scale = self.locs[..., self.component, :], self.scales[..., self.component, :]
        return loc + scale * torch.randn(
            torch.Size(sample_shape) + loc.shape, dtype=loc.dtype, device=loc.device
        )

    def log_prob(self, value: Tensor) -> Tensor:
        experts = dist.Normal(self.locs, self.scales).to_event(1)
        log_probs = experts.log_prob(value.unsqueeze(-2))
        return log_probs.logsumexp(-1) - math.log(self.locs.shape[-2])


class MoEVAE(_UnimodalEncoders):
    r"""Mixture-of-experts multimodal VAE (MMVAE): ``q(z|X_S) = |S|^{-1} Σ_{j∈S} q_j(z|x_j)``.

    Shapes:
        Data: ``M`` tensors ``(N, d_j)``; ``sample_posterior`` returns ``(num_samples, N, D)``.

    Args:
        input_dims: ``d_j`` of each modality.
        latent_dim: ``D``.
        hidden_dims: Widths of encoders and decoders.
        likelihood: Decoder family, one or per modality.
        likelihood_scale: Decoder scale for normal/Laplace.
        beta: KL weight.

    Example:
        >>> vae = MoEVAE([64, 64], latent_dim=4)
        >>> vae.fit([x0, x1], num_steps=2000)
        >>> x1_given_x0 = vae.generate({0: x0_test})[1]

    References:
        Variational Mixture-of-Experts Autoencoders for Multi-Modal Deep Generative Models
        (Shi, Siddharth, Paige and Torr, 2019). https://arxiv.org/abs/1911.03393
    """

    def latent_sites(self) -> list[tuple[str, float]]:
        """One stratified site ``z_j`` per expert, weight ``1/M``."""
        return [(f"z_{j}", 1.0 / self.num_modalities) for j in range(self.num_modalities)]

    def subset_posterior(self, observed) -> dist.Distribution:
        """Uniform mixture of the observed Gaussian experts."""
        observed = self._check_observed(observed)
        if not observed:
            raise ValueError("subset_posterior needs at least one observed modality; got none")
        locs, scales = self._experts(observed)
        components = dist.Normal(torch.stack(locs, -2), torch.stack(scales, -2)).to_event(1)
        mixing = dist.Categorical(logits=locs[0].new_zeros(locs[0].shape[:-1] + (len(locs),)))
        return dist.MixtureSameFamily(mixing, components)

    def guide_distribution(self, name: str, xs: Sequence[Tensor]) -> dist.Distribution:
        """Site ``z_j``: drawn from expert ``j``, scored by the mixture of all experts."""
        locs, scales = self._experts(dict(enumerate(xs)))
        return _StratifiedMixture(
            torch.stack(locs, -2), torch.stack(scales, -2), int(name.split("_")[1])
        )


def _draw(posterior: dist.Distribution, num_samples: int, generator) -> Tensor:
    """Sample ``posterior`` with ``generator`` (Normal or a mixture of Normals)."""
    if isinstance(posterior, dist.MixtureSameFamily):
        components = posterior.component_distribution.base_dist
        num_experts = components.loc.shape[-2]
        pick = torch.randint(
            0, num_experts, (num_samples,) + components.loc.shape[:-2], generator=generator
        )
        index = pick[..., None, None].expand(pick.shape + (1, components.loc.shape[-1]))
        loc = components.loc.expand((num_samples,) + components.loc.shape).gather(-2, index)
        scale = components.scale.expand((num_samples,) + components.scale.shape).gather(-2, index)
        loc, scale = loc.squeeze(-2), scale.squeeze(-2)
    else:
        shape = (num_samples,) + posterior.base_dist.loc.shape
        loc, scale = posterior.base_dist.loc.expand(shape), posterior.base_dist.scale.expand(shape)
    noise = torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
    return loc + scale * noise
