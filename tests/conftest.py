"""Shared test configuration: bench-data discovery and seeding helpers."""

from __future__ import annotations

import numpy as np
import pytest

from mixvi.bench_data import bench_data_dir


@pytest.fixture(scope="session")
def bench_data():
    """The bench-data folder, or a skip saying how to provide it."""
    try:
        return bench_data_dir()
    except FileNotFoundError as error:
        pytest.skip(f"bench data absent: {error}")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
