"""Step time and peak memory of each guide relative to the framework's flow guide (AutoIAFNormal).

On a synthetic Bayesian logistic regression with ``D`` coefficients (400 rows, D = 2, 22, 100 by
default), every guide takes the same number of ELBO particles per step. All timings of one
backend are taken in one process, one after another, so the ratios
``time(guide) / time(AutoIAFNormal)`` compare like with like on a shared machine. Where both
backends are importable (``--backend both``), the Pyro step is also compared with the jitted
NumPyro step of the same guide (``pyro / numpyro``).

Example:
    $ python -m benchmarks timing --quick
    $ python -m benchmarks timing --backend both --dims 2 22 100
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from benchmarks import report
from benchmarks.guides import BACKENDS, FLOW_GUIDE, available_guides
from benchmarks.harness import Budget, backend_module, default_backend

NAME = "timing"
DIMS = (2, 22, 100)
NUM_ROWS = 400
SEEDS = (0,)
# num_steps is the number of timed steps (after 5 warm-up steps that include compilation).
BUDGET = Budget(num_steps=200, num_particles=8)
QUICK_BUDGET = Budget(num_steps=20, num_particles=8)


def synthetic_blr(
    dim: int, *, num_rows: int = NUM_ROWS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal ``X (num_rows, dim)``; labels from ``w ~ N(0, 1/dim)`` (logits ~ 1)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(num_rows, dim))
    w = rng.normal(size=dim) / np.sqrt(dim)
    y = (rng.random(num_rows) < 1.0 / (1.0 + np.exp(-X @ w))).astype(float)
    return X, y


def _backends(backend: str | None) -> list[str]:
    if backend == "both":
        return list(BACKENDS)
    if backend is not None:
        return [backend]
    found = [b for b in BACKENDS if importlib.util.find_spec("torch" if b == "pyro" else "jax")]
    return found if len(found) == 2 else [default_backend()]


def _time_one(impl: Any, spec: Any, dim: int, budget: Budget, seed: int) -> dict[str, Any]:
    row: dict[str, Any] = {"backend": spec.backend, "guide": spec.name, "dim": dim, "seed": seed}
    try:
        args, kwargs = impl.blr_args(*synthetic_blr(dim, seed=seed))
        seconds, megabytes = impl.time_steps(impl.blr_model, args, kwargs, spec, budget, seed)
        row.update(step_ms=1e3 * seconds, peak_memory_mb=megabytes)
    except Exception as error:  # reported in the table, never fatal
        message = str(error).splitlines()[0][:200] if str(error) else ""
        row["error"] = f"{type(error).__name__}: {message}"
    return row


def _add_ratios(runs: list[dict]) -> None:
    """``step_ratio``/``memory_ratio`` to the flow guide of the same backend and dim, and
    ``pyro_over_numpyro`` for the same guide and dim."""
    ok = [r for r in runs if "error" not in r]
    flow = {(r["backend"], r["dim"]): r for r in ok if r["guide"] == FLOW_GUIDE}
    by_key = {(r["backend"], r["guide"], r["dim"]): r for r in ok}
    for r in ok:
        base = flow.get((r["backend"], r["dim"]))
        r["step_ratio"] = r["step_ms"] / base["step_ms"] if base else math.nan
        r["memory_ratio"] = (
            r["peak_memory_mb"] / base["peak_memory_mb"]
            if base and base["peak_memory_mb"] > 0
            else math.nan
        )
        pyro_run = by_key.get(("pyro", r["guide"], r["dim"]))
        numpyro_run = by_key.get(("numpyro", r["guide"], r["dim"]))
        r["pyro_over_numpyro"] = (
            pyro_run["step_ms"] / numpyro_run["step_ms"] if pyro_run and numpyro_run else math.nan
        )


def run(
    *,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    output_dir: str | os.PathLike | None = None,
    backend: str | None = None,
    guides: Sequence[str] | None = None,
    dims: Sequence[int] = DIMS,
    budget: Budget | None = None,
    progress_bar: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Time every guide at every ``dim`` and write ``timing.json``/``.md``/``.png``.

    Args:
        quick: 20 timed steps instead of 200; results go to ``results/quick``.
        seeds: Seeds (data and initialization); default ``(0,)``.
        output_dir: Where to write; default ``benchmarks/results`` (``.../quick`` if quick).
        backend: ``"pyro"``, ``"numpyro"`` or ``"both"``; default both where both import.
        guides: Registered guide names; default all that import here.
        dims: Latent dimensions ``D``.
        budget: ``num_steps`` timed steps with ``num_particles`` particles each.
        progress_bar: Show a tqdm bar.
        command: Recorded in the metadata; default the command line.

    Returns:
        ``metadata``, ``budget``, ``runs`` (``step_ms``, ``peak_memory_mb`` and the ratios per
        backend, guide and dim) and ``skipped`` guides.
    """
    metadata = report.metadata(command)  # the code that runs, before anything is committed
    budget = budget or (QUICK_BUDGET if quick else BUDGET)
    seeds = tuple(seeds or SEEDS)
    plan, skipped = [], {}
    for name in _backends(backend):
        specs, missing = available_guides(name, list(guides) if guides else None)
        skipped.update({f"{name}:{k}": v for k, v in missing.items()})
        plan += [(name, spec) for spec in specs]
    # One untimed run per backend first, so one-off costs of the process (lazy imports, first
    # allocations, XLA start-up) are not charged to whichever guide happens to come first.
    for name in dict.fromkeys(b for b, _ in plan):
        first = next(spec for b, spec in plan if b == name)
        _time_one(backend_module(name), first, min(dims), budget._replace(num_steps=2), seeds[0])
    runs = []
    total = len(plan) * len(dims) * len(seeds)
    with tqdm(total=total, desc=NAME, disable=not progress_bar) as bar:
        for name, spec in plan:
            impl = backend_module(name)
            for dim in dims:
                for seed in seeds:
                    bar.set_postfix_str(f"{name} {spec.name} D={dim}")
                    runs.append(_time_one(impl, spec, dim, budget, seed))
                    bar.update()
    _add_ratios(runs)
    results = {
        "benchmark": NAME,
        "metadata": metadata,
        "quick": quick,
        "budget": {"timed_steps": budget.num_steps, "num_particles": budget.num_particles},
        "dims": list(dims),
        "num_rows": NUM_ROWS,
        "seeds": list(seeds),
        "reference_guide": FLOW_GUIDE,
        "skipped": {"guides": skipped},
        "runs": runs,
    }
    out = (
        Path(output_dir)
        if output_dir
        else (report.QUICK_RESULTS_DIR if quick else report.RESULTS_DIR)
    )
    has_numbers = any("step_ms" in r for r in runs)
    draw = (lambda path: plot(results, path)) if has_numbers else None
    report.write_results(NAME, results, out, markdown(results, with_plot=has_numbers), plot=draw)
    return results


def markdown(results: dict[str, Any], *, with_plot: bool = True) -> str:
    """One row per backend and guide: ms per step and the ratio to the flow guide at each D."""
    dims = results["dims"]
    groups: dict[tuple, dict[int, dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["backend"], r["guide"]), {})[r["dim"]] = r

    def cell(r: dict | None, value: str, ratio: str) -> str:
        if r is None:
            return "–"
        if "error" in r:
            return "failed"
        return f"{report.fmt(r[value], 3)} ({report.fmt(r[ratio], 3)}×)"

    time_rows = [
        [b, g, *[cell(d.get(D), "step_ms", "step_ratio") for D in dims]]
        for (b, g), d in groups.items()
    ]
    memory_rows = [
        [b, g, *[cell(d.get(D), "peak_memory_mb", "memory_ratio") for D in dims]]
        for (b, g), d in groups.items()
    ]  # fmt: skip
    lines = [
        "## Timing: step time and memory relative to the flow guide\n",
        report.metadata_markdown(results["metadata"]),
        f"Synthetic logistic regression with {results['num_rows']} rows and D coefficients; "
        f"{results['budget']['num_particles']} ELBO particles per step for all guides; median over "
        f"{results['budget']['timed_steps']} timed steps after 5 warm-up steps (NumPyro: jitted "
        "`SVI.update`, compilation excluded). Parenthesized: ratio to "
        f"{results['reference_guide']} "
        "of the same backend and D, measured in the same process. Peak memory is the resident-set "
        "increase from building the guide (and compiling, for NumPyro) to the last step.\n",
        "### Milliseconds per step\n",
        report.markdown_table(["backend", "guide", *[f"D = {D}" for D in dims]], time_rows),
        "### Peak memory (MiB)\n",
        report.markdown_table(["backend", "guide", *[f"D = {D}" for D in dims]], memory_rows),
    ]
    cross = [
        r
        for r in results["runs"]
        if r["backend"] == "pyro" and math.isfinite(r.get("pyro_over_numpyro", math.nan))
    ]
    if cross:
        by_guide: dict[str, dict[int, float]] = {}
        for r in cross:
            by_guide.setdefault(r["guide"], {})[r["dim"]] = r["pyro_over_numpyro"]
        lines += [
            "### Pyro step time / jitted NumPyro step time (same guide, D, particles)\n",
            report.markdown_table(
                ["guide", *[f"D = {D}" for D in dims]],
                [
                    [g, *[report.fmt(v.get(D), 3) + "×" if D in v else "–" for D in dims]]
                    for g, v in by_guide.items()
                ],
            ),
        ]  # fmt: skip
    errors = [
        (r["backend"], r["guide"], r["dim"], r["error"]) for r in results["runs"] if "error" in r
    ]
    if errors or results["skipped"]["guides"]:
        lines.append("Failures and skips:\n")
        lines += [f"- {b} {g} D={D}: {e}" for b, g, D, e in errors]
        lines += [f"- skipped {k}: {v}" for k, v in results["skipped"]["guides"].items()]
        lines.append("")
    if with_plot:
        lines.append(f"![step time relative to the flow guide]({NAME}.png)\n")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Step-time ratio to the flow guide against D, one line per backend and guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[tuple, list] = {}
    for r in results["runs"]:
        if "step_ratio" in r and math.isfinite(r["step_ratio"]):
            groups.setdefault((r["backend"], r["guide"]), []).append((r["dim"], r["step_ratio"]))
    for (backend, guide), points in groups.items():
        points.sort()
        style = "-" if backend == "pyro" else "--"
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            style,
            marker="o",
            label=f"{backend} {guide}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("D (latent dimension)")
    ax.set_ylabel(f"step time / {results['reference_guide']}")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
