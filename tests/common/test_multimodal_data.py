"""Offline multimodal data sets (mixvi.multimodal_data)."""

import numpy as np
import pytest

from mixvi.multimodal_data import DIGIT_VIEWS, make_circles_squares, make_paired_digits


def test_paired_digits_share_only_the_class():
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = make_paired_digits(num_modalities=3, num_pairs=50, seed=0)
    assert [x.shape for x in data.modalities] == [(50, 64)] * 3
    images = digits.images / 16.0
    for j, x in enumerate(data.modalities):
        assert 0.0 <= x.min() and x.max() <= 1.0
        # Every row of modality j is view j of some digit image of the row's class.
        views = DIGIT_VIEWS[j](images).reshape(len(images), -1)
        for row in range(10):
            match = np.flatnonzero(np.abs(views - x[row]).max(1) < 1e-12)
            assert match.size and (digits.target[match] == data.labels[row]).all()
    # Different instances: the two views rarely come from the same image.
    same = [
        np.abs(
            DIGIT_VIEWS[1](data.modalities[0][r].reshape(8, 8)).ravel() - data.modalities[1][r]
        ).max()
        < 1e-12
        for r in range(50)
    ]
    assert sum(same) < 10


def test_paired_digits_train_and_test_pools_are_disjoint():
    train = make_paired_digits(num_modalities=1, split="train", seed=3)
    test = make_paired_digits(num_modalities=1, split="test", seed=3)
    assert len(train.labels) + len(test.labels) == 1797
    rows = {tuple(r) for r in train.modalities[0]}
    assert not any(tuple(r) in rows for r in test.modalities[0][:100])


def test_circles_squares_share_empty_or_full():
    data = make_circles_squares(num_pairs=40, image_size=16, seed=0)
    assert [x.shape for x in data.modalities] == [(40, 256)] * 2
    for x in data.modalities:
        filled = x.sum(1)
        # Full shapes of radius >= 0.3 cover more pixels than outlines of the same radius range.
        assert filled[data.labels == 1].mean() > filled[data.labels == 0].mean()
        assert set(np.unique(x)) <= {0.0, 1.0}


def test_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match="num_modalities"):
        make_paired_digits(num_modalities=5)
    with pytest.raises(ValueError, match="split"):
        make_paired_digits(split="val")
    with pytest.raises(ValueError, match="num_pairs"):
        make_circles_squares(num_pairs=0)
