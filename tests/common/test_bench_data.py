"""Readers for the shared gold standards: paths, layout, and the clear error when absent."""

import numpy as np
import pytest

from mixvi import bench_data as bd


def test_missing_folder_names_the_variable(tmp_path):
    with pytest.raises(FileNotFoundError, match="MIXVI_BENCH_DATA"):
        bd.bench_data_dir(tmp_path / "nowhere")


def test_env_var_is_honoured(monkeypatch, bench_data):
    monkeypatch.setenv("MIXVI_BENCH_DATA", str(bench_data))
    assert bd.bench_data_dir() == bench_data


def test_posteriordb_layout(bench_data):
    names = bd.list_posteriordb(bench_data)
    assert len(names) == 8 and "arK-arK" in names
    entry = bd.load_posteriordb("eight_schools-eight_schools_noncentered", bench_data)
    assert entry.reference["theta"].shape == (10000, 8)
    assert entry.data["J"] == 8
    stats = entry.info["reference_summary"]["stats"]
    assert np.isclose(stats["mu"]["mean"], entry.reference["mu"].mean())
    with pytest.raises(KeyError, match="available"):
        bd.load_posteriordb("nope", bench_data)


def test_waveform_and_euler(bench_data):
    wave = bd.load_waveform(bench_data)
    assert wave["X_train"].shape == (400, 22) and wave["nuts"].shape == (10000, 22)
    pytest.importorskip("PIL")
    image = bd.load_euler_image(bench_data)
    assert image.ndim == 2 and 0.0 <= image.min() and image.max() <= 1.0
