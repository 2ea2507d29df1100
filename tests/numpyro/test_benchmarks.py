"""The benchmark harness on the NumPyro backend, against a posterior known in closed form."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from benchmarks import posteriordb, timing, waveform
from benchmarks.harness import Budget, evaluate
from benchmarks.models import MODELS, find_model, register_model
from mixvi.metrics import sliced_wasserstein
from tests.benchmark_problem import NAME, PRIOR_SCALE, write_conjugate_posterior

REPO = Path(__file__).resolve().parents[2]


def linreg(X, y):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(X.shape[-1], X.dtype), PRIOR_SCALE).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)


def build_linreg(data):
    X = jnp.asarray(data["X"], dtype=jnp.result_type(float))
    return linreg, (X, jnp.asarray(data["y"], dtype=X.dtype)), {}


@pytest.fixture
def problem(tmp_path):
    register_model(NAME, "numpyro", build_linreg)
    yield write_conjugate_posterior(tmp_path)
    MODELS["numpyro"].pop(NAME, None)


def test_evaluate_is_exact_when_the_guide_is(problem, x64):
    """When q is the posterior, log p - log q = log Z for every draw: the harness's log evidence
    and ELBO equal the closed form (float32 rounding of a ~60-nat sum: 1e-3), and the sliced W2
    of its draws is what two exact samples of the same sizes give (a factor 2 covers the spread
    of that statistic over seeds)."""
    model, args, _ = build_linreg({"X": problem.X.tolist(), "y": problem.y.tolist()})
    mean, cov = jnp.asarray(problem.mean, args[0].dtype), jnp.asarray(problem.cov, args[0].dtype)

    def exact(X, y):
        numpyro.sample("w", dist.MultivariateNormal(mean, cov))

    rng = np.random.default_rng(1)
    reference = {"w": rng.multivariate_normal(problem.mean, problem.cov, 4000)}
    budget = Budget(num_steps=2, num_particles=1, learning_rate=1e-30, num_draws=2000)
    row = evaluate(model, args, reference, lambda model: exact, budget, backend="numpyro")
    tol = 1e-8 if x64 else 1e-3 * abs(problem.log_evidence)
    assert row["log_evidence"] == pytest.approx(problem.log_evidence, abs=tol)
    assert row["elbo"] == pytest.approx(problem.log_evidence, abs=tol)
    null = sliced_wasserstein(
        rng.multivariate_normal(problem.mean, problem.cov, 2000), reference["w"]
    )
    assert row["sliced_w2"] < 2 * null
    assert row["max_mean_error"] < 4 / np.sqrt(2000) + 4 / np.sqrt(4000)  # 4 standard errors


def test_posteriordb_run_matches_meanfield_optimum(problem, tmp_path):
    """AutoNormal reaches the mean-field optimum, whose sd ratio is known exactly; 300 draws
    estimate an sd to ~4% (1/sqrt(2*300)) and a short fit adds optimization noise: 20%."""
    budget = Budget(num_steps=400, num_particles=2, learning_rate=0.05, num_draws=300)
    results = posteriordb.run(
        data=problem.root,
        guides=["AutoNormal", "AutoMultivariateNormal"],
        seeds=(0,),
        budget=budget,
        output_dir=tmp_path,
        progress_bar=False,
        backend="numpyro",
    )
    assert [r.get("error") for r in results["runs"]] == [None] * 2
    row = next(r for r in results["summary"] if r["guide"] == "AutoNormal")
    assert row["min_sd_ratio"]["mean"] == pytest.approx(problem.meanfield_sd_ratio.min(), rel=0.2)
    best = min(results["summary"], key=lambda r: r["sliced_w2"]["mean"])
    assert results["winners"][0]["winner"] == best["guide"]
    assert (tmp_path / "posteriordb-numpyro.md").read_text().count(NAME) >= 3


def test_numpyro_run_never_imports_torch(problem, tmp_path):
    """A NumPyro run in an environment that has torch must not import it."""
    code = (
        "import sys, json\n"
        "from benchmarks.cli import main\n"
        "from benchmarks.models import register_model\n"
        "from tests.numpyro.test_benchmarks import build_linreg\n"
        f"register_model({NAME!r}, 'numpyro', build_linreg)\n"
        f"main(['posteriordb', '--quick', '--backend', 'numpyro', '--data', {str(problem.root)!r},"
        f" '--guides', 'AutoNormal', '--output-dir', {str(tmp_path)!r}, '--no-progress'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, env=dict(os.environ), timeout=300
    )
    runs = json.loads((tmp_path / "posteriordb-numpyro.json").read_text())["runs"]
    assert len(runs) == 1 and "error" not in runs[0]


def test_cli_quick_from_repo_root_on_default_data(bench_data, tmp_path):
    """``python -m benchmarks posteriordb --quick`` from the repository root, default data place,
    narrowed to one posterior and one guide so the default suite stays fast."""
    from mixvi.bench_data import list_posteriordb

    names = [n for n in list_posteriordb() if find_model(n, "numpyro") is not None]
    if not names:
        pytest.skip("no NumPyro posteriordb model registered yet (numpyro_mixvi.posteriordb)")
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "posteriordb",
        "--quick",
        "--backend",
        "numpyro",
        "--posteriors",
        names[0],
        "--guides",
        "AutoNormal",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
    ]
    subprocess.run(command, cwd=REPO, check=True, env=dict(os.environ), timeout=300)
    runs = json.loads((tmp_path / "posteriordb-numpyro.json").read_text())["runs"]
    assert runs and all("error" not in r for r in runs)


@pytest.mark.slow
def test_cli_quick_full(bench_data, tmp_path):
    """The whole ``--quick`` run, every posterior with a model and every guide."""
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "posteriordb",
        "--quick",
        "--backend",
        "numpyro",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
    ]
    subprocess.run(command, cwd=REPO, check=True, env=dict(os.environ), timeout=900)
    results = json.loads((tmp_path / "posteriordb-numpyro.json").read_text())
    assert results["runs"] or results["skipped"]["posteriors"]


@pytest.mark.slow  # compiles two jitted programs; the Pyro twin runs in the default suite
def test_waveform_quick_run(bench_data, tmp_path):
    """A short WAVEFORM fit: finite scores, accuracy in [0, 1], and the NUTS row for comparison
    (the reference posterior predicts better than chance: accuracy > 0.5, log-lik > log 0.5)."""
    results = waveform.run(
        backend="numpyro",
        guides=["AutoNormal"],
        seeds=(0,),
        output_dir=tmp_path,
        progress_bar=False,
        budget=Budget(num_steps=100, num_particles=2, learning_rate=0.05, num_draws=200),
    )
    (run,) = results["runs"]
    assert "error" not in run, run
    assert np.isfinite([run["sliced_w2"], run["log_evidence"], run["test_log_lik"]]).all()
    assert 0.0 <= run["test_accuracy"] <= 1.0
    assert results["nuts"]["test_accuracy"] > 0.5
    assert results["nuts"]["test_log_lik"] > np.log(0.5)
    assert "NUTS (reference)" in (tmp_path / "waveform-numpyro.md").read_text()


def test_timing_ratios_to_the_flow_guide(tmp_path):
    results = timing.run(
        backend="numpyro",
        guides=["AutoNormal", "AutoIAFNormal"],
        dims=(3,),
        output_dir=tmp_path,
        budget=Budget(num_steps=3, num_particles=2),
        progress_bar=False,
    )
    assert len(results["runs"]) == 2 and all("error" not in r for r in results["runs"])
    for r in results["runs"]:
        assert r["step_ms"] > 0
        if r["guide"] == "AutoIAFNormal":
            assert r["step_ratio"] == 1.0
    assert "Milliseconds per step" in (tmp_path / "timing.md").read_text()
