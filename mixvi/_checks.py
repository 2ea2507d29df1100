"""Backend-free argument checks for both backends' flows and guides, so each one says the same."""

from __future__ import annotations

from collections.abc import Sequence


def check_flow_args(
    input_dim: int,
    context_dim: int,
    num_transforms: int,
    hidden_dims: Sequence[int],
    *,
    min_input_dim: int = 1,
) -> tuple[int, ...]:
    """Validate the keywords every flow factory shares; return ``hidden_dims`` as a tuple.

    Raises:
        ValueError: Naming the first bad argument and the accepted range.
    """
    if int(input_dim) != input_dim or input_dim < min_input_dim:
        raise ValueError(f"input_dim must be an integer >= {min_input_dim}; got {input_dim}")
    if int(context_dim) != context_dim or context_dim < 0:
        raise ValueError(f"context_dim must be an integer >= 0; got {context_dim}")
    if int(num_transforms) != num_transforms or num_transforms < 1:
        raise ValueError(f"num_transforms must be an integer >= 1; got {num_transforms}")
    hidden = tuple(hidden_dims)
    if not hidden or any(int(h) != h or h < 1 for h in hidden):
        raise ValueError(
            f"hidden_dims must be a non-empty sequence of positive ints; got {hidden_dims}"
        )
    return tuple(int(h) for h in hidden)


def check_positive_int(name: str, value: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer (not a bool) >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def check_flow_layers(flow_layers: int, input_dim: int | None = None) -> None:
    """Raise ``ValueError`` unless ``flow_layers`` is an integer >= 0 that ``input_dim`` allows.

    Flow components are coupling flows, which split the coordinates in two: they need
    ``input_dim >= 2``. ``input_dim=None`` (not known yet) checks ``flow_layers`` alone.
    """
    if isinstance(flow_layers, bool) or not isinstance(flow_layers, int) or flow_layers < 0:
        raise ValueError(
            f"flow_layers must be an integer >= 0 (0: affine components); got {flow_layers!r}"
        )
    if flow_layers > 0 and input_dim is not None and input_dim < 2:
        raise ValueError(
            f"flow_layers={flow_layers} needs a latent dimension >= 2 (a coupling flow splits "
            f"the coordinates in two); got dimension {input_dim}: use flow_layers=0"
        )
