r"""Joint normalizing flows for multimodal VAEs: ``JNF`` and ``JNFShared`` (torch + Pyro).

Stage 1 trains a joint VAE — Gaussian joint encoder ``q(z|X)``, decoders ``p(x_j|z)`` — by the
β-ELBO through Pyro's ``SVI``. Stage 2 freezes it and fits one conditional masked autoregressive
flow ``q_j(z|x_j)`` per modality (``pyro_mixvi.flows.MAF`` over zuko, context = an embedding
of ``x_j``) by maximizing
``log q_j(z|x_j)`` at ``z ~ q(z|X)``: the forward KL to the joint posterior. For an observed
subset ``S`` the posterior is the product of experts

.. math:: p(z|X_S) \propto \prod_{j\in S} q_j(z|x_j) \,/\, p(z)^{|S|-1},

sampled with Pyro's NUTS (adapted step size and diagonal mass); all modalities use the joint
encoder, one modality its flow directly. ``JNFShared`` first trains projections ``g_j(x_j)`` with
a contrastive (InfoNCE) loss across modalities, freezes them, and conditions ``q_j`` on
``g_j(x_j)`` only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ..flows import MAF
from ._base import GaussianEncoder, MultimodalVAE, adam_fit, minibatch, mlp
from .poe import product_of_experts_log_prob, sample_product_of_experts

__all__ = ["JNF", "JNFShared"]


class JNF(MultimodalVAE):
    r"""Joint-normalizing-flow multimodal VAE with product-of-experts subset posteriors.

    .. math:: p(z|X_S) \propto \prod_{j\in S} q_j(z|x_j) / p(z)^{|S|-1}

    Shapes:
        Data: ``M`` tensors ``(N, d_j)``. ``log_prob(z, observed)`` maps ``(..., N, D)`` to
        ``(..., N)``; ``sample_posterior`` returns ``(num_samples, N, D)``.

    Args:
        input_dims: ``d_j`` of each modality.
        latent_dim: ``D``.
        hidden_dims: Widths of the joint encoder, decoders and context networks.
        likelihood: Decoder family, one or per modality (see ``MultimodalVAE``).
        likelihood_scale: Decoder scale for normal/Laplace.
        beta: KL weight of stage 1.
        num_transforms: MADE blocks per unimodal flow; at least 1.
        flow_hidden_dims: Hidden widths inside each MADE block.
        context_dim: Size of the learned embedding of ``x_j`` that conditions the flow.

    Example:
        >>> jnf = JNF([64, 64], latent_dim=4)
        >>> losses = jnf.fit([x0, x1], num_steps=2000)            # stage 1 then stage 2
        >>> z = jnf.sample_posterior({0: x0_test}, num_samples=10)  # (10, N, 4)
        >>> x1_given_x0 = jnf.generate({0: x0_test})[1]            # cross-modal generation

    Cost:
        Sampling one flow costs ``D`` sequential passes per MADE block; subset posteriors run
        NUTS on the batch (``num_warmup + num_samples`` iterations, one tree per iteration).

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
        self.joint_encoder = GaussianEncoder(sum(self.input_dims), hidden_dims, latent_dim)
        self.context_nets = nn.ModuleList(
            mlp(d, hidden_dims, context_dim) for d in self._context_input_dims()
        )
        self.flows = nn.ModuleList(
            MAF(
                latent_dim,
                context_dim=context_dim,
                num_transforms=num_transforms,
                hidden_dims=tuple(flow_hidden_dims),
            )
            for _ in self.input_dims
        )

    def _context_input_dims(self) -> tuple[int, ...]:
        return self.input_dims

    def _context(self, j: int, x: Tensor) -> Tensor:
        return self.context_nets[j](x)

    # ------------------------------------------------------------------------------------ stage 1
    def encoder_module(self) -> nn.Module:
        """The joint encoder (the only network the stage-1 guide trains)."""
        return self.joint_encoder

    def joint_posterior(self, xs: Sequence[Tensor]) -> dist.Distribution:
        """``q(z|X)``: diagonal Gaussian, batch ``(N,)``, event ``(D,)``."""
        loc, scale = self.joint_encoder(torch.cat(list(xs), dim=-1))
        return dist.Normal(loc, scale).to_event(1)

    def guide_distribution(self, name: str, xs: Sequence[Tensor]) -> dist.Distribution:
        """Stage-1 guide at site ``"z"``: the joint encoder."""
        return self.joint_posterior(xs)

    # ------------------------------------------------------------------------------------ stage 2
    def unimodal_posterior(self, j: int, x: Tensor) -> torch.distributions.Distribution:
        """``q_j(z|x_j)``: zuko flow distribution with batch ``(N,)`` and event ``(D,)``."""
        x = self._check_observed({j: x})[j]
        return self.flows[j](self._context(j, x))

    def _stage2_parameters(self) -> list[nn.Parameter]:
        return [*self.context_nets.parameters(), *self.flows.parameters()]

    def fit_unimodal(
        self,
        data: Sequence[Tensor],
        *,
        num_steps: int = 1000,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        generator: torch.Generator | None = None,
        progress_bar: bool = False,
    ) -> Tensor:
        """Stage 2: freeze the joint VAE; maximize ``Σ_j log q_j(z|x_j)`` at ``z ~ q(z|X)``.

        Returns:
            Per-step losses ``-Σ_j mean log q_j``, shape ``(num_steps,)``.

        Raises:
            FloatingPointError: If a loss is non-finite (names the step).
        """
        xs = self._check_complete(data)
        def loss_fn() -> Tensor:
            batch = minibatch(xs, batch_size, generator)
            with torch.no_grad():  # the joint VAE is frozen: only the flows get gradients
                loc, scale = self.joint_encoder(torch.cat(batch, dim=-1))
            noise = torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
            z = loc + scale * noise
            return -sum(
                self.flows[j](self._context(j, x)).log_prob(z).mean() for j, x in enumerate(batch)
            )

        return adam_fit(
            self._stage2_parameters(), loss_fn, num_steps=num_steps, learning_rate=learning_rate,
            progress_bar=progress_bar, desc="stage 2 (unimodal flows)",
        )

    def fit(self, data: Sequence[Tensor], **kwargs) -> dict[str, Tensor]:
        """Stage 1 (:meth:`fit_joint`) then stage 2 (:meth:`fit_unimodal`), same settings."""
        return {
            "joint": self.fit_joint(data, **kwargs),
            "unimodal": self.fit_unimodal(data, **kwargs),
        }

    # ---------------------------------------------------------------------------------- inference
    def log_prob(self, z: Tensor, observed) -> Tensor:
        """Unnormalized ``log p(z|X_S) = Σ_{j∈S} log q_j(z|x_j) − (|S|−1) log p(z)``.

        Shapes:
            ``z``: ``(..., N, D)``; result ``(..., N)``.

        Raises:
            ValueError: If nothing is observed, or on wrong shapes.
        """
        observed = self._check_observed(observed)
        if not observed:
            raise ValueError("log_prob needs at least one observed modality; got none")
        experts = [self.flows[j](self._context(j, x)).log_prob(z) for j, x in observed.items()]
        return product_of_experts_log_prob(experts, self._prior(z).log_prob(z))

    def sample_posterior(
        self,
        observed,
        *,
        num_samples: int = 1,
        num_warmup: int = 300,
        chunk_size: int | None = None,
        use_joint_encoder: bool = True,
        generator: torch.Generator | None = None,
        progress_bar: bool = False,
    ) -> Tensor:
        """``z ~ p(z|X_S)``: joint encoder (all observed), flow (one), NUTS on the PoE (else).

        Shapes:
            Returns ``(num_samples, N, D)``.

        Args:
            observed: ``{j: (N, d_j)}`` or an ``M``-sequence with ``None`` for missing ones.
            num_samples: Draws per row.
            num_warmup: NUTS adaptation steps.
            chunk_size: Rows per NUTS run (they share one step size); default all.
            use_joint_encoder: With every modality observed, draw from ``q(z|X)`` (the paper);
                ``False`` samples the PoE of all flows instead.
            generator: Source of randomness.
            progress_bar: Show NUTS progress.
        """
        observed = self._check_observed(observed)
        if not observed:
            raise ValueError("sample_posterior needs at least one observed modality; got none")
        with torch.no_grad():
            if len(observed) == self.num_modalities and use_joint_encoder:
                return self._rsample(
                    self.joint_posterior(list(observed.values())), num_samples, generator
                )
            if len(observed) == 1:
                ((j, x),) = observed.items()
                return self._rsample(self.unimodal_posterior(j, x), num_samples, generator)
        rows = next(iter(observed.values())).shape[0]
        chunk_size = rows if chunk_size is None else chunk_size
        draws = []
        for start in range(0, rows, chunk_size):
            part = {j: x[start : start + chunk_size] for j, x in observed.items()}
            with torch.no_grad():
                initial = self._initial_points(part, generator)
            draws.append(
                sample_product_of_experts(
                    lambda z, part=part: self.log_prob(z, part),
                    initial,
                    num_samples=num_samples,
                    num_warmup=num_warmup,
                    generator=generator,
                    progress_bar=progress_bar,
                )
            )
        return torch.cat(draws, dim=1).detach()

    def _initial_points(self, observed: dict[int, Tensor], generator) -> Tensor:
        """Start NUTS from one draw of a randomly chosen observed unimodal flow per row."""
        rows = next(iter(observed.values())).shape[0]
        draws = torch.stack(
            [
                self._rsample(self.unimodal_posterior(j, x), 1, generator)[0]
                for j, x in observed.items()
            ]
        )
        pick = torch.randint(0, len(observed), (rows,), generator=generator)
        return draws[pick, torch.arange(rows)]

    @staticmethod
    def _rsample(posterior, num_samples: int, generator) -> Tensor:
        if isinstance(posterior, dist.Independent) and isinstance(posterior.base_dist, dist.Normal):
            loc, scale = posterior.base_dist.loc, posterior.base_dist.scale
            noise = torch.randn(
                (num_samples,) + loc.shape, generator=generator, dtype=loc.dtype, device=loc.device
            )
            return loc + scale * noise
        # zuko flows draw base noise from the global RNG; fork it, seeded from ``generator``.
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return posterior.sample((num_samples,))


class JNFShared(JNF):
    r"""``JNF`` whose unimodal flows see only a shared projection ``g_j(x_j)`` of each modality.

    Stage 0 (:meth:`fit_projections`) trains ``g_j`` (an MLP to ``shared_dim``, L2-normalized) with
    the symmetric InfoNCE loss over every pair of modalities at ``temperature``, then freezes
    them. Stages 1 and 2 are those of ``JNF``; stage 2 conditions ``q_j(z|g_j(x_j))``.

    Args:
        input_dims: ``d_j`` of each modality; at least two modalities.
        shared_dim: Size of the shared projections.
        temperature: InfoNCE temperature; positive.

    The other keywords (``latent_dim``, ``hidden_dims``, ``num_transforms``, ...) are as for
    ``JNF``.

    Example:
        >>> model = JNFShared([64, 64], latent_dim=4, shared_dim=16)
        >>> stages = model.fit([x0, x1], num_steps=2000)   # contrastive, joint VAE, flows

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
        self.projectors = nn.ModuleList(mlp(d, hidden_dims, shared_dim) for d in self.input_dims)

    def _context_input_dims(self) -> tuple[int, ...]:
        return (self.shared_dim,) * len(self.input_dims)

    def project(self, j: int, x: Tensor) -> Tensor:
        """``g_j(x_j)``, L2-normalized: ``(N, d_j)`` to ``(N, shared_dim)``."""
        return nn.functional.normalize(self.projectors[j](x), dim=-1)

    def _context(self, j: int, x: Tensor) -> Tensor:
        return self.context_nets[j](self.project(j, x).detach())

    def contrastive_loss(self, xs: Sequence[Tensor]) -> Tensor:
        """Symmetric InfoNCE summed over modality pairs; positives are the rows' own pairs."""
        embeddings = [self.project(j, x) for j, x in enumerate(xs)]
        target = torch.arange(xs[0].shape[0], device=xs[0].device)
        loss = xs[0].new_zeros(())
        for a, b in itertools.combinations(embeddings, 2):
            logits = a @ b.T / self.temperature
            loss = loss + nn.functional.cross_entropy(logits, target)
            loss = loss + nn.functional.cross_entropy(logits.T, target)
        return loss

    def fit_projections(
        self,
        data: Sequence[Tensor],
        *,
        num_steps: int = 1000,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        generator: torch.Generator | None = None,
        progress_bar: bool = False,
    ) -> Tensor:
        """Stage 0: train the projections ``g_j`` contrastively (later stages only read them).

        Returns:
            Per-step InfoNCE losses, shape ``(num_steps,)``.
        """
        xs = self._check_complete(data)
        return adam_fit(
            self.projectors.parameters(),
            lambda: self.contrastive_loss(minibatch(xs, batch_size, generator)),
            num_steps=num_steps, learning_rate=learning_rate, progress_bar=progress_bar,
            desc="stage 0 (contrastive)",
        )

    def fit(self, data: Sequence[Tensor], **kwargs) -> dict[str, Tensor]:
        """Stage 0 (projections), 1 (joint VAE) and 2 (flows on ``g_j(x_j)``), same settings."""
        return {"projections": self.fit_projections(data, **kwargs), **super().fit(data, **kwargs)}
