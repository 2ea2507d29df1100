r"""Semi-implicit Gaussian family and its importance-sampled score (private SIVI math, torch).

The family is :math:`q(z) = \int \mathcal{N}(z; \mu_\phi(\epsilon),
\mathrm{diag}\,\sigma_\phi(\epsilon)^2) \, \mathcal{N}(\epsilon; 0, I_m)\, d\epsilon`. Its density
and score are intractable; with proposal draws :math:`\epsilon_j \sim \tau(\cdot \mid \tilde z)`,
:math:`j = 1..k`, and log-weights
:math:`r_j = \log p(\epsilon_j) + \log q(z \mid \epsilon_j) - \log \tau(\epsilon_j \mid \tilde z)`,

.. math::
    \log \hat q(z) = \operatorname{logsumexp}_j r_j - \log k, \qquad
    \hat s(z) = \sum_j \bar w_j \frac{\mu_\phi(\epsilon_j) - z}{\sigma_\phi(\epsilon_j)^2},
    \quad \bar w = \operatorname{softmax}(r).

The conditioning point :math:`\tilde z = z` is **detached** (Pielok et al. 2025, Thm. on
unbiasedness holds for fixed :math:`\tilde z`); the reference code differentiates through the
proposal's context and so adds a term that does not vanish as :math:`k \to \infty`.
Everything here runs under ``torch.no_grad`` in chunks of draws, so memory is
``O(chunk_size * N * (m + D))`` whatever ``k`` is.

Four choices keep training stable at the learning rates ``AutoNormal`` takes (measured on
centered eight schools, Adam lr 1e-2 and 3e-2; without them the fit diverges):

* the mixing network's output is multiplied by :func:`output_multiplier` ``= 1 / fan_in`` of
  its last layer, so one Adam step moves ``mu(eps)`` by ``O(lr)``, as it moves ``AutoNormal``'s
  location (at the price of a slowly learning network, see :func:`output_multiplier`);
* its hidden layers are stored divided by :func:`hidden_multiplier` ``= 1 / sqrt(fan_in)``, so
  one Adam step changes each by ``lr`` relative, not by ``lr * sqrt(fan_in)``: this is what
  lets the network start away from its Gaussian saddle (``init_mixing_fraction = 0.5``) on
  funnels at lr 3e-2;
* the flow proposal is conditioned on the standardized point ``(z - loc) / sigma`` (the
  generator's global location and scale, detached) and starts as the prior (zero last layers);
* during training the draw's own ``eps`` takes one of the ``k`` slots for either proposal (see
  :func:`importance_score`): the weights stay bounded when the proposal misses ``q(eps | z)``,
  and the loss becomes an upper bound on ``log q`` (Sobolev & Vetrov 2019), so the reported
  ELBO is a lower bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.score_parts import ScoreParts
from torch import nn
from torch.nn.functional import softplus

__all__ = [
    "ConditionalNormalGenerator",
    "SemiImplicitNormal",
    "importance_score",
    "hidden_multiplier",
    "output_multiplier",
]


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


SPREAD_INIT_DRAWS = 4096


def output_multiplier(fan_in: int) -> float:
    """Factor on the mixing network's output: ``1 / fan_in`` of its last layer.

    With Adam every last-layer weight moves by about ``lr`` per step, so the output moves by
    ``O(lr * fan_in * multiplier)``: ``1 / fan_in`` keeps that at ``O(lr)``, as ``loc`` moves
    (without it SVI diverges on centered eight schools at lr 1e-2 to 3e-2; ``1 / sqrt(fan_in)``
    diverged there at lr 3e-2 in one of four runs: a gradient spike moves every weight by
    ``~30 lr``). The network's slow start on the 2-D toys comes from a zero last layer, not from
    this factor (see ``init_mixing_fraction`` of :class:`ConditionalNormalGenerator`).
    """
    return 1.0 / fan_in


def hidden_multiplier(fan_in: int) -> float:
    """Factor on a hidden layer's weight and bias: ``1 / sqrt(fan_in)`` (NTK parametrization).

    Adam moves every parameter by about ``lr`` per step whatever its size. torch's default
    init gives a hidden weight the size ``1 / sqrt(fan_in)`` (0.09 at width 128), so at lr 3e-2
    one step changed it by a third of itself; once the last layer is non-zero
    (``init_mixing_fraction > 0``) the hidden features, and with them ``mu(eps)``, jumped every
    step. On centered eight schools at lr 3e-2 (fraction 0.5, seed 0) the spread of ``mu(eps)``
    grew to 10-20 in every coordinate and SVI went non-finite by step ~900; scaling only the
    flow proposal's learning rate by 0.1 did not help. Stored divided by this factor (same
    initial function), a step moves a hidden weight by about ``lr`` of its own size: the same
    fits stay finite and end at least as good as ``AutoNormal`` in log evidence (3 seeds).
    """
    return 1.0 / math.sqrt(fan_in)


class ScaledLinear(nn.Linear):
    """``nn.Linear`` with weight and bias stored divided by :func:`hidden_multiplier`.

    Initialized as ``nn.Linear`` (so the layer computes the same function at start); only the
    parameters Adam sees are larger, so each step changes the layer by ``lr`` relative.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.multiplier = hidden_multiplier(in_features)
        with torch.no_grad():
            self.weight /= self.multiplier
            self.bias /= self.multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.multiplier, self.bias * self.multiplier)


class ConditionalNormalGenerator(nn.Module):
    r"""The conditional :math:`q(z \mid \epsilon) = \mathcal{N}(\mu(\epsilon), \sigma(\epsilon)^2)`.

    ``mu(eps) = loc + MLP(eps) * c`` and ``sigma = softplus(raw_scale [+ MLP_scale(eps) * c])``,
    with ``c = output_multiplier(fan_in)`` of the last layer (see :func:`output_multiplier`);
    the hidden layers are :class:`ScaledLinear` (see :func:`hidden_multiplier`).
    At initialization ``q`` has mean ``loc`` and per-coordinate variance ``init_scale^2``, of
    which the fraction ``init_mixing_fraction`` is the spread of ``mu(eps)`` (a random last
    layer, rescaled on 4096 draws of ``eps``) and the rest ``sigma^2``. With fraction 0 the
    last layer is zero and ``q = N(loc, init_scale^2 I)``: a saddle of the ELBO (all
    ``mu(eps)`` equal, ``z`` independent of ``eps``, so every last-layer weight gets the
    gradient ``E[g] E[h(eps)]`` and they move together); the network leaves it only by noise
    (banana, 800 steps: ELBO -0.68, a Gaussian's, vs -0.04 from fraction 0.5).

    Shapes:
        ``forward(eps)`` maps ``(..., m)`` to ``((..., D), (..., D))``.

    Args:
        mixing_dim: ``m``, the size of the mixing noise.
        init_loc: ``(D,)`` initial location; fixes the dtype and device.
        hidden_dims: Hidden widths of the ReLU MLP; empty means ``mu`` is affine in ``eps``.
        init_scale: Initial ``sigma``; positive.
        conditional_scale: If true, ``sigma`` depends on ``eps`` too; else it is one global
            diagonal (as in the reference experiments).
        init_mixing_fraction: In ``[0, 1)``: the share of the initial variance carried by the
            spread of ``mu(eps)``; ignored without hidden layers (affine ``mu`` starts at 0).
    """

    def __init__(
        self,
        mixing_dim: int,
        init_loc: torch.Tensor,
        hidden_dims: Sequence[int],
        *,
        init_scale: float,
        conditional_scale: bool = False,
        init_mixing_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        latent_dim = init_loc.shape[-1]
        self.conditional_scale = conditional_scale
        widths = [mixing_dim, *hidden_dims]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [ScaledLinear(fan_in, fan_out), nn.ReLU()]
        out = nn.Linear(widths[-1], latent_dim * (2 if conditional_scale else 1))
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out).to(dtype=init_loc.dtype, device=init_loc.device)
        self.output_multiplier = output_multiplier(widths[-1])
        fraction = init_mixing_fraction if hidden_dims else 0.0
        if fraction > 0:
            self._init_spread(mixing_dim, latent_dim, init_scale * math.sqrt(fraction))
        self.loc = nn.Parameter(init_loc.detach().clone())
        self.raw_scale = nn.Parameter(
            torch.full_like(init_loc, _inverse_softplus(init_scale * math.sqrt(1 - fraction)))
        )

    @torch.no_grad()
    def _init_spread(self, mixing_dim: int, latent_dim: int, spread: float) -> None:
        """Random ``mu`` rows of the last layer, so ``mu(eps) - loc`` has mean 0 and sd ``spread``.

        Uses the global torch RNG, as ``nn.Linear``'s own initialization does.
        """
        out = self.net[-1]
        nn.init.normal_(out.weight[:latent_dim])
        eps = out.weight.new_empty((SPREAD_INIT_DRAWS, mixing_dim)).normal_()
        raw_sd = self.net(eps)[:, :latent_dim].std(0) * self.output_multiplier
        out.weight[:latent_dim] *= (spread / raw_sd).unsqueeze(-1)
        out.bias[:latent_dim] -= self.net(eps)[:, :latent_dim].mean(0)

    def forward(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(eps) * self.output_multiplier
        latent_dim = self.loc.shape[-1]
        loc = self.loc + out[..., :latent_dim]
        raw_scale = self.raw_scale
        if self.conditional_scale:
            raw_scale = raw_scale + out[..., latent_dim:]
        return loc, softplus(raw_scale).expand_as(loc)


class StandardizedProposal:
    r"""Proposal :math:`\tau(\epsilon \mid z) = \mathrm{flow}(\epsilon \mid (z - loc) / \sigma)`.

    ``loc`` and ``sigma`` are the generator's global location and scale, read (detached) at each
    call, so the flow sees contexts of order one whatever the posterior's location and scale; for
    fixed generator parameters this is still a function of ``z`` alone, as importance sampling
    needs.

    Args:
        flow: Conditional flow over ``eps`` with context size ``D`` (zuko-style).
        generator: A :class:`ConditionalNormalGenerator`.
    """

    def __init__(self, flow: nn.Module, generator: ConditionalNormalGenerator) -> None:
        self.flow, self.generator = flow, generator

    def __call__(self, z: torch.Tensor) -> torch.distributions.Distribution:
        loc = self.generator.loc.detach()
        scale = softplus(self.generator.raw_scale.detach())
        return self.flow((z - loc) / scale)


def _log_prior(eps, mixing_dim):
    return -0.5 * (eps**2).sum(-1) - 0.5 * mixing_dim * math.log(2 * math.pi)


def _log_ratio(eps, z, proposal, mixing_dim):
    """``log p(eps) - log tau(eps | z)`` at given draws (0 for the prior proposal)."""
    if proposal is None:
        return 0.0
    return _log_prior(eps, mixing_dim) - proposal(z).log_prob(eps)


def _chunk_log_weights(z, generator, proposal, mixing_dim, num_draws):
    """``num_draws`` proposal draws per point: log-weights ``(num_draws, N)`` and scores."""
    if proposal is None:
        eps = z.new_empty((num_draws, z.shape[0], mixing_dim)).normal_()
        log_ratio = 0.0  # log p(eps) - log tau(eps | z) = 0 for tau = p
    else:
        eps, log_tau = proposal(z).rsample_and_log_prob((num_draws,))
        log_ratio = _log_prior(eps, mixing_dim) - log_tau
    return _log_weights_at(z, generator, eps, log_ratio)


def _log_weights_at(z, generator, eps, log_ratio):
    """Log-weights ``log q(z | eps) + log_ratio`` and conditional scores at draws ``eps``."""
    loc, scale = generator(eps)
    diff = z - loc
    log_cond = (
        -0.5 * (diff / scale).pow(2) - scale.log() - 0.5 * math.log(2 * math.pi)
    ).sum(-1)
    return log_cond + log_ratio, -diff / scale.pow(2)


def importance_score(
    z: torch.Tensor,
    generator: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    proposal: Callable[[torch.Tensor], torch.distributions.Distribution] | None,
    *,
    mixing_dim: int,
    num_importance_samples: int,
    chunk_size: int | None = None,
    own_mixing: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Self-normalized importance estimates of :math:`\log q(z)` and :math:`\nabla_z \log q(z)`.

    Shapes:
        ``z`` is ``(..., D)``; returns ``log_q (...)`` and ``score (..., D)``.

    Args:
        z: Points at which to estimate; detached here (the proposal's context is not
            differentiated).
        generator: ``eps -> (loc, scale)`` of ``q(z | eps)``.
        proposal: ``z -> tau(. | z)`` (a conditional flow with ``rsample_and_log_prob``), or
            ``None`` for the prior ``N(0, I_m)`` (BSIVI).
        mixing_dim: ``m``.
        num_importance_samples: ``k >= 1``.
        chunk_size: Draws per chunk (default ``k``). Chunks are merged exactly: the result equals
            the single-shot estimator with ``k`` draws.
        own_mixing: ``(..., m)``, the ``eps`` that generated each ``z`` (a draw from
            ``q(eps | z)``). It replaces one of the ``k`` draws, with the same weight formula as
            the proposal draws: with the prior this is the SIVI bound of Yin & Zhou 2018 (the
            reference ``bsivi``), with a flow the importance-weighted hierarchical bound of
            Sobolev & Vetrov 2019. Either way ``E log_q >= log q`` (biased *high*, by ``O(1/k)``),
            the weights stay bounded when the proposal misses ``q(eps | z)`` (training stays
            stable), and the score is unchanged in expectation when ``tau = q(eps | z)``.

    Cost:
        ``k`` generator (and proposal) passes per point, no autograd graph.

    Bias:
        ``log_q`` is biased low by Jensen (``E log q_hat <= log q``), by ``O(1/k)``; ``score`` is a
        ratio estimator, consistent, with ``O(1/k)`` bias, exact in expectation when ``tau``
        equals ``q(eps | z)``.
    """
    if num_importance_samples < 1:
        raise ValueError(f"num_importance_samples must be >= 1; got {num_importance_samples}")
    chunk_size = num_importance_samples if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    batch_shape = z.shape[:-1]
    num_fresh = num_importance_samples - (own_mixing is not None)
    with torch.no_grad():
        flat = z.detach().reshape(-1, z.shape[-1])
        log_total = flat.new_full(flat.shape[:1], -math.inf)
        score = torch.zeros_like(flat)
        starts = list(range(0, num_fresh, chunk_size))
        if own_mixing is not None:
            starts = [-1, *starts]
        for index, start in enumerate(starts):
            if start < 0:
                eps = own_mixing.detach().reshape(1, -1, mixing_dim)
                log_ratio = _log_ratio(eps, flat, proposal, mixing_dim)
                log_w, grads = _log_weights_at(flat, generator, eps, log_ratio)
            else:
                num_draws = min(chunk_size, num_fresh - start)
                log_w, grads = _chunk_log_weights(flat, generator, proposal, mixing_dim, num_draws)
            chunk_total = torch.logsumexp(log_w, 0)
            new_total = torch.logaddexp(log_total, chunk_total)
            chunk_score = (torch.softmax(log_w, 0).unsqueeze(-1) * grads).sum(0)
            old_weight = torch.exp(log_total - new_total).unsqueeze(-1) if index else 0.0
            new_weight = torch.exp(chunk_total - new_total).unsqueeze(-1)
            score = old_weight * score + new_weight * chunk_score
            log_total = new_total
        log_q = log_total - math.log(num_importance_samples)
    return log_q.reshape(batch_shape), score.reshape(z.shape)


class SemiImplicitNormal(TorchDistribution):
    r"""Semi-implicit Gaussian :math:`q(z) = E_{\epsilon} N(z; \mu(\epsilon), \sigma(\epsilon)^2)`.

    ``rsample`` is exact and reparameterized. ``log_prob(z)`` is the importance-sampled
    estimate :math:`\log \hat q(z)`: biased low by ``O(1/k)`` at an arbitrary ``z``, biased high
    at a ``z`` this instance drew (its own ``eps`` joins the ``k`` draws; see
    :func:`importance_score`), so ELBO, log evidence and k-hat from guide draws are conservative
    whose **gradient** is the path-gradient surrogate: :math:`\hat s(z)` with respect to ``z`` and
    zero with respect to the parameters at fixed ``z`` (sticking the landing). So any ELBO that
    differentiates ``log_prob`` or ``score_parts`` gets the SIVI path gradient.

    ``score_parts(z)``, for a ``z`` this instance drew, also carries the proposal's forward-KL
    surrogate ``-log tau(eps | z) + stop_grad(...)`` (value 0), so ``Trace_ELBO``-style
    estimators train a flow proposal jointly.

    Shapes:
        ``sample(sample_shape)`` is ``sample_shape + batch_shape + (D,)``;
        ``log_prob`` maps ``(..., D)`` to ``(...)``.

    Args:
        generator: ``eps -> (loc, scale)``, e.g. :class:`ConditionalNormalGenerator`.
        proposal: Conditional flow ``z -> tau(. | z)`` over ``eps`` (zuko-style), or ``None``
            for the prior.
        mixing_dim: ``m``.
        latent_dim: ``D``.
        num_importance_samples: ``k`` for ``log_prob``; at least 1.
        chunk_size: Importance draws per chunk (memory bound); default ``k``.
        prototype: A tensor that fixes dtype and device of draws.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        generator: nn.Module,
        proposal: nn.Module | None,
        *,
        mixing_dim: int,
        latent_dim: int,
        num_importance_samples: int,
        chunk_size: int | None = None,
        proposal_batch_size: int = 0,
        prototype: torch.Tensor,
        batch_shape: tuple[int, ...] = (),
        validate_args: bool | None = None,
    ) -> None:
        if num_importance_samples < 1:
            raise ValueError(f"num_importance_samples must be >= 1; got {num_importance_samples}")
        self.generator, self.proposal = generator, proposal
        self.mixing_dim, self.latent_dim = int(mixing_dim), int(latent_dim)
        self.num_importance_samples, self.chunk_size = int(num_importance_samples), chunk_size
        self.proposal_batch_size = int(proposal_batch_size)
        self._prototype = prototype
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(torch.Size(batch_shape), torch.Size([latent_dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None) -> SemiImplicitNormal:
        return SemiImplicitNormal(
            self.generator,
            self.proposal,
            mixing_dim=self.mixing_dim,
            latent_dim=self.latent_dim,
            num_importance_samples=self.num_importance_samples,
            chunk_size=self.chunk_size,
            proposal_batch_size=self.proposal_batch_size,
            prototype=self._prototype,
            batch_shape=torch.Size(batch_shape),
        )

    def rsample_with_mixing(self, sample_shape=()) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint draw ``(z, eps)``: ``eps ~ N(0, I_m)``, ``z = mu(eps) + sigma(eps) * u``."""
        shape = torch.Size(sample_shape) + self.batch_shape
        eps = self._prototype.new_empty(shape + (self.mixing_dim,)).normal_()
        loc, scale = self.generator(eps)
        z = loc + scale * torch.randn_like(loc)
        return z, eps

    def rsample(self, sample_shape=()) -> torch.Tensor:
        z, eps = self.rsample_with_mixing(sample_shape)
        self._cache = (z, eps)
        return z

    def importance_score(
        self, value: torch.Tensor, own_mixing: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_q_hat, score)`` at ``value``, without an autograd graph."""
        log_q, score = importance_score(
            value,
            self.generator,
            self.proposal,
            mixing_dim=self.mixing_dim,
            num_importance_samples=self.num_importance_samples,
            chunk_size=self.chunk_size,
            own_mixing=own_mixing,
        )
        if not bool(torch.isfinite(log_q).all()):
            raise FloatingPointError(
                "SemiImplicitNormal: the importance estimate of log q(z) is not finite; the "
                "generator or proposal produced non-finite values (lower the learning rate)."
            )
        return log_q, score

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        # At a draw of this instance its own eps takes one of the k slots (as NumPyro's guide
        # does through the site's intermediates): log q is then biased high, so ELBO, log
        # evidence and k-hat computed from guide draws err on the conservative side.
        return self._surrogate_log_prob(value, self._own_mixing(value))

    def _surrogate_log_prob(self, value, own_mixing):
        log_q, score = self.importance_score(value, own_mixing)
        if not value.requires_grad:
            return log_q
        return log_q + (score * (value - value.detach())).sum(-1)

    def _own_mixing(self, value: torch.Tensor) -> torch.Tensor | None:
        if self._cache is None or self._cache[0] is not value:
            return None
        return self._cache[1]

    def proposal_loss(self, value: torch.Tensor) -> torch.Tensor | None:
        """Forward-KL loss of the proposal for the draws ``value`` of this instance.

        The mean of ``-log tau(eps | z)`` over the pair this instance drew and
        ``proposal_batch_size`` fresh pairs ``eps ~ N(0, I_m)``, ``z ~ q(z | eps)`` per draw
        (generator detached: no graph to the guide's parameters, and the context ``z`` is
        detached as the paper's estimator needs). ``None`` for other values or the prior.

        Shapes:
            ``value`` is ``batch_shape + (D,)``; returns ``batch_shape``.
        """
        eps = self._own_mixing(value)
        if self.proposal is None or eps is None:
            return None
        eps, z = eps.detach().unsqueeze(0), value.detach().unsqueeze(0)
        if self.proposal_batch_size:
            with torch.no_grad():
                fresh_eps = eps.new_empty(
                    (self.proposal_batch_size, *eps.shape[1:])
                ).normal_()
                loc, scale = self.generator(fresh_eps)
                fresh_z = loc + scale * torch.randn_like(loc)
            eps, z = torch.cat([eps, fresh_eps]), torch.cat([z, fresh_z])
        return -self.proposal(z).log_prob(eps).mean(0)

    def score_parts(self, value: torch.Tensor) -> ScoreParts:
        log_prob = self._surrogate_log_prob(value, self._own_mixing(value))
        entropy_term = log_prob
        if torch.is_grad_enabled():
            nll = self.proposal_loss(value)
            if nll is not None:
                entropy_term = entropy_term + (nll - nll.detach())
        return ScoreParts(log_prob=log_prob, score_function=0, entropy_term=entropy_term)
