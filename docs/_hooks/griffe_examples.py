"""Griffe extension: read the project's ``Example:`` docstring sections as griffe's ``Examples:``.

The style guide (``CONTRIBUTING.md``) writes ``Example:``; griffe's Google parser only knows the
plural and would render the singular as an admonition whose ``>>>`` lines become nested quotes.
Renaming before parsing makes every example a highlighted console block.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headers to ``Examples:`` in every loaded docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = SINGULAR.sub(r"\1Examples:", obj.docstring.value)
