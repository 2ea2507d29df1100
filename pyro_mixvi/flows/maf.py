"""Masked autoregressive flow (MAF): a thin factory over :class:`zuko.flows.MAF`."""

from __future__ import annotations

from collections.abc import Sequence

import zuko

from mixvi._checks import check_flow_args
from pyro_mixvi.flows._bounded import bounded_affine


def MAF(  # noqa: N802 - the paper's acronym, as zuko and Pyro spell flow classes
    input_dim: int,
    *,
    context_dim: int = 0,
    num_transforms: int = 5,
    hidden_dims: Sequence[int] = (64, 64),
    max_log_scale: float | None = None,
) -> zuko.flows.Flow:
    r"""Build a (conditional) masked autoregressive flow over ``R^input_dim``.

    Each of the ``num_transforms`` layers is an affine autoregressive map whose shift and
    log-scale come from a MADE network (``hidden_dims``) over the preceding coordinates and the
    context; the variable order reverses between layers, so every coordinate conditions on every
    other one after two layers, in any dimension.

    .. math:: \log q(x \mid c) = \log \mathcal{N}(f(x; c); 0, I) + \log |\det \partial_x f(x; c)|

    Direction: zuko's ``flow(c).transform`` is ``f``, data to base (density direction); sampling
    applies ``f^{-1}``. mixvi's convention (forward = base to latent) is therefore
    ``flow(c).transform.inv``.

    Shapes:
        ``flow(c)`` with ``c`` of shape ``(..., context_dim)`` (or ``flow()`` when
        ``context_dim == 0``) is a torch ``Distribution`` with ``batch_shape == c.shape[:-1]`` and
        ``event_shape == (input_dim,)``; ``log_prob`` maps ``(..., input_dim)`` to ``(...)``.

    Args:
        input_dim: Dimension ``D`` of the modelled variable; at least 1.
        context_dim: Dimension of the conditioning variable; 0 for an unconditional flow.
        num_transforms: Number of autoregressive layers; at least 1.
        hidden_dims: Widths of the MADE hidden layers.
        max_log_scale: Soft bound on each layer's ``|log-scale|`` (``a / (1 + |a| / bound)``
            of the network output ``a``, zuko's clamp); None keeps zuko's default bound
            ``log(1000) = 6.9``. A tight bound (2) keeps the flow's tails from exploding where
            a variational fit pushes a scale to the clamp (eight schools' funnel neck).

    Returns:
        A :class:`zuko.flows.Flow` (an ``nn.Module``); calling it with the context returns a
        distribution with ``log_prob``, ``rsample`` and ``rsample_and_log_prob``.

    Cost:
        ``log_prob`` is one network pass per layer. Sampling inverts each layer by ``D``
        sequential passes (``O(D)`` network calls per layer): cheap density, slow sampling.

    Example:
        >>> flow = MAF(5, context_dim=3, num_transforms=4)
        >>> c = torch.randn(10, 3)
        >>> x, log_q = flow(c).rsample_and_log_prob()
        >>> x.shape, log_q.shape
        (torch.Size([10, 5]), torch.Size([10]))

    Raises:
        ValueError: If a dimension, the layer count or a hidden width is not a positive integer.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017).
        https://arxiv.org/abs/1705.07057
    """
    hidden = check_flow_args(input_dim, context_dim, num_transforms, hidden_dims)
    return zuko.flows.MAF(
        int(input_dim), int(context_dim), transforms=int(num_transforms), hidden_features=hidden,
        **bounded_affine(max_log_scale),
    )
