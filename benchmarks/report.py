"""Results on disk: JSON, Markdown tables, plots, run metadata and the docs page.

Every benchmark returns a dict with ``metadata`` (command, commit, machine, date) and writes
``<output_dir>/<name>.json``, ``<name>.md`` and ``<name>.png`` through :func:`write_results`.
:func:`write_docs_page` assembles ``docs/benchmarks.md`` from the Markdown files of the full runs.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"
DOCS_PAGE = REPO / "docs" / "benchmarks.md"

#: Order of the sections of the docs page (by file-name prefix before ``-``); others follow.
PAGE_ORDER = ("posteriordb", "waveform", "timing")


def with_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``config`` updated by ``overrides`` (a run's command-line settings), in place.

    Raises:
        ValueError: If ``overrides`` names a key ``config`` does not have (lists the known ones).
    """
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown configuration keys {sorted(unknown)}; known: {sorted(config)}")
    config.update(overrides)
    return config


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "pyro-ppl", "jax", "numpyro"):  # installed, whether imported or not
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def metadata(command: str | None = None) -> dict[str, Any]:
    """Command, commit (``+dirty`` if the tree has changes), machine, thread settings, date."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "command": command or "python -m benchmarks " + " ".join(sys.argv[1:]),
        "commit": commit or "unknown",
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()}",
        "threads": {k: os.environ.get(k, "") for k in ("OMP_NUM_THREADS", "XLA_FLAGS")},
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def metadata_markdown(meta: dict[str, Any]) -> str:
    """The provenance lines printed above every results table."""
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    lines = [
        f"Command: `{meta['command']}`  \n"
        f"Commit: `{meta['commit']}` · Machine: {meta['machine']} · Date: {meta['date']}  \n"
        f"Versions: {versions}\n"
    ]
    for earlier in meta.get("earlier", []):
        lines.append(
            f"Merged with the runs of the other guides from: `{earlier['command']}` "
            f"(commit `{earlier['commit']}`, {earlier['date']})\n"
        )
    return "".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table cell: ``digits`` significant digits, ``nan`` and ``inf`` spelled out."""
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample sd (``nan`` sd for one value) of the finite ``values``."""
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], float)
    if values.size == 0:
        return math.nan, math.nan
    sd = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return float(values.mean()), sd


def aggregate(
    runs: Sequence[dict], keys: Sequence[str], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """Group successful runs by ``keys`` and give each metric's mean, sd, min and max over seeds.

    Each group also counts ``num_ok`` and ``num_failed`` runs (failed runs carry ``error``).
    """
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in keys), []).append(run)
    rows = []
    for key, members in groups.items():
        ok = [m for m in members if "error" not in m]
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        row["num_ok"], row["num_failed"] = len(ok), len(members) - len(ok)
        row["errors"] = sorted({m["error"] for m in members if "error" in m})
        for metric in metrics:
            values = [m[metric] for m in ok if metric in m]
            mean, sd = mean_sd(values)
            finite = [v for v in values if math.isfinite(v)]
            row[metric] = {
                "mean": mean,
                "sd": sd,
                "min": min(finite, default=math.nan),
                "max": max(finite, default=math.nan),
            }
        rows.append(row)
    return rows


def winners(
    summary: Sequence[dict], *, group: str, contender: str, metric: str
) -> list[dict[str, Any]]:
    """Per ``group`` (e.g. posterior), the ``contender`` (guide) with the lowest mean ``metric``,
    its runner-up, and the margin ``runner_up / winner`` (how many times better the winner is)."""
    by_group: dict[str, list[dict]] = {}
    for row in summary:
        if math.isfinite(row[metric]["mean"]):
            by_group.setdefault(row[group], []).append(row)
    out = []
    for name, rows in by_group.items():
        rows = sorted(rows, key=lambda r: r[metric]["mean"])
        best, second = rows[0], rows[1] if len(rows) > 1 else None
        margin = (
            second[metric]["mean"] / best[metric]["mean"]
            if second and best[metric]["mean"] > 0
            else math.nan
        )
        out.append(
            {
                group: name,
                "winner": best[contender],
                "winner_value": best[metric],
                "runner_up": second[contender] if second else None,
                "runner_up_value": second[metric] if second else None,
                "margin": margin,
            }
        )
    return out


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_results(
    name: str,
    results: dict[str, Any],
    output_dir: str | os.PathLike,
    markdown: str,
    plot: Callable[[Path], None] | None = None,
) -> dict[str, str]:
    """Write ``name.json``, ``name.md`` and (if ``plot``) ``name.png`` into ``output_dir``.

    Returns the paths written, which are also stored in ``results["files"]``.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"json": str(folder / f"{name}.json"), "markdown": str(folder / f"{name}.md")}
    if plot is not None:
        files["plot"] = str(folder / f"{name}.png")
        plot(Path(files["plot"]))
    results["files"] = files
    Path(files["json"]).write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    Path(files["markdown"]).write_text(markdown)
    return files


PAGE_HEADER = """# Benchmarks

The latest committed results of `python -m benchmarks`; every section below states the command,
commit, machine and date that produced it. `python -m benchmarks all` regenerates everything
(each section also has its own sub-command), and `python -m benchmarks report` rebuilds this page
from `benchmarks/results/`. `--quick` runs a small version in about a minute and writes to
`benchmarks/results/quick/` (not committed).

| sub-command | what it measures |
|---|---|
| `posteriordb` | every guide on every posteriordb posterior against the reference NUTS draws |
| `waveform` | WAVEFORM Bayesian logistic regression (D = 22) against NUTS and log Z = -150.39 |
| `timing` | step time and peak memory relative to the framework's flow guide, D = 2, 22, 100 |
| others | the seed reproductions of the methods (`python -m benchmarks list`) |

Accuracy metrics: the standardized mean error `|E_q x - E_ref x| / sd_ref` (max and mean over
coordinates), the sd ratio `sd_q / sd_ref`, the sliced Wasserstein-2 distance on coordinates
standardized by the reference (the headline: 0 is perfect, the reference's own Monte Carlo error
is about 0.03), the Pareto k̂ of the importance weights `log p(x, y) - log q(x)` at guide draws
(k̂ > 0.7: the guide misses mass), and the importance-sampled log evidence with the guide as
proposal. For guides whose `log q` is itself an estimate (AutoSIVI), k̂ and log Z inherit its
bias. Every guide gets the same budget: Adam steps with a learning rate decayed to a tenth,
ELBO particles per step, draws for the metrics.

From Python:

```python
from benchmarks import Budget, evaluate, register_guide, register_model
row = evaluate(model, args, reference_draws, "AutoNormal", Budget(num_steps=2000),
               backend="numpyro")           # or a guide factory: lambda model: MyGuide(model)
register_model("mydata-mymodel", "pyro", build)    # build(data_dict) -> (model, args, kwargs)
register_guide("MyGuide", "pyro", "mypkg:MyGuide", elbo="mypkg:My_ELBO", num_components=4)
```
"""


def _copy_images(text: str, results: Path, docs: Path) -> str:
    """Copy images linked as ``](file.png)`` from ``results`` to ``docs/benchmarks/`` and relink
    them (the docs site serves only files under ``docs/``)."""

    def relink(match: re.Match) -> str:
        source = results / match.group(1)
        if not source.is_file():
            return match.group(0)
        (docs / "benchmarks").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, docs / "benchmarks" / source.name)
        return f"](benchmarks/{source.name})"

    return re.sub(r"\]\(([\w.-]+\.(?:png|svg|jpg))\)", relink, text)


def write_docs_page(
    results_dir: str | os.PathLike = RESULTS_DIR, path: str | os.PathLike = DOCS_PAGE
) -> Path:
    """Assemble the docs page from every ``<results_dir>/*.md`` (benchmarks first, then the seed
    reproductions), each under the command, commit, machine and date that produced it.

    Plots referenced by a section are copied to ``<page folder>/benchmarks/`` (the docs site
    serves only files under ``docs/``)."""
    folder = Path(results_dir)
    names = sorted(p.stem for p in folder.glob("*.md"))
    rank = {prefix: i for i, prefix in enumerate(PAGE_ORDER)}
    ordered = sorted(names, key=lambda n: (rank.get(n.split("-")[0], len(PAGE_ORDER)), n))
    parts = [PAGE_HEADER]
    for name in ordered:
        text = (folder / f"{name}.md").read_text().strip()
        if re.search(r"^# ", text, flags=re.M):  # one H1 per page: demote the section's headings
            text = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)
        if not text.startswith("#"):
            text = f"## {name}\n\n{text}"
        text = _copy_images(text, folder, Path(path).parent)
        parts.append(text + "\n")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(parts))
    return target
