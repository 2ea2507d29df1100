"""Griffe extension: render the project's Sphinx-flavoured Google docstrings as Markdown.

* ``Example:`` sections become griffe's ``Examples:`` (griffe knows only the plural and would
  render the singular as an admonition whose ``>>>`` lines become nested quotes).
* Sphinx roles (``:func:`x```, ``:class:`~a.B```, ``:math:`x```) become code spans.
* ``.. math::`` directives become fenced blocks (the site loads no math renderer: it must work
  offline), with the formula as written.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|obj|data|exc|math):`(~?)([^`]+)`")
MATH = re.compile(r"^([ \t]*)\.\. math::[ \t]*(.*)\n((?:\1[ \t]+.*\n|[ \t]*\n)*)", re.MULTILINE)


def _math_block(match: re.Match) -> str:
    indent, first, body = match.group(1), match.group(2).strip(), match.group(3)
    lines = [first] if first else []
    lines += [line.strip() for line in body.rstrip().splitlines() if line.strip()]
    block = "\n".join(f"{indent}{line}" for line in lines)
    return f"{indent}```\n{block}\n{indent}```\n\n"


def _role(match: re.Match) -> str:
    name = match.group(2).rsplit(".", 1)[-1] if match.group(1) else match.group(2)
    return f"`{name}`"


def to_markdown(text: str) -> str:
    """Apply the three rewrites to one docstring."""
    text = SINGULAR.sub(r"\1Examples:", text)
    text = MATH.sub(_math_block, text + "\n")
    return ROLE.sub(_role, text).rstrip("\n")


class ExampleSections(griffe.Extension):
    """Rewrite every loaded docstring with :func:`to_markdown`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
