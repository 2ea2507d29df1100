"""The seed reproductions of the method issues, found by looking at ``benchmarks/*.py``.

A reproduction is any module ``benchmarks/<name>.py`` that is not part of the harness and defines
``run(*, quick=False, seeds=..., output_dir=...) -> dict`` (the contract in HELPERS.md). They are
listed without importing them (a Pyro reproduction must not break a torch-free environment) and
imported only when run.

Example:
    >>> "posteriordb" in discover()
    False
"""

from __future__ import annotations

import ast
import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent

#: Modules of the harness itself, never offered as reproductions.
HARNESS_MODULES = frozenset(
    {
        "cli",
        "guides",
        "harness",
        "memory",
        "models",
        "report",
        "reproductions",
        "posteriordb",
        "timing",
        "waveform",
    }
)


def _defines_run(path: Path) -> bool:
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return False
    return any(isinstance(node, ast.FunctionDef) and node.name == "run" for node in tree.body)


def discover(folder: str | os.PathLike = PACKAGE_DIR) -> list[str]:
    """Names of the reproduction modules in ``folder``, sorted."""
    return sorted(
        path.stem
        for path in Path(folder).glob("*.py")
        if not path.stem.startswith("_") and path.stem not in HARNESS_MODULES and _defines_run(path)
    )


def summary_line(name: str, folder: str | os.PathLike = PACKAGE_DIR) -> str:
    """First line of the module's docstring (for ``--help``), read without importing it."""
    doc = ast.get_docstring(ast.parse((Path(folder) / f"{name}.py").read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else f"seed reproduction {name}"


def run_reproduction(
    name: str,
    *,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Import ``benchmarks.<name>`` and call its ``run``, passing only the options that were given.

    Raises:
        KeyError: If ``name`` is not a reproduction; the message lists the ones there are.
    """
    if name not in discover():
        raise KeyError(f"no seed reproduction {name!r}; available: {discover()}")
    options: dict[str, Any] = {"quick": quick}
    if seeds is not None:
        options["seeds"] = tuple(seeds)
    if output_dir is not None:
        options["output_dir"] = output_dir
    return importlib.import_module(f"benchmarks.{name}").run(**options)
