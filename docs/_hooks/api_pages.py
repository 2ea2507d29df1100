"""mkdocs hook: expand ``<!-- public-modules: PACKAGE -->`` into one mkdocstrings block per module.

The API pages then follow the code as it lands: every public module (no leading underscore in
its path) of the package gets its own section, documented from its docstrings, with no page to
edit by hand. Modules are found on disk, so nothing is imported here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!-- public-modules: ([A-Za-z_][\w.]*) -->")


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


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Replace each marker by the mkdocstrings blocks of its package's modules."""
    return MARKER.sub(_expand, markdown)
