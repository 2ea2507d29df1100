"""Peak memory of one SIVI_ELBO step as the number of importance samples ``k`` grows (Pyro).

Model: WAVEFORM Bayesian logistic regression (D = 22), AISIVI guide (``mixing_dim = 10``,
hidden ``(128, 128)``, conditional RealNVP proposal), 100 particles per step (the reference's
batch). For each ``k`` the guide is warmed up, then the resident-set high-water mark of one
``svi.step`` is read with :class:`benchmarks.memory.PeakMemory` (kernel ``VmHWM``). Two
settings: the default ``chunk_size = 128`` (memory flat in ``k``) and ``chunk_size = None``
(all ``k`` draws at once: the ``k x N x hidden`` activations of one chunk grow with ``k``, but
still no autograd graph).

Example:
    $ python -m benchmarks.sivi_memory --quick
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from benchmarks import report
from benchmarks._pyro import blr_args, blr_model
from benchmarks.memory import PeakMemory
from mixvi.bench_data import load_waveform
from pyro_mixvi import SIVI_ELBO, AutoSIVI

NAME = "sivi_memory"
RESULTS = Path(__file__).resolve().parent / "results"


def one_step_memory(k: int, chunk_size: int | None, *, num_particles: int = 100,
                    seed: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Peak resident-memory increase (MiB) and seconds of one step at ``k`` (median of repeats)."""
    data = load_waveform()
    args, kwargs = blr_args(data["X_train"], data["y_train"])
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoSIVI(blr_model, mixing_dim=10, chunk_size=chunk_size, num_importance_samples=k)
    elbo = SIVI_ELBO(num_particles=num_particles, vectorize_particles=True)
    svi = SVI(blr_model, guide, Adam({"lr": 1e-3}), elbo)
    for _ in range(2):
        svi.step(*args, **kwargs)
    peaks, seconds = [], []
    for _ in range(repeats):
        with PeakMemory() as peak:
            start = time.perf_counter()
            svi.step(*args, **kwargs)
            seconds.append(time.perf_counter() - start)
        peaks.append(peak.megabytes)
    return {"k": k, "chunk_size": chunk_size, "num_particles": num_particles,
            "peak_mb": float(np.median(peaks)), "seconds": float(np.median(seconds)),
            "method": peak.method}


def run(*, quick: bool = False, seeds: Sequence[int] = (0,),
        output_dir: str | os.PathLike | None = None,
        ks: Sequence[int] = (10, 100, 1000)) -> dict[str, Any]:
    """Memory of one step for each ``k`` and both chunk settings; writes JSON and Markdown."""
    torch.set_num_threads(1)
    ks = tuple(ks)[:2] if quick else tuple(ks)
    rows = [one_step_memory(k, chunk, seed=seed)
            for chunk in (128, None) for k in ks for seed in seeds]
    out = Path(output_dir) if output_dir else RESULTS / ("quick" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    meta = report.metadata(f"python -m benchmarks.sivi_memory{' --quick' if quick else ''}")
    result = {"meta": meta, "rows": rows}
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2))
    lines = [report.metadata_markdown(meta), "",
             "One SIVI_ELBO step, WAVEFORM BLR (D = 22), AISIVI (m = 10), 100 particles.", "",
             "| k | chunk_size | peak MiB | s/step |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['chunk_size']} | {report.fmt(r['peak_mb'])} | "
                     f"{report.fmt(r['seconds'])} |")
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ks", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    result = run(quick=args.quick, ks=args.ks, output_dir=args.output_dir)
    print(json.dumps(result["rows"], indent=1))
