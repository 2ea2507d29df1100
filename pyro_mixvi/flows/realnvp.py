"""RealNVP (affine coupling flow): a thin factory over :class:`zuko.flows.RealNVP`."""

from __future__ import annotations

from collections.abc import Sequence

import zuko

from mixvi._checks import check_flow_args
from pyro_mixvi.flows._bounded import bounded_affine


def RealNVP(  # noqa: N802 - the paper's acronym, as zuko and Pyro spell flow classes
    input_dim: int,
    *,
    context_dim: int = 0,
    num_transforms: int = 5,
    hidden_dims: Sequence[int] = (64, 64),
    max_log_scale: float | None = None,
) -> zuko.flows.Flow:
    r"""Build a (conditional) RealNVP flow over ``R^input_dim``.

    Each of the ``num_transforms`` layers keeps one half of the coordinates (the mask alternates
    between layers) and applies an affine map to the other half, with shift and log-scale from an
    MLP (``hidden_dims``) of the kept half and the context.

    .. math:: \log q(x \mid c) = \log \mathcal{N}(f(x; c); 0, I) + \log |\det \partial_x f(x; c)|

    Direction: zuko's ``flow(c).transform`` is ``f``, data to base; mixvi's forward map
    (base to latent) is ``flow(c).transform.inv``.

    Shapes:
        ``flow(c)`` with ``c`` of shape ``(..., context_dim)`` (or ``flow()`` when
        ``context_dim == 0``) is a torch ``Distribution`` with ``batch_shape == c.shape[:-1]`` and
        ``event_shape == (input_dim,)``; ``log_prob`` maps ``(..., input_dim)`` to ``(...)``.

    Args:
        input_dim: Dimension ``D`` of the modelled variable; at least 2 (a coupling needs two
            halves).
        context_dim: Dimension of the conditioning variable; 0 for an unconditional flow.
        num_transforms: Number of coupling layers; at least 1.
        hidden_dims: Widths of the coupling MLPs' hidden layers.
        max_log_scale: Soft bound on each layer's ``|log-scale|`` (``a / (1 + |a| / bound)``
            of the network output ``a``, zuko's clamp); None keeps zuko's default bound
            ``log(1000) = 6.9``. A tight bound (2) keeps the flow's tails from exploding where
            a variational fit pushes a scale to the clamp (eight schools' funnel neck).

    Returns:
        A :class:`zuko.flows.Flow` (an ``nn.Module``); calling it with the context returns a
        distribution with ``log_prob``, ``rsample`` and ``rsample_and_log_prob``.

    Cost:
        One network pass per layer in both directions: density and sampling are equally cheap.

    Example:
        >>> flow = RealNVP(4, num_transforms=6)
        >>> x = flow().rsample((100,))
        >>> flow().log_prob(x).shape
        torch.Size([100])

    Raises:
        ValueError: If ``input_dim < 2`` or another dimension or width is not a positive integer.

    References:
        Density estimation using Real NVP (Dinh et al., 2017). https://arxiv.org/abs/1605.08803
    """
    hidden = check_flow_args(input_dim, context_dim, num_transforms, hidden_dims, min_input_dim=2)
    return zuko.flows.RealNVP(
        int(input_dim), int(context_dim), transforms=int(num_transforms), hidden_features=hidden,
        **bounded_affine(max_log_scale),
    )
