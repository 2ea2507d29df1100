"""The benchmark harness on the Pyro backend, against a posterior known in closed form."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.nn import PyroParam

from benchmarks import posteriordb, timing, waveform
from benchmarks.cli import main
from benchmarks.harness import Budget, evaluate
from benchmarks.models import MODELS, find_model, register_model
from mixvi.metrics import sliced_wasserstein
from tests.benchmark_problem import NAME, PRIOR_SCALE, write_conjugate_posterior

REPO = Path(__file__).resolve().parents[2]


def linreg(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), PRIOR_SCALE).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), 1.0), obs=y)


def build_linreg(data):
    X = torch.as_tensor(data["X"], dtype=torch.get_default_dtype())
    return linreg, (X, torch.as_tensor(data["y"], dtype=X.dtype)), {}


@pytest.fixture
def problem(tmp_path):
    register_model(NAME, "pyro", build_linreg)
    yield write_conjugate_posterior(tmp_path)
    MODELS["pyro"].pop(NAME, None)


def _exact_guide(problem, args):
    """AutoMultivariateNormal set to the exact posterior (a zero learning rate keeps it there)."""

    def factory(model):
        guide = AutoMultivariateNormal(model)
        guide(*args)  # creates the parameters
        prototype = args[0]
        chol = torch.as_tensor(np.linalg.cholesky(problem.cov), dtype=prototype.dtype)
        guide.loc = torch.nn.Parameter(torch.as_tensor(problem.mean, dtype=prototype.dtype))
        guide.scale = PyroParam(chol.diagonal(), constraints.softplus_positive)
        guide.scale_tril = PyroParam(
            chol / chol.diagonal()[:, None], constraints.unit_lower_cholesky
        )
        return guide

    return factory


def test_evaluate_is_exact_when_the_guide_is(problem, dtype):
    """When q is the posterior, log p - log q = log Z for every draw: the harness's log evidence
    and ELBO equal the closed form (float32 rounding of a ~60-nat sum: 1e-3), and the sliced W2
    of its draws is what two exact samples of the same sizes give (Monte Carlo level; a factor 2
    covers the spread of that statistic over seeds)."""
    model, args, _ = build_linreg({"X": problem.X.tolist(), "y": problem.y.tolist()})
    rng = np.random.default_rng(1)
    reference = {"w": rng.multivariate_normal(problem.mean, problem.cov, 4000)}
    budget = Budget(num_steps=2, num_particles=1, learning_rate=1e-30, num_draws=2000)
    row = evaluate(model, args, reference, _exact_guide(problem, args), budget, backend="pyro")
    tol = 1e-3 * abs(problem.log_evidence) if dtype == torch.float32 else 1e-8
    assert row["log_evidence"] == pytest.approx(problem.log_evidence, abs=tol)
    assert row["elbo"] == pytest.approx(problem.log_evidence, abs=tol)
    null = sliced_wasserstein(
        rng.multivariate_normal(problem.mean, problem.cov, 2000), reference["w"]
    )
    assert row["sliced_w2"] < 2 * null
    assert row["max_mean_error"] < 4 / np.sqrt(2000) + 4 / np.sqrt(4000)  # 4 standard errors
    assert row["fit_seconds"] > 0 and row["peak_memory_mb"] >= 0


def test_posteriordb_run_writes_results(problem, tmp_path):
    budget = Budget(num_steps=300, num_particles=2, learning_rate=0.05, num_draws=300)
    # AutoMultivariateNormal rides along to fill the winner table; AutoNormal is checked exactly.
    results = posteriordb.run(
        data=problem.root,
        guides=["AutoNormal", "AutoMultivariateNormal"],
        seeds=(0, 1),
        budget=budget,
        output_dir=tmp_path / "out",
        progress_bar=False,
        backend="pyro",
    )
    assert [r.get("error") for r in results["runs"]] == [None] * 4
    on_disk = json.loads((tmp_path / "out" / "posteriordb-pyro.json").read_text())
    assert on_disk["winners"][0]["posterior"] == NAME
    best = min(on_disk["summary"], key=lambda r: r["sliced_w2"]["mean"])
    assert on_disk["winners"][0]["winner"] == best["guide"]
    row = next(r for r in on_disk["summary"] if r["guide"] == "AutoNormal")
    assert row["num_ok"] == 2 and row["sliced_w2"]["sd"] >= 0
    text = (tmp_path / "out" / "posteriordb-pyro.md").read_text()
    assert "Winner per posterior" in text and on_disk["metadata"]["commit"] in text
    assert (tmp_path / "out" / "posteriordb-pyro.png").stat().st_size > 0
    # The mean-field optimum on a Gaussian has a known sd ratio; 300 draws estimate an sd to
    # ~4% (1/sqrt(2*300)), and a 300-step fit adds optimization noise: 20% tolerance.
    assert row["min_sd_ratio"]["mean"] == pytest.approx(problem.meanfield_sd_ratio.min(), rel=0.2)


def test_append_adds_a_guide_to_earlier_results(problem, tmp_path):
    budget = Budget(num_steps=20, num_particles=2, learning_rate=0.05, num_draws=100)
    options = dict(data=problem.root, seeds=(0,), output_dir=tmp_path, progress_bar=False)
    posteriordb.run(guides=["AutoNormal"], budget=budget, backend="pyro", **options)
    merged = posteriordb.run(
        guides=["AutoMultivariateNormal"], budget=budget, backend="pyro", append=True, **options
    )
    assert merged["guides"] == ["AutoNormal", "AutoMultivariateNormal"]
    assert {r["guide"] for r in merged["runs"]} == {"AutoNormal", "AutoMultivariateNormal"}
    assert len(merged["metadata"]["earlier"]) == 1
    on_disk = json.loads((tmp_path / "posteriordb-pyro.json").read_text())
    assert len(on_disk["summary"]) == 2
    assert "Merged with the runs" in (tmp_path / "posteriordb-pyro.md").read_text()
    with pytest.raises(ValueError, match="different budget"):
        posteriordb.run(
            guides=["AutoIAFNormal"], budget=budget._replace(num_steps=21), backend="pyro",
            append=True, **options,
        )  # fmt: skip


def test_failing_guide_is_reported_not_fatal(problem, tmp_path):
    def broken(data):
        raise ValueError("model builder failed on purpose")

    register_model(NAME, "pyro", broken)
    results = posteriordb.run(
        data=problem.root,
        guides=["AutoNormal"],
        seeds=(0,),
        quick=True,
        output_dir=tmp_path,
        progress_bar=False,
        backend="pyro",
    )
    assert results["runs"][0]["error"].startswith("ValueError: model builder failed")
    assert "model builder failed" in (tmp_path / "posteriordb-pyro.md").read_text()


def test_cli_quick_on_user_folder(problem, tmp_path, capsys):
    status = main(
        [
            "posteriordb",
            "--quick",
            "--backend",
            "pyro",
            "--data",
            str(problem.root / "posteriordb"),
            "--guides",
            "AutoNormal",
            "AutoIAFNormal",
            "--output-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert status == 0
    results = json.loads((tmp_path / "posteriordb-pyro.json").read_text())
    assert {r["guide"] for r in results["runs"]} == {"AutoNormal", "AutoIAFNormal"}
    assert all("error" not in r for r in results["runs"])
    assert "posteriordb" in capsys.readouterr().out


def test_cli_quick_from_repo_root_on_default_data(bench_data, tmp_path):
    """``python -m benchmarks posteriordb --quick`` from the repository root, default data place,
    narrowed to one posterior and one guide so the default suite stays fast."""
    from mixvi.bench_data import list_posteriordb

    names = [n for n in list_posteriordb() if find_model(n, "pyro") is not None]
    if not names:
        pytest.skip("no Pyro posteriordb model registered yet (pyro_mixvi.posteriordb)")
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "posteriordb",
        "--quick",
        "--backend",
        "pyro",
        "--posteriors",
        names[0],
        "--guides",
        "AutoNormal",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
    ]
    subprocess.run(command, cwd=REPO, check=True, env=dict(os.environ), timeout=300)
    runs = json.loads((tmp_path / "posteriordb-pyro.json").read_text())["runs"]
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
        "pyro",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
    ]
    subprocess.run(command, cwd=REPO, check=True, env=dict(os.environ), timeout=900)
    results = json.loads((tmp_path / "posteriordb-pyro.json").read_text())
    assert results["runs"] or results["skipped"]["posteriors"]


def test_waveform_quick_run(bench_data, tmp_path):
    """A short WAVEFORM fit: finite scores, accuracy in [0, 1], and the NUTS row for comparison
    (the reference posterior predicts better than chance: accuracy > 0.5, log-lik > log 0.5)."""
    results = waveform.run(
        backend="pyro",
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
    assert "NUTS (reference)" in (tmp_path / "waveform-pyro.md").read_text()


def test_timing_ratios_to_the_flow_guide(tmp_path):
    results = timing.run(
        backend="pyro",
        guides=["AutoNormal", "AutoIAFNormal"],
        dims=(2, 5),
        output_dir=tmp_path,
        budget=Budget(num_steps=3, num_particles=2),
        progress_bar=False,
    )
    assert len(results["runs"]) == 4 and all("error" not in r for r in results["runs"])
    for r in results["runs"]:
        assert r["step_ms"] > 0
        if r["guide"] == "AutoIAFNormal":
            assert r["step_ratio"] == 1.0
    assert "Milliseconds per step" in (tmp_path / "timing.md").read_text()
