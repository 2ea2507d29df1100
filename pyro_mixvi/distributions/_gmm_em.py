"""EM for a Gaussian mixture: the paper's pre-training that seeds a ClassifierWeightedMixture."""

from __future__ import annotations

import math

import torch


def _component_log_prob(samples, locs, scales, covariance):  # noqa: ANN001, ANN202
    """``log N(x_n; loc_k, S_k)``: ``(N, D)`` to ``(N, K)``."""
    if covariance == "diag":
        z = (samples[:, None, :] - locs) / scales
        log_det = scales.log().sum(-1)
    else:
        centred = (samples[:, None, :] - locs).unsqueeze(-1)
        z = torch.linalg.solve_triangular(scales, centred, upper=False).squeeze(-1)
        log_det = scales.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * z.pow(2).sum(-1) - log_det - 0.5 * samples.shape[-1] * math.log(2 * math.pi)


def gaussian_mixture_em(
    samples: torch.Tensor,
    num_components: int,
    *,
    covariance: str,
    num_steps: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit a ``K``-component Gaussian mixture to ``samples (N, D)`` by ``num_steps`` EM steps.

    Starts from ``K`` distinct random data points as means, the data variance as every
    component's variance and uniform weights (as the reference code does). A variance floor of
    ``1e-6`` times the data variance keeps a component from collapsing onto one point.

    Returns:
        ``weights (K,)``, ``locs (K, D)`` and ``scales``: ``(K, D)`` standard deviations
        (``covariance="diag"``) or ``(K, D, D)`` Cholesky factors (``"full"``).
    """
    num_samples, dim = samples.shape
    index = torch.randperm(num_samples, generator=generator)[:num_components]
    locs = samples[index.to(samples.device)].clone()
    data_var = samples.var(0)
    floor = 1e-6 * data_var
    if covariance == "diag":
        scales = data_var.sqrt().expand(num_components, dim).clone()
    else:
        scales = torch.diag_embed(data_var.sqrt()).expand(num_components, dim, dim).clone()
    log_weights = samples.new_full((num_components,), -math.log(num_components))
    tiny = torch.finfo(samples.dtype).tiny
    for _ in range(num_steps):
        log_joint = _component_log_prob(samples, locs, scales, covariance) + log_weights
        resp = torch.softmax(log_joint, -1)  # (N, K)
        mass = resp.sum(0).clamp_min(tiny)  # (K,)
        log_weights = (mass / num_samples).log()
        locs = resp.T @ samples / mass[:, None]
        centred = samples[:, None, :] - locs  # (N, K, D)
        if covariance == "diag":
            var = (resp[..., None] * centred.pow(2)).sum(0) / mass[:, None]
            scales = (var + floor).sqrt()
        else:
            cov = torch.einsum("nk,nki,nkj->kij", resp, centred, centred) / mass[:, None, None]
            scales = torch.linalg.cholesky(cov + torch.diag_embed(floor))
    weights = log_weights.exp()
    if not (torch.isfinite(locs).all() and torch.isfinite(scales).all()):
        raise FloatingPointError("Gaussian-mixture EM produced non-finite parameters")
    return weights / weights.sum(), locs, scales
