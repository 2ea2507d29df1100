"""JNF seed reproduction: coherence of JNF, JNFShared, PoE and MoE on multimodal 8×8 digits.

Data: ``make_paired_digits(num_modalities=3)`` — three views (identity, rotated+inverted,
flipped+transposed) of *different* digit images that share only the class; train and test rows
come from disjoint image pools. One logistic-regression classifier per modality, trained on the
real training views, scores generated views.

Metrics (mean ± sd over seeds):
    * ``joint_coherence``: share of prior draws ``z ~ N(0, I)`` whose three decoded views get the
      same predicted class.
    * ``cross_1`` / ``cross_2``: accuracy of the class predicted on a generated missing view given
      one / two observed views, against the row's label, averaged over every subset and target.
      JNF conditions on two views through the product of experts sampled by NUTS (prior power
      ``|S| − 1``); PoE and MoE use their closed-form aggregates.
    * ``sample_mmd``: squared MMD (RBF kernel, median-distance bandwidth) between prior
      generations and test images, averaged over views (sample quality; lower is better).
    * seconds per training stage and for the two-view inference.

The paper's claims checked here: JNF above mixture aggregation (MoE) in coherence; JNFShared
above JNF cross-modally.

Example:
    $ python -m benchmarks.jnf_digits --quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import report
from mixvi.metrics import mmd

NAME = "jnf_digits"
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)
MODELS = ("JNF", "JNFShared", "PoEVAE", "MoEVAE")
METRICS = (
    "joint_coherence", "cross_1", "cross_2", "sample_mmd", "seconds_projections", "seconds_joint",
    "seconds_unimodal", "seconds_inference_2",
)  # fmt: skip
SETTINGS = {
    "full": {"num_steps": 600, "batch_size": 128, "test_rows": 200, "num_warmup": 100},
    "quick": {"num_steps": 150, "batch_size": 64, "test_rows": 60, "num_warmup": 30},
}
ARCHITECTURE = {"latent_dim": 8, "hidden_dims": (128, 128), "likelihood_scale": 0.2}


class _Backend:
    """Fit / generate through the public face of one backend, numpy in and out."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "pyro":
            import torch

            import pyro_mixvi

            self.torch, self.lib = torch, pyro_mixvi
        elif name == "numpyro":
            import jax

            import numpyro_mixvi

            self.jax, self.lib = jax, numpyro_mixvi
        else:
            raise ValueError(f"backend must be 'pyro' or 'numpyro'; got {name!r}")

    def build(self, model: str, input_dims: Sequence[int]) -> Any:
        return getattr(self.lib, model)(list(input_dims), **ARCHITECTURE)

    def array(self, x: np.ndarray) -> Any:
        if self.name == "pyro":
            return self.torch.as_tensor(x, dtype=self.torch.get_default_dtype())
        return self.jax.numpy.asarray(x)

    def stage(self, method, data, seed: int, **kwargs) -> float:
        start = time.perf_counter()
        if self.name == "pyro":
            method(data, generator=self.torch.Generator().manual_seed(seed), **kwargs)
        else:
            method(self.jax.random.key(seed), data, **kwargs)
        return time.perf_counter() - start

    def generate(self, model, observed, seed: int, **kwargs) -> list[np.ndarray]:
        if self.name == "pyro":
            out = model.generate(
                observed, generator=self.torch.Generator().manual_seed(seed), **kwargs
            )
            return [x.detach().cpu().numpy() for x in out]
        return [
            np.asarray(x) for x in model.generate(self.jax.random.key(seed), observed, **kwargs)
        ]


def _classifiers(train) -> list[Any]:
    from sklearn.linear_model import LogisticRegression

    return [LogisticRegression(max_iter=3000).fit(x, train.labels) for x in train.modalities]


def _fit(backend: _Backend, model: Any, name: str, data, seed: int, settings) -> dict[str, float]:
    kwargs = {"num_steps": settings["num_steps"], "batch_size": settings["batch_size"]}
    times = {"seconds_projections": math.nan, "seconds_unimodal": math.nan}
    if name == "JNFShared":
        times["seconds_projections"] = backend.stage(model.fit_projections, data, seed, **kwargs)
    times["seconds_joint"] = backend.stage(model.fit_joint, data, seed + 1, **kwargs)
    if name in ("JNF", "JNFShared"):
        times["seconds_unimodal"] = backend.stage(model.fit_unimodal, data, seed + 2, **kwargs)
    return times


def _one_run(backend: _Backend, name: str, train, test, classifiers, seed: int, settings) -> dict:
    row: dict[str, Any] = {"model": name, "seed": seed}
    num_modalities = len(train.modalities)
    if backend.name == "pyro":
        backend.torch.manual_seed(seed)  # network initialization (benchmark script, not library)
    model = backend.build(name, [x.shape[1] for x in train.modalities])
    row.update(
        _fit(backend, model, name, [backend.array(x) for x in train.modalities], seed, settings)
    )
    # Joint coherence and sample quality from prior draws.
    prior = backend.generate(model, None, seed + 3, num_samples=500)
    predicted = np.stack([c.predict(x) for c, x in zip(classifiers, prior, strict=True)])
    row["joint_coherence"] = float(np.mean((predicted == predicted[:1]).all(0)))
    row["sample_mmd"] = float(
        np.mean(
            [
                mmd(x, t, bandwidth=_median_distance(t))
                for x, t in zip(prior, test.modalities, strict=True)
            ]
        )
    )
    # Cross-modal coherence from every observed subset of size 1 and 2.
    rows = slice(0, settings["test_rows"])
    labels = test.labels[rows]
    nuts = {"num_warmup": settings["num_warmup"]} if name.startswith("JNF") else {}
    for size in (1, 2):
        scores, seconds = [], 0.0
        for subset in itertools.combinations(range(num_modalities), size):
            observed = {j: backend.array(test.modalities[j][rows]) for j in subset}
            start = time.perf_counter()
            generated = backend.generate(
                model, observed, seed + 4, num_samples=1, **(nuts if size > 1 else {})
            )
            seconds += time.perf_counter() - start
            for target in set(range(num_modalities)) - set(subset):
                guess = classifiers[target].predict(generated[target][0])
                scores.append(float(np.mean(guess == labels)))
        row[f"cross_{size}"] = float(np.mean(scores))
        if size == 2:
            row["seconds_inference_2"] = seconds
    return row


def _median_distance(x: np.ndarray) -> float:
    sample = x[:300]
    distances = np.sqrt(((sample[:, None] - sample[None]) ** 2).sum(-1))
    return float(np.median(distances[np.triu_indices(len(sample), 1)]))


def run(
    *,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    output_dir: str | os.PathLike | None = None,
    backend: str = "pyro",
    models: Sequence[str] = MODELS,
    progress_bar: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train every model on multimodal digits for each seed; write ``jnf_digits.json``/``.md``.

    Args:
        quick: Small budget and one seed; results go to ``results/quick``.
        seeds: Seeds; default ``(0, 1, 2)`` (``(0,)`` if quick).
        output_dir: Where to write; default ``benchmarks/results`` (``.../quick`` if quick).
        backend: ``"pyro"`` or ``"numpyro"``.
        models: Subset of ``("JNF", "JNFShared", "PoEVAE", "MoEVAE")``.
        progress_bar: Show a tqdm bar over the fits.
        command: Recorded in the metadata.

    Returns:
        ``metadata``, ``settings``, ``classifier_accuracy`` (real test views), ``runs`` (one dict
        per model and seed), ``summary`` (mean, sd over seeds) and ``claims``.
    """
    from tqdm.auto import tqdm

    from mixvi.multimodal_data import make_paired_digits

    settings = SETTINGS["quick" if quick else "full"]
    seeds = tuple(seeds or (QUICK_SEEDS if quick else SEEDS))
    impl = _Backend(backend)
    train = make_paired_digits(num_modalities=3, split="train", seed=0)
    test = make_paired_digits(num_modalities=3, split="test", seed=0)
    classifiers = _classifiers(train)
    accuracy = [
        float(c.score(x, test.labels)) for c, x in zip(classifiers, test.modalities, strict=True)
    ]
    runs = []
    with tqdm(total=len(models) * len(seeds), desc=NAME, disable=not progress_bar) as bar:
        for seed in seeds:
            for name in models:
                bar.set_postfix_str(f"{name} seed={seed}")
                runs.append(_one_run(impl, name, train, test, classifiers, seed, settings))
                bar.update()
    summary = report.aggregate(runs, ("model",), METRICS)
    results = {
        "benchmark": NAME,
        "metadata": report.metadata(command),
        "backend": backend,
        "quick": quick,
        "settings": settings,
        "architecture": {
            k: list(v) if isinstance(v, tuple) else v for k, v in ARCHITECTURE.items()
        },
        "seeds": list(seeds),
        "classifier_accuracy": accuracy,
        "runs": runs,
        "summary": summary,
        "claims": _claims(summary),
    }
    out = (
        Path(output_dir)
        if output_dir
        else (report.QUICK_RESULTS_DIR if quick else report.RESULTS_DIR)
    )
    report.write_results(NAME, results, out, markdown(results))
    return results


def merge(
    paths: Sequence[str | os.PathLike],
    *,
    output_dir: str | os.PathLike | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Combine ``jnf_digits.json`` files of separate runs (e.g. one process per seed) into one.

    The runs must share backend and settings; the summary and claims are recomputed over all.
    """
    parts = [json.loads(Path(path).read_text()) for path in paths]
    first = parts[0]
    for part in parts[1:]:
        if part["settings"] != first["settings"] or part["backend"] != first["backend"]:
            raise ValueError("cannot merge runs with different settings or backends")
    runs = [run for part in parts for run in part["runs"]]
    summary = report.aggregate(runs, ("model",), METRICS)
    results = {
        **first,
        "metadata": report.metadata(command),
        "seeds": sorted({run["seed"] for run in runs}),
        "runs": runs,
        "summary": summary,
        "claims": _claims(summary),
        "merged_from": [str(path) for path in paths],
    }
    out = (
        Path(output_dir)
        if output_dir
        else (report.QUICK_RESULTS_DIR if first["quick"] else report.RESULTS_DIR)
    )
    report.write_results(NAME, results, out, markdown(results))
    return results


def _claims(summary: list[dict]) -> dict[str, Any]:
    by_model = {row["model"]: row for row in summary}

    def mean(model: str, metric: str) -> float:
        return by_model[model][metric]["mean"] if model in by_model else math.nan

    claims = {}
    for metric in ("joint_coherence", "cross_1", "cross_2"):
        claims[f"JNF > MoEVAE in {metric}"] = bool(mean("JNF", metric) > mean("MoEVAE", metric))
    for metric in ("cross_1", "cross_2"):
        claims[f"JNFShared > JNF in {metric}"] = bool(
            mean("JNFShared", metric) > mean("JNF", metric)
        )
    return claims


def _cell(stat: dict, digits: int = 3) -> str:
    if not math.isfinite(stat["mean"]):
        return "–"
    spread = f" ± {report.fmt(stat['sd'], 2)}" if math.isfinite(stat["sd"]) else ""
    return f"{report.fmt(stat['mean'], digits)}{spread}"


def markdown(results: dict[str, Any]) -> str:
    """One row per model (mean ± sd over seeds) and the paper's claims, checked."""
    settings = results["settings"]
    table = [
        [r["model"]]
        + [_cell(r[m]) for m in METRICS]
        + [f"{r['num_ok']}/{r['num_ok'] + r['num_failed']}"]
        for r in results["summary"]
    ]
    accuracy = ", ".join(report.fmt(a) for a in results["classifier_accuracy"])
    lines = [
        f"## JNF on multimodal 8×8 digits ({results['backend']}, 3 views sharing only the class)\n",
        report.metadata_markdown(results["metadata"]),
        f"{settings['num_steps']} Adam steps per stage (batch {settings['batch_size']}), "
        f"architecture {results['architecture']}; {settings['test_rows']} test rows for "
        f"cross-modal coherence; NUTS warm-up {settings['num_warmup']}; seeds {results['seeds']}. "
        f"Classifier accuracy on real test views: {accuracy}.\n",
        report.markdown_table(["model", *METRICS, "ok"], table),
        "Paper's claims:\n",
    ]
    lines += [
        f"- {claim}: {'holds' if ok else 'does not hold'}"
        for claim, ok in results["claims"].items()
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--backend", default="pyro", choices=("pyro", "numpyro"))
    parser.add_argument("--output-dir")
    parser.add_argument("--merge", nargs="+", help="combine these jnf_digits.json files instead")
    args = parser.parse_args()
    if args.merge:
        result = merge(
            args.merge,
            output_dir=args.output_dir,
            command="python -m benchmarks.jnf_digits --merge",
        )
        print(Path(result["files"]["markdown"]).read_text())
        raise SystemExit(0)
    result = run(
        quick=args.quick, seeds=args.seeds, backend=args.backend, output_dir=args.output_dir,
        command="python -m benchmarks.jnf_digits" + (" --quick" if args.quick else ""),
    )  # fmt: skip
    print(Path(result["files"]["markdown"]).read_text())
