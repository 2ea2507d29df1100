r"""Product-of-experts subset posteriors and their NUTS sampler (torch).

For observed modalities ``S`` with unimodal posteriors ``q_j(z|x_j)`` fitted to one joint
posterior under the prior ``p(z)``, the subset posterior is

.. math:: p(z | X_S) \propto \prod_{j \in S} q_j(z | x_j) \,/\, p(z)^{|S| - 1},

which is exact when each ``q_j`` is the true ``p(z|x_j)`` and the modalities are conditionally
independent given ``z``. The power ``|S| - 1`` matters: MultiVae's ``main`` divides once, which is
wrong for ``|S| > 2`` (``tests/pyro/test_jnf_poe.py`` pins ours).

Contents:
    :func:`product_of_experts_log_prob` — the unnormalized log-density above.
    :func:`gaussian_product_of_experts` — closed form for diagonal Gaussian experts times
    ``p(z)^{prior_power}`` (``prior_power = 1`` is MVAE's prior expert, ``-(|S|-1)`` the above).
    :func:`sample_product_of_experts` — Pyro NUTS with step-size and mass adaptation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import torch
from pyro.infer.mcmc import MCMC, NUTS
from torch import Tensor

__all__ = [
    "gaussian_product_of_experts",
    "product_of_experts_log_prob",
    "sample_product_of_experts",
]


def product_of_experts_log_prob(
    expert_log_probs: Sequence[Tensor], prior_log_prob: Tensor
) -> Tensor:
    r"""``Σ_{j∈S} log q_j(z|x_j) − (|S| − 1) log p(z)``, unnormalized.

    Shapes:
        Every input has the same (broadcastable) shape ``(...)``; so has the result.

    Args:
        expert_log_probs: ``log q_j(z|x_j)`` for the ``|S| >= 1`` observed modalities.
        prior_log_prob: ``log p(z)`` at the same points.

    Raises:
        ValueError: If no expert is given.
    """
    if len(expert_log_probs) == 0:
        raise ValueError("expert_log_probs must hold at least one observed modality; got none")
    total = expert_log_probs[0]
    for log_prob in expert_log_probs[1:]:
        total = total + log_prob
    return total - (len(expert_log_probs) - 1) * prior_log_prob


def gaussian_product_of_experts(
    locs: Sequence[Tensor], scales: Sequence[Tensor], *, prior_power: float
) -> tuple[Tensor, Tensor]:
    r"""Normalized ``Π_j N(μ_j, diag σ_j²) · N(0, I)^{prior_power}`` as ``(loc, scale)``.

    Precisions add: ``Λ = Σ_j σ_j^{-2} + prior_power``, ``μ = Λ^{-1} Σ_j σ_j^{-2} μ_j``.

    Shapes:
        Each ``locs[j]``, ``scales[j]``: ``(..., D)``; results ``(..., D)``.

    Args:
        locs: Expert means.
        scales: Expert standard deviations, positive.
        prior_power: ``1`` for MVAE's prior expert; ``-(len(locs) - 1)`` for the JNF subset rule.

    Raises:
        ValueError: If ``locs`` and ``scales`` differ in length or are empty, or if the
            resulting precision is not positive (the product is not normalizable).
    """
    if len(locs) == 0 or len(locs) != len(scales):
        raise ValueError(
            f"locs and scales must be non-empty and of equal length; got {len(locs)} and "
            f"{len(scales)}"
        )
    precisions = [scale.pow(-2) for scale in scales]
    precision = sum(precisions) + prior_power
    if not bool((precision > 0).all()):
        raise ValueError(
            "the product of experts has a non-positive precision (not normalizable); an expert "
            "is wider than the prior allows for prior_power={prior_power}"
        )
    loc = sum(p * m for p, m in zip(precisions, locs, strict=True)) / precision
    return loc, precision.rsqrt()


def sample_product_of_experts(
    log_prob_fn: Callable[[Tensor], Tensor],
    initial: Tensor,
    *,
    num_samples: int = 500,
    num_warmup: int = 300,
    max_tree_depth: int = 8,
    generator: torch.Generator | None = None,
    progress_bar: bool = False,
) -> Tensor:
    """Draw from ``B`` independent densities ``exp(log_prob_fn(z)[b])`` with Pyro's NUTS.

    Observations are batched: the potential is ``-log_prob_fn(z).sum()`` over a ``(B, D)`` latent,
    a block-diagonal target, so NUTS on it is an exact sampler of every ``p_b`` at once. The step
    size (dual averaging) and the diagonal mass matrix are adapted during warm-up; the mass matrix
    is per coordinate, hence per observation, but the step size and tree depth are shared by the
    batch, so the hardest observation sets them. Callers bound that coupling by passing chunks
    (``JNF.sample_posterior(..., chunk_size=...)``).

    Shapes:
        ``initial``: ``(B, D)``; ``log_prob_fn`` maps ``(B, D)`` to ``(B,)``. Returns
        ``(num_samples, B, D)``.

    Args:
        log_prob_fn: Unnormalized log-densities, differentiable in ``z``.
        initial: Starting points.
        num_samples: Draws kept after warm-up; at least 1.
        num_warmup: Adaptation steps (discarded).
        max_tree_depth: NUTS tree depth cap.
        generator: Source of randomness; Pyro's MCMC draws from the global torch RNG, so it is
            seeded from ``generator`` inside ``torch.random.fork_rng`` and restored afterwards.
        progress_bar: Show Pyro's MCMC progress bar.

    Raises:
        ValueError: On a non-``(B, D)`` ``initial`` or ``num_samples < 1``.
        FloatingPointError: If a draw is non-finite.
    """
    if initial.dim() != 2:
        raise ValueError(f"initial must have shape (B, D); got {tuple(initial.shape)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _nuts(
            log_prob_fn,
            initial.detach(),
            num_samples=num_samples,
            num_warmup=num_warmup,
            max_tree_depth=max_tree_depth,
            progress_bar=progress_bar,
        )


def _nuts(
    log_prob_fn: Callable[[Tensor], Tensor],
    initial: Tensor,
    *,
    num_samples: int,
    num_warmup: int,
    max_tree_depth: int,
    progress_bar: bool,
) -> Tensor:
    def potential_fn(params: dict[str, Tensor]) -> Tensor:
        return -log_prob_fn(params["z"]).sum()

    kernel = NUTS(
        potential_fn=potential_fn,
        adapt_step_size=True,
        adapt_mass_matrix=True,
        full_mass=False,
        max_tree_depth=max_tree_depth,
    )
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=num_warmup,
        initial_params={"z": initial},
        disable_progbar=not progress_bar,
    )
    with pyro.validation_enabled(False):
        mcmc.run()
    samples = mcmc.get_samples()["z"]
    if not bool(torch.isfinite(samples).all()):
        raise FloatingPointError("NUTS returned non-finite draws of the product of experts")
    return samples
