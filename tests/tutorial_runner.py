"""Run a tutorial script top to bottom at small budgets, as CI does for every tutorial."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_SECONDS = 600


def tutorials(prefix: str) -> list[Path]:
    """Tutorials of one backend, ``tutorials/<prefix>_*.py``."""
    return sorted((ROOT / "tutorials").glob(f"{prefix}_*.py"))


def run_tutorial(path: Path, tmp_path: Path) -> str:
    """Execute ``path`` with ``MIXVI_TUTORIAL_QUICK=1`` in this interpreter; return its stdout.

    Figures are saved to ``tmp_path`` (``MIXVI_TUTORIAL_OUTPUT``) so that the plotting code runs
    too. A failure shows the tutorial's last output lines.
    """
    env = dict(
        os.environ,
        MIXVI_TUTORIAL_QUICK="1",
        MIXVI_TUTORIAL_OUTPUT=str(tmp_path),
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    completed = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-40:])
        raise AssertionError(f"{path.name} failed (exit {completed.returncode}):\n{tail}")
    return completed.stdout
