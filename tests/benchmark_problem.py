"""A posteriordb-layout folder with an exactly known posterior, for the benchmark-harness tests.

Conjugate linear regression ``w ~ N(0, 10^2 I_3)``, ``y ~ N(X w, 1)`` with strongly correlated
columns of ``X``: the posterior is Gaussian with known mean and covariance, its mean-field
(KL(q||p)-optimal) sd is ``1 / sqrt(precision_ii)``, and its log evidence has a closed form.
The reference draws are exact draws, written like posteriordb's ``reference.npz``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import stats

NAME = "linreg-conjugate"
PRIOR_SCALE = 10.0


class ConjugateProblem(NamedTuple):
    root: Path
    X: np.ndarray
    y: np.ndarray
    mean: np.ndarray
    cov: np.ndarray
    log_evidence: float
    meanfield_sd_ratio: np.ndarray


def write_conjugate_posterior(
    root: Path, *, num_obs: int = 40, num_draws: int = 4000
) -> ConjugateProblem:
    """Write ``root/posteriordb/linreg-conjugate/{data.json, reference.npz, info.json}``."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(num_obs, 1))
    X = base + 0.3 * rng.normal(size=(num_obs, 3))  # pairwise correlation about 0.9
    y = X @ np.array([1.0, -0.5, 0.25]) + rng.normal(size=num_obs)
    precision = X.T @ X + np.eye(3) / PRIOR_SCALE**2
    cov = np.linalg.inv(precision)
    mean = cov @ X.T @ y
    log_evidence = stats.multivariate_normal(
        np.zeros(num_obs), PRIOR_SCALE**2 * X @ X.T + np.eye(num_obs)
    ).logpdf(y)
    folder = root / "posteriordb" / NAME
    folder.mkdir(parents=True)
    (folder / "data.json").write_text(json.dumps({"N": num_obs, "X": X.tolist(), "y": y.tolist()}))
    np.savez_compressed(
        folder / "reference.npz", w=rng.multivariate_normal(mean, cov, size=num_draws)
    )
    (folder / "info.json").write_text(json.dumps({"posterior_name": NAME, "dimension": 3}))
    ratio = np.sqrt(1.0 / np.diag(precision)) / np.sqrt(np.diag(cov))
    return ConjugateProblem(root, X, y, mean, cov, float(log_evidence), ratio)
