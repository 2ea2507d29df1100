"""Every guide on every posteriordb posterior, against the reference NUTS draws.

For each posterior folder (``<NAME>/data.json``, ``reference.npz``, ``info.json``, the layout of
``../shared/bench_data/posteriordb``) that has a model in :mod:`benchmarks.models`, each guide
of :data:`benchmarks.guides.GUIDES` is fitted at the same :class:`~benchmarks.harness.Budget`
for several seeds and scored by :func:`~benchmarks.harness.evaluate`. The headline metric is the
sliced W2 distance on standardized coordinates; the tables also give the standardized mean error,
sd ratios, Pareto-k̂, log-evidence, wall-clock time and peak memory.

Example:
    $ python -m benchmarks posteriordb --quick
    $ python -m benchmarks posteriordb --backend numpyro --guides AutoNormal AutoDAIS
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmarks import report
from benchmarks.guides import available_guides
from benchmarks.harness import Budget, default_backend, evaluate
from benchmarks.models import find_model
from mixvi.bench_data import bench_data_dir, list_posteriordb, load_posteriordb

NAME = "posteriordb"
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)
BUDGET = Budget(num_steps=500, num_particles=8, learning_rate=3e-2, num_draws=1000)
QUICK_BUDGET = Budget(num_steps=150, num_particles=4, learning_rate=2e-2, num_draws=256)
METRICS = (
    "max_mean_error",
    "mean_mean_error",
    "min_sd_ratio",
    "max_sd_ratio",
    "sliced_w2",
    "khat",
    "log_evidence",
    "elbo",
    "fit_seconds",
    "peak_memory_mb",
)


def data_root(data: str | os.PathLike | None = None) -> Path:
    """The bench-data root for ``data``: a folder holding ``posteriordb/``, or the posteriordb
    folder itself; ``None`` means the default (``$MIXVI_BENCH_DATA``, ``../shared/bench_data``).

    Raises:
        FileNotFoundError: If neither layout is found.
    """
    if data is None:
        return bench_data_dir()
    folder = Path(data)
    if (folder / "posteriordb").is_dir():
        return folder
    if folder.name == "posteriordb" and folder.is_dir():
        return folder.parent
    raise FileNotFoundError(
        f"{folder} is neither a posteriordb folder nor a folder containing posteriordb/"
    )


def _one_run(entry: Any, builder: Any, spec: Any, budget: Budget, seed: int) -> dict:
    row = {"posterior": entry.name, "guide": spec.name, "seed": seed}
    try:
        model, args, kwargs = builder(entry.data)
        row.update(evaluate(model, args, entry.reference, spec, budget, kwargs=kwargs, seed=seed))
    except Exception as error:  # one failing guide must not stop the table; it is reported
        row["error"] = (
            f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        )
    return row


def results_name(backend: str) -> str:
    """Stem of the result files of ``backend``: ``<benchmark>-<backend>`` (.json, .md, .png)."""
    return f"{NAME}-{backend}"


def run(
    *,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    output_dir: str | os.PathLike | None = None,
    backend: str | None = None,
    guides: Sequence[str] | None = None,
    posteriors: Sequence[str] | None = None,
    data: str | os.PathLike | None = None,
    budget: Budget | None = None,
    progress_bar: bool = True,
    command: str | None = None,
    append: bool = False,
) -> dict[str, Any]:
    """Run the posteriordb benchmark and write ``posteriordb-<backend>.json``/``.md``/``.png``.

    Args:
        quick: Small budget and one seed (about a minute); results go to ``results/quick``.
        seeds: Seeds per (posterior, guide); default ``(0, 1, 2)`` (``(0,)`` if quick).
        output_dir: Where to write; default ``benchmarks/results`` (``benchmarks/results/quick``).
        backend: ``"pyro"`` or ``"numpyro"``; default Pyro where torch is installed.
        guides: Registered guide names; default all that import here.
        posteriors: Posterior names; default every folder with a registered model.
        data: Bench-data root or posteriordb folder; default the standard place.
        budget: Overrides the default (or quick) budget.
        progress_bar: Show a tqdm bar over the runs.
        command: Recorded in the metadata; default the command line.
        append: Merge into the results file already in ``output_dir`` (same backend, budget
            and seeds): its runs of other guides are kept, this run's guides replace theirs.
            Adds a guide to committed results without refitting the others.

    Returns:
        ``metadata``, ``backend``, ``budget``, ``seeds``, ``runs`` (one dict per fit), ``summary``
        (mean/sd/min/max over seeds per posterior and guide), ``winners`` (by sliced W2) and
        ``skipped`` (guides or posteriors left out, with the reason).
    """
    metadata = report.metadata(command)  # the code that runs, before anything is committed
    backend = backend or default_backend()
    seeds = tuple(seeds or (QUICK_SEEDS if quick else SEEDS))
    budget = budget or (QUICK_BUDGET if quick else BUDGET)
    root = data_root(data)
    specs, skipped_guides = available_guides(backend, list(guides) if guides else None)
    names = list(posteriors) if posteriors else list_posteriordb(root)
    builders = {name: find_model(name, backend) for name in names}
    skipped_posteriors = {
        n: f"no {backend} model registered" for n, b in builders.items() if b is None
    }
    names = [n for n in names if builders[n] is not None]
    runs = []
    with tqdm(
        total=len(names) * len(specs) * len(seeds), desc=NAME, disable=not progress_bar
    ) as bar:
        for name in names:
            entry = load_posteriordb(name, root)
            for spec in specs:
                for seed in seeds:
                    bar.set_postfix_str(f"{name} {spec.name} seed={seed}")
                    runs.append(_one_run(entry, builders[name], spec, budget, seed))
                    bar.update()
    out = (
        Path(output_dir)
        if output_dir
        else (report.QUICK_RESULTS_DIR if quick else report.RESULTS_DIR)
    )
    results = _summarize(
        {
            "benchmark": NAME,
            "metadata": metadata,
            "backend": backend,
            "quick": quick,
            "data": str(root / "posteriordb"),
            "budget": budget._asdict(),
            "seeds": list(seeds),
            "guides": [s.name for s in specs],
            "skipped": {"guides": skipped_guides, "posteriors": skipped_posteriors},
            "runs": runs,
        }
    )
    if append:
        path = out / f"{results_name(backend)}.json"
        if not path.is_file():
            raise FileNotFoundError(f"--append: no earlier results at {path}; run without it")
        results = merge_results(json.loads(path.read_text()), results)
    write(results, out)
    return results


def _summarize(results: dict[str, Any]) -> dict[str, Any]:
    summary = report.aggregate(results["runs"], ("posterior", "guide"), METRICS)
    results["summary"] = summary
    results["winners"] = report.winners(
        summary, group="posterior", contender="guide", metric="sliced_w2"
    )
    return results


def merge_results(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``later``'s runs plus ``earlier``'s runs of the guides ``later`` did not fit, re-summarized.

    The merged metadata is ``later``'s, listing ``earlier``'s under ``"earlier"``.

    Raises:
        ValueError: If the two differ in backend, budget or seeds (the guides would not be
            comparable).
    """
    for key in ("backend", "budget", "seeds"):
        if earlier[key] != later[key]:
            raise ValueError(
                f"cannot merge posteriordb results with different {key}: "
                f"{earlier[key]} vs {later[key]}; rerun with the same {key}"
            )
    refit = set(later["guides"])
    guides = [g for g in earlier["guides"] if g not in refit] + later["guides"]
    skipped = {**earlier["skipped"]["guides"], **later["skipped"]["guides"]}
    metadata = dict(later["metadata"])
    earlier_meta = dict(earlier["metadata"])
    metadata["earlier"] = [*earlier_meta.pop("earlier", []), earlier_meta]
    merged = dict(later, metadata=metadata, guides=guides)
    merged["skipped"] = {
        "guides": {k: v for k, v in skipped.items() if k not in guides},
        "posteriors": later["skipped"]["posteriors"],
    }
    merged["runs"] = [r for r in earlier["runs"] if r["guide"] not in refit] + later["runs"]
    return _summarize(merged)


def write(results: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``posteriordb-<backend>.json``/``.md``/``.png`` for ``results`` into ``output_dir``."""
    has_numbers = any(math.isfinite(r["sliced_w2"]["mean"]) for r in results["summary"])
    draw = (lambda path: plot(results, path)) if has_numbers else None
    text = markdown(results, with_plot=has_numbers)
    return report.write_results(
        results_name(results["backend"]), results, output_dir, text, plot=draw
    )


def _cell(stat: dict) -> str:
    if not math.isfinite(stat["mean"]):
        return "–"
    spread = f" ± {report.fmt(stat['sd'], 2)}" if math.isfinite(stat["sd"]) else ""
    return f"{report.fmt(stat['mean'])}{spread}"


def markdown(results: dict[str, Any], *, with_plot: bool = True) -> str:
    """Winners per posterior, the sliced-W2 matrix, and every metric per posterior and guide."""
    budget, seeds = results["budget"], results["seeds"]
    lines = [
        f"## posteriordb ({results['backend']})\n",
        report.metadata_markdown(results["metadata"]),
        f"Budget per fit: {budget['num_steps']} Adam steps (lr {budget['learning_rate']}), "
        f"{budget['num_particles']} ELBO particles, {budget['num_draws']} guide draws for the "
        f"metrics; seeds {seeds}. Cells are mean ± sd over seeds. Sliced W2 is on coordinates "
        "standardized by the reference (0 = identical; the reference's own Monte Carlo error is "
        "about 0.03).\n",
        "### Winner per posterior (lowest sliced W2)\n",
        report.markdown_table(
            ["posterior", "winner", "sliced W2", "runner-up", "sliced W2", "margin (×)"],
            [
                [
                    w["posterior"],
                    w["winner"],
                    _cell(w["winner_value"]),
                    w["runner_up"] or "–",
                    _cell(w["runner_up_value"]) if w["runner_up_value"] else "–",
                    report.fmt(w["margin"]),
                ]
                for w in results["winners"]
            ],
        ),
    ]
    guides = results["guides"]
    by_key = {(r["posterior"], r["guide"]): r for r in results["summary"]}
    posteriors = list(dict.fromkeys(r["posterior"] for r in results["summary"]))
    matrix = []
    for name in posteriors:
        cells = []
        for guide in guides:
            row = by_key.get((name, guide))
            cell = _cell(row["sliced_w2"]) if row else "–"
            if row and row["num_failed"]:
                cell += f" ({row['num_failed']} failed)"
            cells.append(cell)
        matrix.append([name, *cells])
    lines += [
        "### Sliced W2 (standardized), every guide\n",
        report.markdown_table(["posterior", *guides], matrix),
    ]
    detail = []
    for row in results["summary"]:
        m = {k: row[k]["mean"] for k in METRICS}
        detail.append(
            [
                row["posterior"],
                row["guide"],
                report.fmt(m["max_mean_error"]),
                report.fmt(m["mean_mean_error"]),
                f"{report.fmt(m['min_sd_ratio'])}–{report.fmt(m['max_sd_ratio'])}",
                report.fmt(m["sliced_w2"]),
                report.fmt(m["khat"], 2),
                report.fmt(m["log_evidence"], 5),
                report.fmt(m["fit_seconds"], 2),
                report.fmt(m["peak_memory_mb"], 3),
                f"{row['num_ok']}/{row['num_ok'] + row['num_failed']}",
            ]
        )
    lines += [
        "### All metrics (means over seeds)\n",
        report.markdown_table(
            [
                "posterior",
                "guide",
                "max mean err",
                "mean mean err",
                "sd ratio",
                "sliced W2",
                "k̂",
                "log Z",
                "fit s",
                "peak MiB",
                "ok",
            ],
            detail,
        ),
    ]
    errors = [(r["posterior"], r["guide"], e) for r in results["summary"] for e in r["errors"]]
    skipped = {**results["skipped"]["guides"], **results["skipped"]["posteriors"]}
    if errors or skipped:
        lines.append("### Failures and skips\n")
        lines += [f"- {p} / {g}: {e}" for p, g, e in errors]
        lines += [f"- skipped {k}: {v}" for k, v in skipped.items()]
        lines.append("")
    if with_plot:
        lines.append(
            f"![sliced W2 per posterior and guide]({results_name(results['backend'])}.png)\n"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Grouped bars of sliced W2 (mean, with min–max over seeds) per posterior and guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    guides = results["guides"]
    posteriors = list(dict.fromkeys(r["posterior"] for r in results["summary"]))
    by_key = {(r["posterior"], r["guide"]): r["sliced_w2"] for r in results["summary"]}
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(posteriors)), 4))
    width = 0.8 / max(len(guides), 1)
    for i, guide in enumerate(guides):
        stats = [
            by_key.get((p, guide), {"mean": np.nan, "min": np.nan, "max": np.nan})
            for p in posteriors
        ]
        mean = np.array([s["mean"] for s in stats])
        err = np.array(
            [[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]]
        )
        x = np.arange(len(posteriors)) + (i - (len(guides) - 1) / 2) * width
        ax.bar(x, mean, width, yerr=err, label=guide, capsize=2)
    ax.set_xticks(np.arange(len(posteriors)))
    ax.set_xticklabels([p.split("-")[-1] for p in posteriors], rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("sliced W2 (standardized)")
    ax.set_title(f"posteriordb, {results['backend']}, {results['budget']['num_steps']} steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
