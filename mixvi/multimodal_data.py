"""Offline multimodal data sets for the JNF benchmarks (numpy only; nothing is downloaded).

Two builders, shared by both backends:

* :func:`make_paired_digits` pairs *different* instances of the same class from scikit-learn's
  8×8 digits (shipped with the package) and shows each modality through its own transformation,
  so the modalities share only the digit class.
* :func:`make_circles_squares` is the JNF paper's toy set: modality 0 shows a square, modality 1 a
  circle; both are empty (outline) or full together, their sizes are drawn independently. The
  shared information is "empty or full"; the size is modality-specific.

Both return a :class:`MultimodalData` with ``modalities`` (a tuple of ``(N, d_j)`` float arrays in
``[0, 1]``) and integer ``labels`` ``(N,)`` (the shared class).

Example:
    >>> data = make_paired_digits(num_modalities=3, split="train", seed=0)
    >>> [x.shape[1] for x in data.modalities], data.labels.shape[0] == data.modalities[0].shape[0]
    ([64, 64, 64], True)
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

__all__ = ["MultimodalData", "make_circles_squares", "make_paired_digits", "DIGIT_VIEWS"]


class MultimodalData(NamedTuple):
    """Paired modalities and their shared class label.

    Attributes:
        modalities: ``M`` arrays of shape ``(N, d_j)``, values in ``[0, 1]``.
        labels: ``(N,)`` integer class shared by the ``M`` views of each row.
    """

    modalities: tuple[np.ndarray, ...]
    labels: np.ndarray


def _identity(image: np.ndarray) -> np.ndarray:
    return image


def _rotate_invert(image: np.ndarray) -> np.ndarray:
    return 1.0 - np.rot90(image, k=1, axes=(-2, -1))


def _flip_transpose(image: np.ndarray) -> np.ndarray:
    return np.swapaxes(image[..., ::-1, :], -1, -2)


def _upside_down_invert(image: np.ndarray) -> np.ndarray:
    return 1.0 - image[..., ::-1, ::-1]


#: The transformation applied to each digit modality, in order (at most four modalities).
DIGIT_VIEWS = (_identity, _rotate_invert, _flip_transpose, _upside_down_invert)


def make_paired_digits(
    *,
    num_modalities: int = 2,
    split: Literal["train", "test"] = "train",
    num_pairs: int | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> MultimodalData:
    """Paired views of scikit-learn's 8×8 digits that share only the class.

    The 1797 images are split once (by ``seed``) into disjoint train and test pools. Each row
    takes a class, then for each modality an independently drawn image of that class from the
    pool, transformed by ``DIGIT_VIEWS[j]`` (identity, 90° rotation + inversion, flip+transpose,
    180° rotation + inversion) and flattened to 64 pixels scaled to ``[0, 1]``.

    Shapes:
        ``modalities[j]``: ``(num_pairs, 64)``; ``labels``: ``(num_pairs,)``.

    Args:
        num_modalities: ``M`` in ``1..4``.
        split: Which pool to draw instances from.
        num_pairs: Rows to build; default the size of the pool.
        test_fraction: Share of images in the test pool, in ``(0, 1)``.
        seed: Seed of the split and of the pairing (the library otherwise never seeds).

    Raises:
        ValueError: On ``num_modalities`` outside ``1..4``, an unknown ``split``,
            ``test_fraction`` outside ``(0, 1)`` or ``num_pairs < 1``.
    """
    from sklearn.datasets import load_digits

    if not 1 <= num_modalities <= len(DIGIT_VIEWS):
        raise ValueError(f"num_modalities must be in 1..{len(DIGIT_VIEWS)}; got {num_modalities}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    digits = load_digits()
    images, targets = digits.images / 16.0, digits.target
    order = np.random.default_rng(seed).permutation(len(targets))
    num_test = int(round(test_fraction * len(targets)))
    pool = order[:num_test] if split == "test" else order[num_test:]
    num_pairs = len(pool) if num_pairs is None else num_pairs
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1; got {num_pairs}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = targets[rng.choice(pool, size=num_pairs)]
    by_class = {c: pool[targets[pool] == c] for c in np.unique(targets[pool])}
    modalities = []
    for view in DIGIT_VIEWS[:num_modalities]:
        picks = np.array([rng.choice(by_class[c]) for c in labels])
        modalities.append(view(images[picks]).reshape(num_pairs, -1).astype(np.float64))
    return MultimodalData(tuple(modalities), labels.astype(np.int64))


def _shape_mask(grid: np.ndarray, radius: np.ndarray, *, square: bool, full: bool) -> np.ndarray:
    xx, yy = grid
    r = radius[:, None, None]
    distance = np.maximum(np.abs(xx), np.abs(yy)) if square else np.sqrt(xx**2 + yy**2)
    if full:
        return (distance <= r).astype(np.float64)
    thickness = 0.25
    return (np.abs(distance - r) <= thickness / 2).astype(np.float64)


def make_circles_squares(
    *, num_pairs: int = 1000, image_size: int = 16, seed: int = 0
) -> MultimodalData:
    """The JNF paper's toy set: squares (modality 0) and circles (modality 1), empty or full.

    Each row draws a class ``c`` (0 = empty outline, 1 = full shape) shared by both modalities,
    and an independent radius in ``[0.3, 0.9]`` per modality (modality-specific information).
    Images are binary on a ``[-1, 1]^2`` grid, flattened.

    Shapes:
        ``modalities[j]``: ``(num_pairs, image_size**2)``; ``labels``: ``(num_pairs,)``.

    Args:
        num_pairs: Rows to build; at least 1.
        image_size: Side of the square images, at least 4 pixels.
        seed: Seed of the draw.

    Raises:
        ValueError: If ``num_pairs < 1`` or ``image_size < 4``.
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1; got {num_pairs}")
    if image_size < 4:
        raise ValueError(f"image_size must be >= 4; got {image_size}")
    rng = np.random.default_rng(seed)
    axis = np.linspace(-1.0, 1.0, image_size)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"))
    labels = rng.integers(0, 2, size=num_pairs)
    modalities = []
    for square in (True, False):
        radius = rng.uniform(0.3, 0.9, size=num_pairs)
        images = np.where(
            labels[:, None, None] == 1,
            _shape_mask(grid, radius, square=square, full=True),
            _shape_mask(grid, radius, square=square, full=False),
        )
        modalities.append(images.reshape(num_pairs, -1))
    return MultimodalData(tuple(modalities), labels.astype(np.int64))
