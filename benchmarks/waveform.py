"""WAVEFORM Bayesian logistic regression: every guide against 10000 NUTS draws (D = 22).

The data set of the semi-implicit VI papers: 400 training rows, 4600 test rows, 22 coefficients
with prior ``N(0, 10^2)``. Each guide is fitted at the same :class:`~benchmarks.harness.Budget`
and scored by :func:`~benchmarks.harness.evaluate` against the NUTS draws, by its
importance-sampled log evidence against the reference ``-150.39`` (``mixvi.bench_data``), and by
the posterior-predictive log-likelihood and accuracy on the test rows.

Example:
    $ python -m benchmarks waveform --quick
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import log_expit, logsumexp
from tqdm.auto import tqdm

from benchmarks import report
from benchmarks.guides import available_guides
from benchmarks.harness import Budget, backend_module, default_backend, evaluate
from mixvi.bench_data import WAVEFORM_LOG_EVIDENCE, load_waveform

NAME = "waveform"
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)
BUDGET = Budget(num_steps=3000, num_particles=8, learning_rate=1e-2, num_draws=2000)
QUICK_BUDGET = Budget(num_steps=200, num_particles=4, learning_rate=3e-2, num_draws=300)
METRICS = (
    "max_mean_error", "mean_mean_error", "min_sd_ratio", "max_sd_ratio", "sliced_w2", "khat",
    "log_evidence", "log_evidence_error", "test_log_lik", "test_accuracy", "fit_seconds",
    "peak_memory_mb",
)  # fmt: skip


def predictive(weights: np.ndarray, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Posterior-predictive mean log-likelihood and accuracy of ``weights (S, D)`` on ``(X, y)``.

    ``p(y_i | x_i) = mean_s sigmoid(±x_i . w_s)``, averaged in log space per row.
    """
    logits = np.asarray(X, float) @ np.asarray(weights, float).T  # (N, S)
    sign = np.where(np.asarray(y) > 0.5, 1.0, -1.0)[:, None]
    log_p = logsumexp(log_expit(sign * logits), axis=1) - np.log(logits.shape[1])
    return {
        "test_log_lik": float(log_p.mean()),
        "test_accuracy": float(np.mean(log_p > np.log(0.5))),
    }


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
    data: str | os.PathLike | None = None,
    budget: Budget | None = None,
    progress_bar: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the WAVEFORM comparison and write ``waveform-<backend>.json``/``.md``/``.png``.

    Args:
        quick: Small budget and one seed; results go to ``results/quick``.
        seeds: Seeds per guide; default ``(0, 1, 2)`` (``(0,)`` if quick).
        output_dir: Where to write; default ``benchmarks/results`` (``.../quick`` if quick).
        backend: ``"pyro"`` or ``"numpyro"``; default Pyro where torch is installed.
        guides: Registered guide names; default all that import here.
        data: Bench-data root; default the standard place.
        budget: Overrides the default (or quick) budget.
        progress_bar: Show a tqdm bar over the fits.
        command: Recorded in the metadata; default the command line.

    Returns:
        ``metadata``, ``budget``, ``runs`` (one dict per fit), ``summary`` (per guide over seeds),
        ``nuts`` (the reference's own predictive scores) and ``skipped`` guides.
    """
    metadata = report.metadata(command)  # the code that runs, before anything is committed
    backend = backend or default_backend()
    seeds = tuple(seeds or (QUICK_SEEDS if quick else SEEDS))
    budget = budget or (QUICK_BUDGET if quick else BUDGET)
    wave = load_waveform(data)
    reference = {"w": wave["nuts"]}
    impl = backend_module(backend)
    specs, skipped = available_guides(backend, list(guides) if guides else None)
    runs = []
    with tqdm(total=len(specs) * len(seeds), desc=NAME, disable=not progress_bar) as bar:
        for spec in specs:
            for seed in seeds:
                bar.set_postfix_str(f"{spec.name} seed={seed}")
                runs.append(_one_run(impl, wave, reference, spec, budget, seed))
                bar.update()
    summary = report.aggregate(runs, ("guide",), METRICS)
    results = {
        "benchmark": NAME,
        "metadata": metadata,
        "backend": backend,
        "quick": quick,
        "budget": budget._asdict(),
        "seeds": list(seeds),
        "guides": [s.name for s in specs],
        "skipped": {"guides": skipped},
        "reference_log_evidence": WAVEFORM_LOG_EVIDENCE,
        "nuts": predictive(wave["nuts"], wave["X_test"], wave["y_test"]),
        "runs": runs,
        "summary": summary,
    }
    out = (
        Path(output_dir)
        if output_dir
        else (report.QUICK_RESULTS_DIR if quick else report.RESULTS_DIR)
    )
    has_numbers = any(math.isfinite(r["sliced_w2"]["mean"]) for r in summary)
    draw = (lambda path: plot(results, path)) if has_numbers else None
    report.write_results(
        results_name(backend), results, out, markdown(results, with_plot=has_numbers), plot=draw
    )
    return results


def _one_run(impl: Any, wave: dict, reference: dict, spec: Any, budget: Budget, seed: int) -> dict:
    row: dict[str, Any] = {"guide": spec.name, "seed": seed}
    try:
        args, kwargs = impl.blr_args(wave["X_train"], wave["y_train"])
        result = evaluate(
            impl.blr_model, args, reference, spec, budget, kwargs=kwargs, seed=seed,
            return_draws=True,
        )  # fmt: skip
        draws = result.pop("draws")
        row.update(result)
        row["log_evidence_error"] = result["log_evidence"] - WAVEFORM_LOG_EVIDENCE
        row.update(
            predictive(draws["w"].reshape(len(draws["w"]), -1), wave["X_test"], wave["y_test"])
        )
    except Exception as error:  # one failing guide must not stop the table; it is reported
        message = str(error).splitlines()[0][:200] if str(error) else ""
        row["error"] = f"{type(error).__name__}: {message}"
    return row


def _cell(stat: dict, digits: int = 3) -> str:
    if not math.isfinite(stat["mean"]):
        return "–"
    spread = f" ± {report.fmt(stat['sd'], 2)}" if math.isfinite(stat["sd"]) else ""
    return f"{report.fmt(stat['mean'], digits)}{spread}"


def markdown(results: dict[str, Any], *, with_plot: bool = True) -> str:
    """One row per guide (mean ± sd over seeds), best sliced W2 first, plus NUTS's own scores."""
    budget, nuts = results["budget"], results["nuts"]
    rows = sorted(
        results["summary"],
        key=lambda r: r["sliced_w2"]["mean"] if math.isfinite(r["sliced_w2"]["mean"]) else math.inf,
    )
    table = [
        [
            r["guide"], _cell(r["sliced_w2"]), _cell(r["max_mean_error"]),
            f"{report.fmt(r['min_sd_ratio']['mean'])}–{report.fmt(r['max_sd_ratio']['mean'])}",
            _cell(r["khat"], 2), _cell(r["log_evidence"], 5), _cell(r["test_log_lik"], 4),
            _cell(r["test_accuracy"], 3), report.fmt(r["fit_seconds"]["mean"], 2),
            report.fmt(r["peak_memory_mb"]["mean"], 3),
            f"{r['num_ok']}/{r['num_ok'] + r['num_failed']}",
        ]
        for r in rows
    ]  # fmt: skip
    table.append(["NUTS (reference)", "0", "0", "1–1", "–", str(results["reference_log_evidence"]),
                  report.fmt(nuts["test_log_lik"], 4), report.fmt(nuts["test_accuracy"], 3),
                  "–", "–", "–"])  # fmt: skip
    lines = [
        f"## WAVEFORM logistic regression ({results['backend']}, D = 22)\n",
        report.metadata_markdown(results["metadata"]),
        f"Budget per fit: {budget['num_steps']} Adam steps (lr {budget['learning_rate']}), "
        f"{budget['num_particles']} ELBO particles, {budget['num_draws']} guide draws; seeds "
        f"{results['seeds']}. Mean ± sd over seeds; accuracy columns compare with 10000 NUTS "
        "draws; log Z is importance-sampled with the guide as proposal (reference -150.39); test "
        "columns are the posterior-predictive mean log-likelihood and accuracy on 4600 rows.\n",
        report.markdown_table(
            [
                "guide",
                "sliced W2",
                "max mean err",
                "sd ratio",
                "k̂",
                "log Z",
                "test log-lik",
                "test acc",
                "fit s",
                "peak MiB",
                "ok",
            ],
            table,
        ),  # fmt: skip
    ]
    errors = [(r["guide"], e) for r in results["summary"] for e in r["errors"]]
    if errors or results["skipped"]["guides"]:
        lines.append("Failures and skips:\n")
        lines += [f"- {g}: {e}" for g, e in errors]
        lines += [f"- skipped {k}: {v}" for k, v in results["skipped"]["guides"].items()]
        lines.append("")
    if with_plot:
        lines.append(f"![WAVEFORM accuracy per guide]({results_name(results['backend'])}.png)\n")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Sliced W2 and log-evidence error per guide, with min–max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["summary"] if math.isfinite(r["sliced_w2"]["mean"])]
    names = [r["guide"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, metric, label in zip(
        axes,
        ("sliced_w2", "log_evidence_error"),
        ("sliced W2 vs NUTS", "log Z − (−150.39)"),
        strict=True,
    ):
        stats = [r[metric] for r in rows]
        mean = np.array([s["mean"] for s in stats])
        err = np.array(
            [[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]]
        )
        ax.bar(range(len(names)), mean, yerr=err, capsize=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.axhline(0.0, color="k", lw=0.5)
    fig.suptitle(f"WAVEFORM ({results['backend']}, {results['budget']['num_steps']} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
