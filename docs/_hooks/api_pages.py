"""mkdocs hook: pages that follow the code as it lands, with no page to edit by hand.

* ``<!-- public-modules: PACKAGE -->`` expands into one mkdocstrings block per public module (no
  leading underscore in its path), found on disk, so nothing is imported here.
* ``docs/benchmarks.md`` is written by the benchmark harness (``python -m benchmarks report``);
  when it exists it joins the navigation and ``<!-- benchmarks-link -->`` links to it, otherwise
  the marker says it is not there yet (a missing page would fail the strict build).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!-- public-modules: ([A-Za-z_][\w.]*) -->")
BENCHMARKS_PAGE = ROOT / "docs" / "benchmarks.md"
BENCHMARKS_LINK = "<!-- benchmarks-link -->"


def public_modules(package: str) -> list[str]:
    """Dotted names of the package's public modules (sub-packages' ``__init__`` excluded)."""
    base = ROOT / Path(*package.split("."))
    names = []
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__" or any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return names


def _expand(match: re.Match) -> str:
    blocks = [
        f"::: {name}\n    options:\n      show_root_full_path: true\n      heading_level: 3"
        for name in public_modules(match.group(1))
    ]
    return "\n\n".join(blocks) if blocks else "*No public module yet.*"


def on_config(config: dict, **kwargs) -> dict:
    """Add the benchmark results page to the navigation when the harness has written it."""
    if BENCHMARKS_PAGE.exists() and "benchmarks.md" not in str(config["nav"]):
        position = next(
            (i for i, item in enumerate(config["nav"]) if "API reference" in item),
            len(config["nav"]),
        )
        config["nav"].insert(position, {"Benchmark results": "benchmarks.md"})
    return config


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Expand the module markers and the benchmarks link."""
    if BENCHMARKS_PAGE.exists():
        link = "[Benchmark results](benchmarks.md), written by `python -m benchmarks report`."
    else:
        link = "*The benchmark results page is not on this branch yet.*"
    return MARKER.sub(_expand, markdown).replace(BENCHMARKS_LINK, link)
