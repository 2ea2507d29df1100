"""AISIVI and BSIVI on WAVEFORM logistic regression (D = 22) against NUTS, with the baselines.

Registers two AutoSIVI specs in :data:`benchmarks.guides.GUIDES` — ``AISIVI`` (conditional
RealNVP proposal) and ``BSIVI`` (prior proposal), both ``mixing_dim = 10`` (the reference's
``d_eps``), hidden ``(128, 128)``, trained by ``SIVI_ELBO`` with ``k`` importance draws, and
``log q`` for the evidence and k-hat estimated with ``k_eval`` draws — and runs
:func:`benchmarks.waveform.run` on them and on ``AutoNormal``, ``AutoMultivariateNormal`` and
``AutoIAFNormal`` at the same budget. Numbers: max standardized mean error and sd ratios vs the
10000 NUTS draws, log-evidence vs -150.39, fit seconds, peak memory. Results go to
``benchmarks/results/sivi_waveform/`` (``waveform-<backend>.json``/``.md``). The budget is
:data:`benchmarks.waveform.BUDGET`, so the baselines' rows of ``results/waveform-<backend>.md``
are at the same budget.

:func:`time_to_accuracy` (``--time-to-accuracy``) fits AISIVI (Pyro) and checks every
``eval_every`` steps whether 2000 draws reach NUTS-level accuracy (max standardized mean error
< 0.1 and every sd ratio within [0.9, 1.1]); it stops there or at a CPU-time limit and writes
``sivi_waveform_time_to_accuracy.json``/``.md``.

Example:
    $ python -m benchmarks.sivi_waveform --quick
    $ python -m benchmarks.sivi_waveform --time-to-accuracy --max-cpu-seconds 600
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import report, waveform
from benchmarks.guides import register_guide
from benchmarks.harness import Budget
from mixvi.bench_data import load_waveform
from mixvi.metrics import sd_ratio, standardized_mean_error

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal")
BUDGET = waveform.BUDGET
QUICK_BUDGET = waveform.QUICK_BUDGET


def register(backend: str, *, k: int = 128, k_eval: int = 1024,
             init_mixing_fraction: float = 0.0) -> list[str]:
    """Register ``AISIVI`` and ``BSIVI`` for ``backend``; returns their names."""
    names = []
    for name, proposal in (("AISIVI", "flow"), ("BSIVI", "prior")):
        register_guide(
            name, backend, f"{backend}_mixvi:AutoSIVI", elbo=f"{backend}_mixvi:SIVI_ELBO",
            elbo_options={"num_importance_samples": k}, mixing_dim=10, proposal=proposal,
            num_importance_samples=k_eval, init_mixing_fraction=init_mixing_fraction,
        )  # fmt: skip
        names.append(name)
    return names


def run(*, quick: bool = False, seeds: Sequence[int] | None = None,
        output_dir: str | os.PathLike | None = None, backend: str = "pyro",
        guides: Sequence[str] | None = None, budget: Budget | None = None,
        k: int = 128, init_mixing_fraction: float = 0.0) -> dict[str, Any]:
    """SIVI and baselines on WAVEFORM; see the module docstring."""
    names = register(backend, k=k, init_mixing_fraction=init_mixing_fraction)
    out = Path(output_dir) if output_dir else RESULTS / ("quick" if quick else "") / "sivi_waveform"
    return waveform.run(
        quick=quick, seeds=seeds, output_dir=out, backend=backend,
        guides=list(guides) if guides else [*names, *BASELINES],
        budget=budget or (QUICK_BUDGET if quick else BUDGET), progress_bar=False,
        command=f"python -m benchmarks.sivi_waveform{' --quick' if quick else ''} "
        f"--backend {backend} --k {k} --init-mixing-fraction {init_mixing_fraction:g}",
    )  # fmt: skip


def time_to_accuracy(*, k: int = 128, num_particles: int = 8, learning_rate: float = 1e-2,
                     decay_steps: int = 6000, eval_every: int = 250, num_draws: int = 2000,
                     max_cpu_seconds: float = 600.0, max_wall_seconds: float = math.inf,
                     seed: int = 0, init_mixing_fraction: float = 0.0,
                     output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """CPU time until AISIVI (Pyro) reaches NUTS-level accuracy on WAVEFORM, or how far it gets.

    Adam at ``learning_rate``, decayed by 10 over ``decay_steps`` (then held); every
    ``eval_every`` steps ``num_draws`` guide draws are compared with the NUTS draws (the
    evaluation's CPU time is not counted). Stops at max standardized mean error < 0.1 with all
    sd ratios in [0.9, 1.1], or once training has used ``max_cpu_seconds`` (or
    ``max_wall_seconds`` of wall time, on a busy machine).
    """
    import pyro
    import torch
    from pyro.infer import SVI
    from pyro.optim import ClippedAdam

    from benchmarks import _pyro
    from pyro_mixvi import SIVI_ELBO, AutoSIVI

    torch.set_num_threads(1)
    wave = load_waveform()
    args, _ = _pyro.blr_args(wave["X_train"], wave["y_train"])
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoSIVI(_pyro.blr_model, mixing_dim=10, proposal="flow", num_importance_samples=k,
                     init_mixing_fraction=init_mixing_fraction)
    optim = ClippedAdam({"lr": learning_rate, "lrd": 0.1 ** (1 / decay_steps), "clip_norm": 100.0})
    svi = SVI(_pyro.blr_model, guide, optim,
              SIVI_ELBO(num_particles=num_particles, vectorize_particles=True))
    meta = report.metadata("python -m benchmarks.sivi_waveform --time-to-accuracy "
                           f"--k {k} --max-cpu-seconds {max_cpu_seconds:g} "
                           f"--init-mixing-fraction {init_mixing_fraction:g}")
    checkpoints, cpu, wall, step, reached = [], 0.0, 0.0, 0, None
    while cpu < max_cpu_seconds and wall < max_wall_seconds and reached is None:
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        for _ in range(eval_every):
            loss = svi.step(*args)
            if not math.isfinite(loss):
                raise FloatingPointError(f"AISIVI on WAVEFORM: loss {loss} at step {step}")
            step += 1
        cpu += time.process_time() - cpu_start
        wall += time.perf_counter() - wall_start
        with torch.no_grad():
            draws = guide.get_posterior(*args).sample((num_draws,)).double().numpy()
        error = standardized_mean_error(draws, wave["nuts"])
        ratio = sd_ratio(draws, wave["nuts"])
        checkpoints.append({"step": step, "cpu_seconds": cpu, "wall_seconds": wall,
                            "loss": loss, "max_mean_error": float(error.max()),
                            "min_sd_ratio": float(ratio.min()),
                            "max_sd_ratio": float(ratio.max())})
        if error.max() < 0.1 and ratio.min() >= 0.9 and ratio.max() <= 1.1:
            reached = checkpoints[-1]
    result = {"meta": meta, "k": k, "num_particles": num_particles,
              "learning_rate": learning_rate, "decay_steps": decay_steps, "seed": seed,
              "num_draws": num_draws, "max_cpu_seconds": max_cpu_seconds, "reached": reached,
              "checkpoints": checkpoints}
    out = Path(output_dir) if output_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "sivi_waveform_time_to_accuracy.json").write_text(json.dumps(result, indent=2))
    verdict = (f"reached after {reached['step']} steps, {reached['cpu_seconds']:.0f} CPU s"
               if reached else f"not reached within {cpu:.0f} CPU s ({step} steps)")
    lines = [report.metadata_markdown(meta), "",
             f"AISIVI (Pyro) on WAVEFORM, k = {k}, {num_particles} particles, Adam "
             f"{learning_rate:g} decayed x0.1 per {decay_steps} steps; {num_draws} draws per "
             f"check against 10000 NUTS draws. NUTS-level accuracy (max standardized mean error "
             f"< 0.1, sd ratios in [0.9, 1.1]): **{verdict}**. CPU seconds count training only; "
             "wall seconds are inflated by other jobs on the 2 cores.", "",
             "| step | CPU s | wall s | loss | max std. mean error | sd ratio min–max |",
             "|---|---|---|---|---|---|"]
    for c in checkpoints:
        lines.append(f"| {c['step']} | {c['cpu_seconds']:.0f} | {c['wall_seconds']:.0f} | "
                     f"{report.fmt(c['loss'], 5)} | {report.fmt(c['max_mean_error'])} | "
                     f"{report.fmt(c['min_sd_ratio'])}–{report.fmt(c['max_sd_ratio'])} |")
    (out / "sivi_waveform_time_to_accuracy.md").write_text("\n".join(lines) + "\n")
    return result


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
    parser.add_argument("--time-to-accuracy", action="store_true")
    parser.add_argument("--max-cpu-seconds", type=float, default=600.0)
    parser.add_argument("--max-wall-seconds", type=float, default=math.inf)
    parser.add_argument("--init-mixing-fraction", type=float, default=0.0)
    args = parser.parse_args()
    if args.time_to_accuracy:
        result = time_to_accuracy(k=args.k, max_cpu_seconds=args.max_cpu_seconds,
                                  max_wall_seconds=args.max_wall_seconds,
                                  init_mixing_fraction=args.init_mixing_fraction,
                                  output_dir=args.output_dir)
        print(json.dumps({"reached": result["reached"], "last": result["checkpoints"][-1]}))
        raise SystemExit(0)
    base = QUICK_BUDGET if args.quick else BUDGET
    budget = base._replace(**{key: value for key, value in (
        ("num_steps", args.steps), ("num_particles", args.particles),
        ("learning_rate", args.lr)) if value is not None})  # fmt: skip
    result = run(quick=args.quick, seeds=args.seeds, output_dir=args.output_dir,
                 backend=args.backend, guides=args.guides, budget=budget, k=args.k,
                 init_mixing_fraction=args.init_mixing_fraction)
    print(json.dumps(result["summary"], indent=1, default=str))
