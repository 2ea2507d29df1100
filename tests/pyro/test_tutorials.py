"""Every `tutorials/pyro_*.py` runs top to bottom at small budgets (MIXVI_TUTORIAL_QUICK=1)."""

import pytest

from tests.tutorial_runner import run_tutorial, tutorials

TUTORIALS = tutorials("pyro")


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path, tmp_path):
    run_tutorial(path, tmp_path)
    assert list(tmp_path.glob("*.png")), f"{path.name} saved no figure under MIXVI_TUTORIAL_OUTPUT"
