"""Every tutorial is tested and published: named by backend, listed in the docs navigation.

`tests/pyro/test_tutorials.py` and `tests/numpyro/test_tutorials.py` execute the tutorials whose
names start with their backend, so a tutorial without that prefix would escape CI.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))


def test_tutorials_exist():
    assert TUTORIALS, "no tutorial found in tutorials/"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_named_by_backend(path):
    assert path.name.startswith(("pyro_", "numpyro_")), (
        f"{path.name}: name it pyro_*.py or numpyro_*.py so the backend's test_tutorials runs it"
    )


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_in_docs_navigation(path):
    nav = (ROOT / "mkdocs.yml").read_text()
    assert f"tutorials/{path.stem}.ipynb" in nav, f"{path.name} is missing from mkdocs.yml nav"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_is_jupytext_percent(path):
    text = path.read_text()
    assert "format_name: percent" in text and "# %%" in text, (
        f"{path.name}: write it in jupytext percent format (a '# %%' marker per cell)"
    )
