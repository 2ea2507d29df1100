"""Backend-free parts of the benchmark harness: aggregation, winners, reports, discovery, memory."""

import math

import numpy as np
import pytest

from benchmarks import report, reproductions
from benchmarks.memory import PeakMemory
from benchmarks.waveform import predictive


def _runs():
    return [
        {"posterior": "a", "guide": "G1", "seed": 0, "sliced_w2": 0.10},
        {"posterior": "a", "guide": "G1", "seed": 1, "sliced_w2": 0.14},
        {"posterior": "a", "guide": "G2", "seed": 0, "sliced_w2": 0.30},
        {"posterior": "a", "guide": "G2", "seed": 1, "error": "FloatingPointError: loss is nan"},
        {"posterior": "b", "guide": "G1", "seed": 0, "sliced_w2": 0.50},
        {"posterior": "b", "guide": "G2", "seed": 0, "sliced_w2": 0.25},
    ]


def test_aggregate_over_seeds():
    summary = report.aggregate(_runs(), ("posterior", "guide"), ("sliced_w2",))
    row = next(r for r in summary if (r["posterior"], r["guide"]) == ("a", "G1"))
    assert row["sliced_w2"]["mean"] == pytest.approx(0.12)
    assert row["sliced_w2"]["sd"] == pytest.approx(np.std([0.10, 0.14], ddof=1))
    assert (row["sliced_w2"]["min"], row["sliced_w2"]["max"]) == (0.10, 0.14)
    failed = next(r for r in summary if (r["posterior"], r["guide"]) == ("a", "G2"))
    assert (failed["num_ok"], failed["num_failed"]) == (1, 1)
    assert failed["errors"] == ["FloatingPointError: loss is nan"]
    assert math.isnan(failed["sliced_w2"]["sd"])  # one seed: no spread, not zero


def test_winners_and_margin():
    summary = report.aggregate(_runs(), ("posterior", "guide"), ("sliced_w2",))
    by_posterior = {
        w["posterior"]: w
        for w in report.winners(summary, group="posterior", contender="guide", metric="sliced_w2")
    }
    assert by_posterior["a"]["winner"] == "G1" and by_posterior["a"]["runner_up"] == "G2"
    assert by_posterior["a"]["margin"] == pytest.approx(0.30 / 0.12)
    assert by_posterior["b"]["winner"] == "G2"
    assert by_posterior["b"]["margin"] == pytest.approx(2.0)


def test_markdown_table_and_fmt():
    table = report.markdown_table(
        ["x", "y"], [[1, report.fmt(0.123456)], ["z", report.fmt(math.nan)]]
    )
    assert table.splitlines() == ["| x | y |", "|---|---|", "| 1 | 0.123 |", "| z | nan |"]


def test_metadata_names_command_commit_machine_date():
    meta = report.metadata("python -m benchmarks posteriordb")
    assert meta["command"] == "python -m benchmarks posteriordb"
    assert meta["commit"] and meta["machine"] and meta["date"].endswith("UTC")
    text = report.metadata_markdown(meta)
    assert meta["commit"] in text and meta["date"] in text


def test_docs_page_orders_sections_and_links_plots(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "timing.md").write_text("## Timing\n\n![t](timing.png)\n")
    (results / "timing.png").write_bytes(b"png")
    (results / "posteriordb.md").write_text("## posteriordb\n\ntable\n")
    (results / "amf.md").write_text("AMF table\n")
    (results / "cwm_euler.md").write_text("# CWM\n\n## Table\n")
    page = report.write_docs_page(results, tmp_path / "docs" / "benchmarks.md").read_text()
    assert page.index("## posteriordb") < page.index("## Timing") < page.index("## amf")
    assert "\n## CWM\n" in page and "\n### Table\n" in page and page.count("\n# ") == 0
    assert "](benchmarks/timing.png)" in page
    assert (tmp_path / "docs" / "benchmarks" / "timing.png").read_bytes() == b"png"


def test_discovers_reproductions_without_importing(tmp_path):
    (tmp_path / "harness.py").write_text("def run(): pass\n")
    (tmp_path / "_private.py").write_text("def run(): pass\n")
    (tmp_path / "helpers.py").write_text("def other(): pass\n")
    (tmp_path / "amf.py").write_text(
        '"""AMF six targets."""\nimport not_installed\ndef run(): pass\n'
    )
    assert reproductions.discover(tmp_path) == ["amf"]
    assert reproductions.summary_line("amf", tmp_path) == "AMF six targets."


def test_peak_memory_sees_a_large_allocation():
    """An 80 MB array touched inside the block raises the resident set by at least that much,
    less allocator slack (60 MiB floor)."""
    with PeakMemory() as peak:
        block = np.ones(10_000_000)
        del block
    assert peak.method in ("hwm", "sampled")
    assert peak.megabytes > 60


def test_predictive_of_a_point_mass():
    """With every draw equal to w, p(y|x) = sigmoid(±x.w) exactly."""
    rng = np.random.default_rng(0)
    X, w = rng.normal(size=(50, 3)), np.array([1.0, -2.0, 0.5])
    y = (rng.random(50) < 0.5).astype(float)
    out = predictive(np.tile(w, (7, 1)), X, y)
    p = 1 / (1 + np.exp(-X @ w))
    expected = np.mean(np.where(y > 0.5, np.log(p), np.log1p(-p)))
    assert out["test_log_lik"] == pytest.approx(expected, rel=1e-12)
    assert out["test_accuracy"] == pytest.approx(np.mean((p > 0.5) == (y > 0.5)))


def test_staged_fit_spends_the_svi_budget_in_gradient_steps():
    from benchmarks.guides import GUIDES, register_guide
    from benchmarks.harness import Budget

    spec = GUIDES["pyro"]["AutoFlowMixture"]
    assert spec.trainer == "fit"
    # Two trained experts (RBIG is fit, not trained) share the 2000 steps of every SVI guide.
    assert spec.fit_keywords(Budget(num_steps=2000))["num_steps"] == 1000
    only_maf = spec._replace(options={"experts": ("maf", "rbig")})
    assert only_maf.fit_keywords(Budget(num_steps=2000))["num_steps"] == 2000
    with pytest.raises(ValueError, match="trainer"):
        register_guide("X", "pyro", "x:X", trainer="svi")
