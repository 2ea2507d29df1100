r"""Heterogeneous mixture of flow experts with global weights (AMF-VI), fit from samples.

.. math:: \log q(x) = \operatorname{logsumexp}_k \big(\log \pi_k + \log q_k(x)\big)

Stage 1 trains each expert alone by maximum likelihood (frozen afterwards); stage 2 fits the
weights ``pi`` by :func:`ema_weights_step` on fresh batches. The paper's update ("ema")
``pi <- beta pi + (1 - beta) softmax_k(mean_b log q_k(x_b))`` converges to
``pi_k ∝ exp(-CE(p, q_k))`` (cross-entropy of the data under expert ``k``), **not** to the
maximum-likelihood weights; ``weight_update="responsibility"`` averages per-point posterior
responsibilities instead (an EM step smoothed by the EMA), whose fixed point is the
maximum-likelihood weight vector.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints
from tqdm.auto import tqdm

from pyro_mixvi.distributions._index_mixture import IndexMixture
from pyro_mixvi.flows import MAF, RBIG, RealNVP

Expert = Callable[[], Distribution]
EXPERTS = ("maf", "realnvp", "rbig")
_EMPTY = torch.Size()


class EMAWeightsState(NamedTuple):
    """Stage-2 state: current weights ``(K,)`` (on the simplex) and the step count."""

    weights: Tensor
    num_steps: int


class EMAWeightsInfo(NamedTuple):
    """Per-step diagnostics.

    Attributes:
        n_eff: Effective number of experts ``1 / sum_k pi_k^2`` after the step.
        scores: Per-expert batch scores ``(K,)`` (mean log-likelihoods; ``-inf`` if non-finite).
        target: The step's target allocation ``(K,)`` that ``pi`` moved towards.
    """

    n_eff: Tensor
    scores: Tensor
    target: Tensor


def ema_weights_init(num_experts: int, *, like: Tensor | None = None) -> EMAWeightsState:
    """Uniform weights over ``num_experts``; ``like`` sets dtype and device."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1; got {num_experts}")
    like = torch.zeros(()) if like is None else like
    return EMAWeightsState(like.new_full((num_experts,), 1.0 / num_experts), 0)


def ema_weights_step(
    state: EMAWeightsState,
    log_likelihoods: Tensor,
    *,
    beta: float = 0.9,
    weight_update: Literal["ema", "responsibility"] = "ema",
    sample_weights: Tensor | None = None,
) -> tuple[EMAWeightsState, EMAWeightsInfo]:
    r"""One stage-2 update from per-expert log-likelihoods ``(K, B)`` of a fresh batch.

    ``"ema"`` (the paper): ``r = softmax_k(L_k)`` with ``L_k`` the (weighted) batch mean of
    ``log q_k``. ``"responsibility"``: ``r_k`` = (weighted) batch mean of
    ``softmax_k(log pi_k + log q_k(x_b))``. Then ``pi <- beta pi + (1 - beta) r``.

    A non-finite score (an expert whose batch log-likelihood is ``-inf`` or NaN) counts as
    ``-inf``: that expert gets ``r_k = 0`` and decays geometrically; the other weights stay
    finite. An expert with a NaN log-likelihood is not a density there, so its weight is set
    to exactly 0 (and stays 0): :class:`FlowMixture` never evaluates zero-weight experts.
    Raises ``FloatingPointError`` only if no expert has a finite score.

    Args:
        state: Current weights.
        log_likelihoods: ``log q_k(x_b)`` with shape ``(K, B)``.
        beta: EMA factor in ``[0, 1)``.
        weight_update: ``"ema"`` or ``"responsibility"``.
        sample_weights: Optional normalized per-point weights ``(B,)`` (self-normalized
            importance weights when the batch is not drawn from the target).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1); got {beta}")
    batch = log_likelihoods.shape[-1]
    w = log_likelihoods.new_full((batch,), 1.0 / batch)
    w = w if sample_weights is None else sample_weights
    finite = torch.isfinite(log_likelihoods)
    log_lik = torch.where(finite, log_likelihoods, -math.inf)  # documented exact rule above
    expert_ok = finite.all(-1)
    scores = _weighted_scores(log_lik, w, expert_ok)
    if not expert_ok.any():
        raise FloatingPointError("every expert has a non-finite log-likelihood on this batch")
    if weight_update == "ema":
        target = torch.softmax(scores, -1)
    elif weight_update == "responsibility":
        joint = state.weights.log().unsqueeze(-1) + log_lik
        resp = torch.softmax(joint, 0)  # points no expert covers give NaN: drop them
        covered = torch.isfinite(joint).any(0)
        resp = torch.where(covered, resp, 0.0)
        target = (resp * w).sum(-1) / (w * covered).sum()
    else:
        raise ValueError(f"weight_update must be 'ema' or 'responsibility'; got {weight_update!r}")
    weights = beta * state.weights + (1.0 - beta) * target
    weights = torch.where(torch.isnan(log_likelihoods).any(-1), 0.0, weights)
    weights = weights / weights.sum()
    n_eff = 1.0 / weights.square().sum()
    return EMAWeightsState(weights, state.num_steps + 1), EMAWeightsInfo(n_eff, scores, target)


def _weighted_scores(log_lik: Tensor, w: Tensor, expert_ok: Tensor) -> Tensor:
    safe = torch.where(expert_ok.unsqueeze(-1), log_lik, 0.0)
    return torch.where(expert_ok, (safe * w).sum(-1), -math.inf)


class FlowMixture(IndexMixture):
    r"""Mixture of flow experts with global weights: ``q(x) = sum_k pi_k q_k(x)``.

    It is a finite mixture in the sense of :mod:`pyro_mixvi.guides.base`:
    :meth:`rsample_components` draws once from every expert (reparameterized) and returns
    ``log pi``, so ``RBMixture_ELBO`` trains experts and weights jointly (the posterior of
    :class:`~pyro_mixvi.AutoFlowMixture`). Stock Pyro ELBOs are refused (``score_parts``
    raises): the expert index of :meth:`rsample` carries no gradient to ``pi``.

    Shapes:
        ``log_prob`` maps ``(..., D)`` to ``(...)``; ``component_log_probs`` to ``(..., K)``;
        ``rsample(sample_shape)`` returns ``sample_shape + (D,)``;
        ``rsample_components(sample_shape)`` returns ``sample_shape + (K', D)`` and
        ``sample_shape + (K',)`` with ``K'`` the number of experts of positive weight.

    Args:
        experts: ``K`` callables (e.g. zuko flows, :class:`~pyro_mixvi.flows.RBIG`) each
            returning a distribution over ``R^D`` when called without arguments.
        weights: Mixture weights ``(K,)``, non-negative, summing to one.

    Example:
        >>> mixture = FlowMixture.fit(samples, num_steps=500, progress_bar=False)
        >>> mixture.weights, mixture.n_eff
        >>> mixture.log_prob(samples[:10]).shape
        torch.Size([10])

    Cost:
        ``log_prob`` evaluates every expert; sampling draws ``Multinomial(n, pi)`` counts and
        samples each expert once (MAF's and RBIG's sampling are the slow directions).

    References:
        AMF-VI: adaptive heterogeneous mixtures of normalizing flows (2025),
        https://github.com/benjaminsw/AMF-VIJ
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, experts: Sequence[Expert], weights: Tensor) -> None:
        if len(experts) < 1:
            raise ValueError("experts must hold at least one expert")
        if weights.shape != (len(experts),):
            raise ValueError(
                f"weights must have shape ({len(experts)},); got {tuple(weights.shape)}"
            )
        if not (torch.isfinite(weights).all() and (weights >= 0).all()):
            raise ValueError("weights must be finite and non-negative")
        self.experts = list(experts)
        self.weights = weights / weights.sum()
        self._dists = [expert() for expert in self.experts]
        event_shape = self._dists[0].event_shape
        super().__init__(torch.Size(), event_shape, validate_args=False)

    @property
    def n_eff(self) -> Tensor:
        """Effective number of experts ``1 / sum_k pi_k^2`` (the paper reports ``exp(H(pi))``)."""
        return 1.0 / self.weights.square().sum()

    def component_log_probs(self, x: Tensor) -> Tensor:
        """``log q_k(x)`` for every expert, stacked last: ``(..., D) -> (..., K)``."""
        return torch.stack([d.log_prob(x) for d in self._dists], -1)

    def log_prob(self, x: Tensor) -> Tensor:
        # Experts with weight exactly 0 contribute nothing and are not evaluated, so a
        # diverged (NaN) expert that stage 2 switched off cannot reach the mixture density.
        active = self.active_experts
        log_q = torch.stack([self._dists[k].log_prob(x) for k in active], -1)
        return torch.logsumexp(self.weights[active].log() + log_q, -1)

    @property
    def active_experts(self) -> list[int]:
        """Indices of the experts with positive weight (the only ones ever evaluated)."""
        return [k for k in range(len(self._dists)) if self.weights[k] > 0]

    def rsample(self, sample_shape: torch.Size = _EMPTY) -> Tensor:
        return self._draw(sample_shape)[0]

    def rsample_components(
        self, sample_shape: torch.Size | tuple[int, ...] = ()
    ) -> tuple[Tensor, Tensor]:
        """One independent reparameterized draw per expert and the log-weights ``log pi``.

        ``E_q[h(x)] = E[sum_k pi_k h(x_k)]`` with ``x_k ~ q_k`` independent; both outputs are
        differentiable in the experts' parameters and the weights (the finite-mixture protocol
        of :mod:`pyro_mixvi.guides.base`). Experts of weight exactly 0 are left out, so a
        diverged expert never reaches the estimate.

        Shapes:
            Returns ``x``: ``sample_shape + (K', D)`` and ``log_weights``:
            ``sample_shape + (K',)``, ``K'`` = number of experts with positive weight.
        """
        shape = torch.Size(sample_shape)
        active = self.active_experts
        x = torch.stack([self._dists[k].rsample(shape) for k in active], -2)
        log_weights = self.weights[active].log()
        return x, log_weights.expand(shape + log_weights.shape)

    def rsample_and_log_prob(self, sample_shape: torch.Size = _EMPTY) -> tuple[Tensor, Tensor]:
        x, _ = self._draw(sample_shape)
        return x, self.log_prob(x)

    def _draw(self, sample_shape: torch.Size) -> tuple[Tensor, Tensor]:
        """Exact draws: expert counts from ``Multinomial(n, pi)``, then a random interleaving."""
        shape = torch.Size(sample_shape)
        n = shape.numel()
        index = torch.multinomial(self.weights, max(n, 1), replacement=True)[:n]
        counts = torch.bincount(index, minlength=len(self._dists)).tolist()
        draws = [d.rsample((c,)) for d, c in zip(self._dists, counts, strict=True) if c]
        labels = torch.cat([index.new_full((c,), k) for k, c in enumerate(counts) if c])
        x = torch.cat(draws) if draws else self.weights.new_zeros((0, *self.event_shape))
        order = torch.randperm(n, device=x.device)
        return x[order].reshape(shape + self.event_shape), labels[order].reshape(shape)

    @classmethod
    def fit(
        cls,
        samples: Tensor | Callable[[int], Tensor],
        *,
        experts: Sequence[str | Callable[[int], nn.Module]] = EXPERTS,
        num_steps: int = 1000,
        batch_size: int = 512,
        lr: float = 1e-3,
        num_weight_steps: int = 200,
        weight_batch_size: int = 1000,
        beta: float = 0.9,
        weight_update: Literal["ema", "responsibility"] = "ema",
        expert_kwargs: dict[str, dict] | None = None,
        generator: torch.Generator | None = None,
        progress_bar: bool = True,
    ) -> FlowMixture:
        """The paper's two-stage procedure from samples.

        Stage 1 trains each parametric expert by Adam on minibatch negative log-likelihood
        (an expert whose loss turns non-finite stops training, with a warning, and stage 2
        down-weights it) and fits RBIG to the samples; stage 2 runs ``num_weight_steps``
        :func:`ema_weights_step` updates on fresh batches.

        Args:
            samples: ``(N, D)`` draws from the target, or ``sampler(n) -> (n, D)`` for fresh
                draws (stage 2 then uses batches the experts never saw). With a tensor, stage 2
                resamples it with replacement.
            experts: Names in ``("maf", "realnvp", "rbig")`` or factories
                ``input_dim -> module`` (modules calling to a distribution), trained by ML.
            num_steps: Adam steps per parametric expert.
            batch_size: Stage-1 minibatch size.
            lr: Adam learning rate.
            num_weight_steps: Stage-2 EMA steps.
            weight_batch_size: Stage-2 batch size.
            beta: EMA factor.
            weight_update: ``"ema"`` (paper) or ``"responsibility"`` (ML weights).
            expert_kwargs: Per-name keyword arguments, e.g. ``{"maf": {"num_transforms": 8}}``.
            generator: Random source for minibatches, rotations and resampling.
            progress_bar: Show tqdm bars per stage.
        """
        draw = _batch_source(samples, generator)
        train = draw(None)
        modules = [
            _build_expert(spec, train, expert_kwargs or {}, generator, progress_bar)
            for spec in experts
        ]
        for k, module in enumerate(modules):
            if not isinstance(module, RBIG):
                _train_ml(module, draw, k, num_steps, batch_size, lr, progress_bar)
        weights = fit_weights(
            modules, lambda: draw(weight_batch_size), num_steps=num_weight_steps, beta=beta,
            weight_update=weight_update, progress_bar=progress_bar,
        )
        return cls(modules, weights)


def fit_weights(
    experts: Sequence[Expert],
    batches: Callable[[], Tensor],
    *,
    num_steps: int = 200,
    beta: float = 0.9,
    weight_update: Literal["ema", "responsibility"] = "ema",
    progress_bar: bool = True,
) -> Tensor:
    """Stage 2: ``num_steps`` :func:`ema_weights_step` updates on ``batches()``; returns ``pi``."""
    dists = [expert() for expert in experts]
    state = None
    bar = tqdm(range(num_steps), desc="stage 2 (weights)", disable=not progress_bar)
    for _ in bar:
        x = batches()
        with torch.no_grad():
            log_lik = torch.stack([d.log_prob(x) for d in dists])
        state = ema_weights_init(len(dists), like=x) if state is None else state
        state, info = ema_weights_step(state, log_lik, beta=beta, weight_update=weight_update)
        bar.set_postfix(n_eff=f"{info.n_eff.item():.2f}")
    if state is None:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    return state.weights


def _batch_source(
    samples: Tensor | Callable[[int], Tensor], generator: torch.Generator | None
) -> Callable[[int | None], Tensor]:
    """``draw(n)``: ``n`` fresh (or resampled) points; ``draw(None)``: the stage-1 data."""
    if callable(samples):
        pool = samples(4096)
        return lambda n: pool if n is None else samples(n)
    if samples.ndim != 2 or not torch.isfinite(samples).all():
        raise ValueError("samples must be a finite (N, D) tensor or a callable sampler(n)")

    def draw(n: int | None) -> Tensor:
        if n is None:
            return samples
        idx = torch.randint(len(samples), (n,), generator=generator).to(samples.device)
        return samples[idx]

    return draw


def _build_expert(spec, train: Tensor, kwargs: dict, generator, progress_bar: bool) -> nn.Module:
    dim = train.shape[-1]
    if callable(spec):
        return spec(dim)
    options = kwargs.get(spec, {})
    if spec == "maf":
        return MAF(dim, **options).to(train)
    if spec == "realnvp":
        return RealNVP(dim, **options).to(train)
    if spec == "rbig":
        return RBIG.fit(train, generator=generator, progress_bar=progress_bar, **options)
    raise ValueError(f"experts entries must be callables or one of {EXPERTS}; got {spec!r}")


def _train_ml(module: nn.Module, draw, k: int, num_steps: int, batch_size: int, lr: float,
              progress_bar: bool) -> None:
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    bar = tqdm(range(num_steps), desc=f"stage 1 (expert {k})", disable=not progress_bar)
    for step in bar:
        loss = -module().log_prob(draw(batch_size)).mean()
        if not torch.isfinite(loss):
            warnings.warn(f"expert {k}: non-finite loss at step {step}; stage 1 stops for it",
                          RuntimeWarning, stacklevel=3)
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(nll=f"{loss.item():.3f}")
    module.requires_grad_(False)
