"""Readers for the gold standards in ``shared/bench_data`` (never copied into the project).

The folder is found, in order, from the ``root`` argument, the ``MIXVI_BENCH_DATA`` environment
variable, and ``../shared/bench_data`` beside the repository (or the working directory).
A missing folder raises :class:`FileNotFoundError` saying how to point mixvi at it; tests turn
that into a skip.

Example:
    >>> entry = load_posteriordb("arK-arK")                      # doctest: +SKIP
    >>> entry.reference["beta"].shape                            # doctest: +SKIP
    (10000, 5)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

ENV_VAR = "MIXVI_BENCH_DATA"


def _default_candidates() -> list[Path]:
    repo = Path(__file__).resolve().parents[1]
    return [repo.parent / "shared" / "bench_data", Path.cwd().parent / "shared" / "bench_data"]


def bench_data_dir(root: str | os.PathLike | None = None) -> Path:
    """The bench-data folder: ``root``, else ``$MIXVI_BENCH_DATA``, else ``../shared/bench_data``.

    Raises:
        FileNotFoundError: If the folder does not exist; the message says how to set it.
    """
    if root is None:
        root = os.environ.get(ENV_VAR)
    candidates = [Path(root)] if root is not None else _default_candidates()
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"mixvi bench data not found (tried {tried}). Pass root=... or set {ENV_VAR} to the "
        "folder that holds posteriordb/, waveform/ and euler/."
    )


class PosteriorDBEntry(NamedTuple):
    """One posteriordb posterior: its Stan data, reference NUTS draws and ``info.json``."""

    name: str
    data: dict[str, Any]
    reference: dict[str, np.ndarray]
    info: dict[str, Any]


def list_posteriordb(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the posteriors under ``<bench_data>/posteriordb`` (folders with a ``data.json``)."""
    folder = bench_data_dir(root) / "posteriordb"
    return sorted(p.parent.name for p in folder.glob("*/data.json"))


def load_posteriordb(name: str, root: str | os.PathLike | None = None) -> PosteriorDBEntry:
    """Load the data, reference draws (``(10000, *shape)`` float64 arrays) and info of ``name``.

    Raises:
        KeyError: If ``name`` is not a posterior in the folder; the message lists the ones that are.
    """
    folder = bench_data_dir(root) / "posteriordb" / name
    if not (folder / "data.json").is_file():
        raise KeyError(f"no posterior {name!r}; available: {list_posteriordb(root)}")
    data = json.loads((folder / "data.json").read_text())
    info = json.loads((folder / "info.json").read_text())
    with np.load(folder / "reference.npz") as ref:
        reference = {k: np.asarray(ref[k]) for k in ref.files}
    return PosteriorDBEntry(name, data, reference, info)


def load_waveform(root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """WAVEFORM logistic regression: ``X_train (400, 22)``, ``y_train``, ``X_test``, ``y_test``,
    and the reference draws ``nuts (10000, 22)``, ``sgld``, ``mala``, ``sivi_paper_mcmc``.

    The reference log evidence is ``WAVEFORM_LOG_EVIDENCE`` (-150.39, see the data README).
    """
    folder = bench_data_dir(root) / "waveform"
    out: dict[str, np.ndarray] = {}
    for fname in ("waveform.npz", "reference.npz"):
        with np.load(folder / fname) as arrays:
            out.update({k: np.asarray(arrays[k]) for k in arrays.files})
    return out


WAVEFORM_LOG_EVIDENCE = -150.39


def load_euler_image(root: str | os.PathLike | None = None) -> np.ndarray:
    """The CWM density-experiment image, grayscale floats in ``[0, 1]`` of shape ``(H, W)``."""
    from PIL import Image

    path = bench_data_dir(root) / "euler" / "euler.jpg"
    with Image.open(path) as image:
        gray = np.asarray(image.convert("L"), dtype=np.float64)
    return gray / 255.0
