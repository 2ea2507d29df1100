"""``python -m benchmarks SUBCOMMAND [options]``: the benchmarks and seed reproductions.

Sub-commands: ``posteriordb``, ``waveform``, ``timing``, one per seed reproduction found in
``benchmarks/``, ``all`` (every benchmark, then the docs page), ``report`` (rebuild the docs page
from ``benchmarks/results``) and ``list``. ``--quick`` runs a small version (about a minute) and
writes to ``benchmarks/results/quick`` so that committed results are not overwritten.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import report, reproductions
from benchmarks.harness import Budget

BENCHMARKS = ("posteriordb", "waveform", "timing")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small run (about a minute)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="seeds (default depends on the benchmark)"
    )
    parser.add_argument("--output-dir", help="where to write JSON/Markdown/plots")


def _add_fit_options(parser: argparse.ArgumentParser, *, backends: Sequence[str]) -> None:
    parser.add_argument(
        "--backend", choices=backends, help="default: pyro where torch is installed"
    )
    parser.add_argument(
        "--guides", nargs="+", help="registered guide names (default: all importable)"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per fit")
    parser.add_argument("--particles", type=int, help="ELBO particles per step")
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument("--draws", type=int, help="guide draws for the metrics")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-parser per benchmark and per seed reproduction."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    pdb = sub.add_parser("posteriordb", help="every guide on every posteriordb posterior")
    _add_common(pdb)
    _add_fit_options(pdb, backends=("pyro", "numpyro"))
    pdb.add_argument("--posteriors", nargs="+", help="posterior names (default: all with a model)")
    pdb.add_argument(
        "--data", help="bench-data root or posteriordb folder (default: standard place)"
    )
    pdb.add_argument(
        "--append",
        action="store_true",
        help="merge these guides into the existing results file (same budget and seeds)",
    )
    wave = sub.add_parser("waveform", help="WAVEFORM Bayesian logistic regression against NUTS")
    _add_common(wave)
    _add_fit_options(wave, backends=("pyro", "numpyro"))
    wave.add_argument("--data", help="bench-data root (default: standard place)")
    timing = sub.add_parser(
        "timing", help="step time and memory relative to the built-in flow guide"
    )
    _add_common(timing)
    _add_fit_options(timing, backends=("pyro", "numpyro", "both"))
    timing.add_argument("--dims", type=int, nargs="+", help="latent dimensions (default 2 22 100)")
    for name in reproductions.discover():
        repro = sub.add_parser(name, help=reproductions.summary_line(name))
        _add_common(repro)
    everything = sub.add_parser("all", help="every benchmark and reproduction, then the docs page")
    _add_common(everything)
    sub.add_parser("report", help="rebuild docs/benchmarks.md from benchmarks/results")
    sub.add_parser("list", help="registered guides, posteriors with models, reproductions")
    return parser


def _budget(module: Any, args: argparse.Namespace) -> Budget | None:
    base = module.QUICK_BUDGET if args.quick else module.BUDGET
    changes = {
        field: value
        for field, value in (
            ("num_steps", args.steps),
            ("num_particles", args.particles),
            ("learning_rate", args.lr),
            ("num_draws", args.draws),
        )
        if value is not None
    }
    return base._replace(**changes) if changes else None


def _run_benchmark(name: str, args: argparse.Namespace, command: str) -> dict:
    module = importlib.import_module(f"benchmarks.{name}")
    options: dict[str, Any] = {
        "quick": args.quick,
        "seeds": args.seeds,
        "output_dir": args.output_dir,
    }
    if hasattr(args, "backend"):
        options.update(
            backend=args.backend,
            guides=args.guides,
            budget=_budget(module, args),
            progress_bar=not args.no_progress,
            command=command,
        )
    for extra in ("posteriors", "data", "dims", "append"):
        if getattr(args, extra, None) is not None:
            options[extra] = getattr(args, extra)
    return module.run(**options)


def _list() -> None:
    from benchmarks.guides import GUIDES
    from benchmarks.models import MODELS, package_models

    for backend, guides in GUIDES.items():
        print(f"{backend} guides:")
        for spec in guides.values():
            reason = spec.unavailable_reason()
            print(f"  {spec.name:24s} {'ready' if reason is None else 'unavailable: ' + reason}")
    for backend in GUIDES:
        try:
            names = sorted({*MODELS[backend], *package_models(backend)})
        except ImportError as error:
            names = [f"(cannot import {backend}: {error})"]
        print(f"{backend} posteriordb models: {', '.join(names) or 'none registered'}")
    print(f"seed reproductions: {', '.join(reproductions.discover()) or 'none yet'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = "python -m benchmarks " + " ".join(argv)
    if args.command == "list":
        _list()
        return 0
    if args.command == "report":
        print(report.write_docs_page())
        return 0
    names = [args.command] if args.command != "all" else [*BENCHMARKS, *reproductions.discover()]
    for name in names:
        if name in BENCHMARKS:
            if args.command == "all":
                args = build_parser().parse_args([name, *argv[1:]])
            results = _run_benchmark(name, args, command)
        else:
            results = reproductions.run_reproduction(
                name, quick=args.quick, seeds=args.seeds, output_dir=args.output_dir
            )
        files = results.get("files", {}) if isinstance(results, dict) else {}
        print(f"{name}: wrote {', '.join(files.values()) or 'results'}")
        if name in BENCHMARKS and files.get("markdown"):
            print(open(files["markdown"]).read())
    if not args.quick and args.output_dir is None:
        print(f"docs page: {report.write_docs_page()}")
    return 0
