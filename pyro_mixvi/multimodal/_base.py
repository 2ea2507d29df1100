"""Shared pieces of the multimodal VAEs (torch): networks, likelihoods, input checks, stage 1.

``MultimodalVAE`` holds the decoders ``p(x_j|z)`` and the Pyro ``model``; subclasses say which
latent sites the model has and how the guide draws them (``JNF``: one joint-encoder site;
``PoEVAE``: the full set and every single modality; ``MoEVAE``: one stratified site per expert).
Stage 1 (``fit_joint``) is always Pyro's ``SVI`` on that model/guide pair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import Tensor, nn
from tqdm.auto import trange

LIKELIHOODS = ("normal", "laplace", "bernoulli")


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int) -> nn.Sequential:
    """A ReLU multilayer perceptron ``in_dim -> hidden_dims... -> out_dim``."""
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """``x -> (loc, scale)`` of a diagonal Gaussian over ``z``; ``scale = softplus(.) + 1e-4``."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        self.net = mlp(in_dim, hidden_dims, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loc, raw_scale = self.net(x).chunk(2, dim=-1)
        return loc, nn.functional.softplus(raw_scale) + 1e-4


@contextlib.contextmanager
def forked_rng(generator: torch.Generator | None) -> Iterator[None]:
    """Run Pyro code (which draws from the global RNG) seeded from ``generator``, then restore."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _per_modality(value, num_modalities: int, name: str) -> tuple:
    if isinstance(value, str | int | float):
        return (value,) * num_modalities
    value = tuple(value)
    if len(value) != num_modalities:
        raise ValueError(f"{name} must be one value or {num_modalities} values; got {len(value)}")
    return value


class MultimodalVAE(nn.Module):
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
        super().__init__()
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
        self.decoders = nn.ModuleList(mlp(latent_dim, hidden_dims, d) for d in input_dims)

    @property
    def num_modalities(self) -> int:
        """``M``, the number of modalities."""
        return len(self.input_dims)

    # ----------------------------------------------------------------------------- input checks
    def _check_observed(self, observed) -> dict[int, Tensor]:
        """``{j: x_j}`` from a mapping or an ``M``-sequence with ``None`` for missing ones."""
        if isinstance(observed, Mapping):
            items = dict(observed)
        elif isinstance(observed, Sequence) and not isinstance(observed, Tensor):
            if len(observed) != self.num_modalities:
                raise ValueError(
                    f"expected {self.num_modalities} modalities (None for unobserved ones); "
                    f"got {len(observed)}"
                )
            items = {j: x for j, x in enumerate(observed) if x is not None}
        else:
            raise TypeError(
                "observed must be a mapping {modality index: (N, d_j) tensor} or a sequence of "
                f"{self.num_modalities} tensors/None; got {type(observed).__name__}"
            )
        num_rows = None
        for j, x in items.items():
            if not isinstance(j, int) or not 0 <= j < self.num_modalities:
                raise ValueError(f"modality index must be in 0..{self.num_modalities - 1}; got {j}")
            if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.input_dims[j]:
                shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
                raise ValueError(
                    f"modality {j} must be a tensor of shape (N, {self.input_dims[j]}); got {shape}"
                )
            if num_rows is not None and x.shape[0] != num_rows:
                raise ValueError(
                    f"modality {j} has {x.shape[0]} rows but an earlier one has {num_rows}; "
                    "observed modalities must be paired row by row"
                )
            num_rows = x.shape[0]
        return dict(sorted(items.items()))

    def _check_complete(self, data) -> list[Tensor]:
        observed = self._check_observed(data)
        if len(observed) != self.num_modalities:
            missing = sorted(set(range(self.num_modalities)) - set(observed))
            raise ValueError(
                f"training needs all {self.num_modalities} modalities; {missing} missing"
            )
        return list(observed.values())

    # -------------------------------------------------------------------------------- the model
    def likelihood(self, j: int, z: Tensor) -> dist.Distribution:
        """``p(x_j | z)`` with event shape ``(d_j,)``."""
        out = self.decoders[j](z)
        name = self.likelihoods[j]
        if name == "bernoulli":
            return dist.Bernoulli(logits=out).to_event(1)
        scale = torch.as_tensor(self.likelihood_scales[j], dtype=out.dtype, device=out.device)
        family = dist.Normal if name == "normal" else dist.Laplace
        return family(out, scale).to_event(1)

    def decode(self, z: Tensor) -> tuple[Tensor, ...]:
        """Means of every ``p(x_j|z)``: ``(..., D)`` to ``M`` tensors ``(..., d_j)``."""
        return tuple(self.likelihood(j, z).mean for j in range(self.num_modalities))

    def _prior(self, like: Tensor) -> dist.Distribution:
        shape = like.shape[:-1] + (self.latent_dim,)
        return dist.Normal(like.new_zeros(shape), like.new_ones(shape)).to_event(1)

    def latent_sites(self) -> list[tuple[str, float]]:
        """``(site name, weight)`` of each latent site of the model; overridden by subclasses."""
        return [("z", 1.0)]

    def encoder_module(self) -> nn.Module:
        """The networks the guide trains in stage 1 (registered with ``pyro.module``)."""
        raise NotImplementedError

    def guide_distribution(self, name: str, xs: Sequence[Tensor]) -> dist.Distribution:
        """The guide's distribution at latent site ``name``; defined by subclasses."""
        raise NotImplementedError

    def model(self, *xs: Tensor) -> None:
        """Pyro model: per latent site, ``z ~ N(0, I)`` then ``x_j ~ p(x_j|z)`` for every ``j``."""
        pyro.module("decoders", self.decoders)
        with pyro.plate("data", xs[0].shape[0]):
            for name, weight in self.latent_sites():
                with poutine.scale(scale=weight):
                    with poutine.scale(scale=self.beta):
                        z = pyro.sample(name, self._prior(xs[0]))
                    for j, x in enumerate(xs):
                        pyro.sample(f"{name}/x{j}", self.likelihood(j, z), obs=x)

    def guide(self, *xs: Tensor) -> None:
        """Pyro guide: each latent site from :meth:`guide_distribution`, KL weighted by β."""
        pyro.module("encoders", self.encoder_module())
        with pyro.plate("data", xs[0].shape[0]):
            for name, weight in self.latent_sites():
                with poutine.scale(scale=weight * self.beta):
                    pyro.sample(name, self.guide_distribution(name, xs))

    # ------------------------------------------------------------------------------ stage 1 (SVI)
    def fit_joint(
        self,
        data: Sequence[Tensor],
        *,
        num_steps: int = 1000,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        generator: torch.Generator | None = None,
        progress_bar: bool = False,
    ) -> Tensor:
        """Stage 1: maximize the β-ELBO of ``model``/``guide`` with Pyro's ``SVI`` and Adam.

        Runs in a private param-store scope, so the user's ``pyro.get_param_store()`` is untouched;
        the trained weights live in this module.

        Returns:
            Per-step losses (negative β-ELBO of the minibatch), shape ``(num_steps,)``.

        Raises:
            ValueError: On missing modalities or wrong shapes.
            FloatingPointError: If a loss is non-finite (names the step).
        """
        xs = self._check_complete(data)
        elbo = TraceMeanField_ELBO()
        losses = []
        with pyro.get_param_store().scope(), forked_rng(generator):
            svi = SVI(self.model, self.guide, pyro.optim.Adam({"lr": learning_rate}), elbo)
            for step in trange(num_steps, disable=not progress_bar, desc="stage 1 (joint VAE)"):
                loss = svi.step(*minibatch(xs, batch_size, None))
                if not torch.isfinite(torch.tensor(loss)):
                    raise FloatingPointError(f"stage 1 step {step}: the β-ELBO loss is {loss}")
                losses.append(loss)
        return torch.tensor(losses)

    def fit(self, data: Sequence[Tensor], **kwargs) -> dict[str, Tensor]:
        """Run every training stage (here stage 1 only); returns ``{stage: losses}``."""
        return {"joint": self.fit_joint(data, **kwargs)}

    # ---------------------------------------------------------------------------------- inference
    def sample_posterior(self, observed, *, num_samples: int = 1, **kwargs) -> Tensor:
        """``z ~ p(z | X_S)`` for the observed subset; ``(num_samples, N, D)``. Subclasses."""
        raise NotImplementedError

    def generate(
        self,
        observed=None,
        *,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> tuple[Tensor, ...]:
        """Decode ``z ~ p(z|X_S)`` (or the prior when nothing is observed) into every modality.

        Shapes:
            Observed rows ``N``: ``M`` tensors ``(num_samples, N, d_j)`` of decoder means. With
            ``observed`` ``None`` or empty: ``(num_samples, d_j)`` from the prior.

        Args:
            observed: ``{j: (N, d_j)}`` or an ``M``-sequence with ``None`` for missing ones.
            num_samples: Latent draws per row.
            generator: Source of randomness.
            **kwargs: Passed to :meth:`sample_posterior` (e.g. NUTS settings).
        """
        if observed is None or len(self._check_observed(observed)) == 0:
            prototype = next(self.parameters())
            eps = torch.randn(
                (num_samples, self.latent_dim),
                generator=generator,
                dtype=prototype.dtype,
                device=prototype.device,
            )
            z = eps
        else:
            z = self.sample_posterior(
                observed, num_samples=num_samples, generator=generator, **kwargs
            )
        with torch.no_grad():
            return self.decode(z)


def minibatch(xs: Sequence[Tensor], batch_size: int, generator: torch.Generator | None):
    """``batch_size`` distinct random rows (all if fewer), the same rows in every modality.

    Distinct rows keep a contrastive batch's positives unambiguous.
    """
    index = torch.randperm(xs[0].shape[0], generator=generator)[:batch_size]
    return [x[index.to(x.device)] for x in xs]


def adam_fit(
    parameters: Iterable[nn.Parameter],
    loss_fn: Callable[[], Tensor],
    *,
    num_steps: int,
    learning_rate: float,
    progress_bar: bool,
    desc: str,
) -> Tensor:
    """Minimize ``loss_fn()`` (a fresh minibatch loss per call) with Adam for ``num_steps``.

    Returns:
        Per-step losses, shape ``(num_steps,)``.

    Raises:
        FloatingPointError: If a loss is non-finite (names the step and ``desc``).
    """
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    losses = []
    for step in trange(num_steps, disable=not progress_bar, desc=desc):
        loss = loss_fn()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc} step {step}: loss is {loss}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)
