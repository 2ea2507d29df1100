"""AISIVI and BSIVI on WAVEFORM logistic regression (D = 22) against NUTS, with the baselines.

Registers two AutoSIVI specs in :data:`benchmarks.guides.GUIDES` — ``AISIVI`` (conditional
RealNVP proposal) and ``BSIVI`` (prior proposal), both ``mixing_dim = 10`` (the reference's
``d_eps``), hidden ``(128, 128)``, trained by ``SIVI_ELBO`` with ``k`` importance draws, and
``log q`` for the evidence and k-hat estimated with ``k_eval`` draws — and runs
:func:`benchmarks.waveform.run` on them and on ``AutoNormal``, ``AutoMultivariateNormal`` and
``AutoIAFNormal`` at the same budget. Numbers: max standardized mean error and sd ratios vs the
10000 NUTS draws, log-evidence vs -150.39, fit seconds, peak memory. Results go to
``benchmarks/results/sivi_waveform/`` (``waveform-<backend>.json``/``.md``).

Example:
    $ python -m benchmarks.sivi_waveform --quick
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import waveform
from benchmarks.guides import register_guide
from benchmarks.harness import Budget

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal")
BUDGET = Budget(num_steps=3000, num_particles=16, learning_rate=1e-2, num_draws=2000)
QUICK_BUDGET = Budget(num_steps=300, num_particles=8, learning_rate=2e-2, num_draws=300)


def register(backend: str, *, k: int = 128, k_eval: int = 1024) -> list[str]:
    """Register ``AISIVI`` and ``BSIVI`` for ``backend``; returns their names."""
    names = []
    for name, proposal in (("AISIVI", "flow"), ("BSIVI", "prior")):
        register_guide(
            name, backend, f"{backend}_mixvi:AutoSIVI", elbo=f"{backend}_mixvi:SIVI_ELBO",
            elbo_options={"num_importance_samples": k}, mixing_dim=10, proposal=proposal,
            num_importance_samples=k_eval,
        )  # fmt: skip
        names.append(name)
    return names


def run(*, quick: bool = False, seeds: Sequence[int] | None = None,
        output_dir: str | os.PathLike | None = None, backend: str = "pyro",
        guides: Sequence[str] | None = None, budget: Budget | None = None,
        k: int = 128) -> dict[str, Any]:
    """SIVI and baselines on WAVEFORM; see the module docstring."""
    names = register(backend, k=k)
    out = Path(output_dir) if output_dir else RESULTS / ("quick" if quick else "") / "sivi_waveform"
    return waveform.run(
        quick=quick, seeds=seeds, output_dir=out, backend=backend,
        guides=list(guides) if guides else [*names, *BASELINES],
        budget=budget or (QUICK_BUDGET if quick else BUDGET), progress_bar=False,
        command=f"python -m benchmarks.sivi_waveform{' --quick' if quick else ''} "
        f"--backend {backend} --k {k}",
    )  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="pyro")
    parser.add_argument("--guides", nargs="*", default=None)
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--particles", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    base = QUICK_BUDGET if args.quick else BUDGET
    budget = base._replace(**{key: value for key, value in (
        ("num_steps", args.steps), ("num_particles", args.particles),
        ("learning_rate", args.lr)) if value is not None})  # fmt: skip
    result = run(quick=args.quick, seeds=args.seeds, output_dir=args.output_dir,
                 backend=args.backend, guides=args.guides, budget=budget, k=args.k)
    print(json.dumps(result["summary"], indent=1, default=str))
