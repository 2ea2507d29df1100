"""log_evidence and psis_diagnostic against conjugate models with known evidence (Pyro)."""

import math

import numpy as np
import pytest
from scipy import stats

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")

import pyro.distributions as dist  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoDiagonalNormal  # noqa: E402
from pyro.infer.importance import psis_diagnostic as pyro_psis_diagnostic  # noqa: E402
from pyro.optim import Adam  # noqa: E402

from mixvi.psis import log_evidence_from_weights  # noqa: E402
from pyro_mixvi.diagnostics import (  # noqa: E402
    log_evidence,
    log_importance_weights,
    psis_diagnostic,
)

# Normal-normal: mu ~ N(0, 1) (2 coordinates), y_i | mu ~ N(mu, 1), i = 1..N.
NUM_DATA = 10


def normal_data():
    rng = np.random.default_rng(0)
    y = np.array([0.5, -1.0]) + rng.normal(size=(NUM_DATA, 2))
    return torch.as_tensor(y, dtype=torch.get_default_dtype())


def normal_model(y):
    mu = pyro.sample("mu", dist.Normal(y.new_zeros(2), 1.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0).to_event(1), obs=y)


def normal_posterior(y):
    n = y.shape[0]
    return y.sum(0) / (n + 1), (n + 1.0) ** -0.5


def normal_evidence(y):
    """Each coordinate of y is N(0, I + 1 1^T) once mu is integrated out."""
    y = y.double().numpy()
    cov = np.eye(len(y)) + 1.0
    return sum(stats.multivariate_normal(np.zeros(len(y)), cov).logpdf(y[:, j]) for j in range(2))


def normal_guide_factory(scale_factor=1.0, shift=0.0):
    """Guide N(mean + shift * sd, (scale_factor * sd)^2): the exact posterior when (1, 0)."""

    def guide(y):
        mean, sd = normal_posterior(y)
        pyro.sample("mu", dist.Normal(mean + shift * sd, scale_factor * sd).to_event(1))

    return guide


# Gamma-Poisson: rate ~ Gamma(a, b), y_i ~ Poisson(rate): a constrained (positive) latent.
A, B = 2.0, 1.0


def poisson_data():
    y = np.random.default_rng(1).poisson(3.0, size=NUM_DATA)
    return torch.as_tensor(y, dtype=torch.get_default_dtype())


def poisson_model(y):
    rate = pyro.sample("rate", dist.Gamma(y.new_tensor(A), y.new_tensor(B)))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Poisson(rate), obs=y)


def poisson_exact_guide(y):
    pyro.sample("rate", dist.Gamma(A + y.sum(), B + y.shape[0]))


def poisson_evidence(y):
    y = y.double().numpy()
    a_post, b_post = A + y.sum(), B + len(y)
    return float(
        A * math.log(B)
        - math.lgamma(A)
        + math.lgamma(a_post)
        - a_post * math.log(b_post)
        - sum(math.lgamma(v + 1) for v in y)
    )


def tolerance(dtype):
    # Rounding of log-densities of size ~30 in the working precision.
    return 2e-3 if dtype == torch.float32 else 1e-8


def test_exact_posterior_gives_exact_evidence_with_zero_error(dtype):
    y = normal_data()
    result = log_evidence(normal_model, normal_guide_factory(), y, num_samples=500)
    assert abs(result.estimate - normal_evidence(y)) < tolerance(dtype)
    assert result.stderr < tolerance(dtype)


def test_exact_constrained_posterior_gives_exact_evidence(dtype):
    y = poisson_data()
    result = log_evidence(poisson_model, poisson_exact_guide, y, num_samples=300, chunk_size=128)
    assert abs(result.estimate - poisson_evidence(y)) < tolerance(dtype)
    assert result.stderr < tolerance(dtype)


def test_autoguide_log_q_includes_the_jacobian(dtype):
    """AutoDiagonalNormal works on log(rate); its trace carries the log-Jacobian."""
    y = poisson_data()
    guide = AutoDiagonalNormal(poisson_model)
    svi = SVI(poisson_model, guide, Adam({"lr": 0.05}), Trace_ELBO(num_particles=4))
    for _ in range(400):
        svi.step(y)
    result = log_evidence(poisson_model, guide, y, num_samples=4000)
    # A log-normal guide of a Gamma(>30) posterior: weights of finite variance, so the
    # estimate is within a few standard errors (plus the stderr^2/2 Jensen bias) of exact.
    assert result.stderr < 0.05
    assert abs(result.estimate - poisson_evidence(y)) < 5 * result.stderr + 1e-3
    assert psis_diagnostic(poisson_model, guide, y, num_samples=4000) < 0.7


def test_khat_flags_a_narrow_guide_and_passes_wide_ones(dtype):
    y = normal_data()
    narrow = psis_diagnostic(
        normal_model, normal_guide_factory(0.5, shift=1.0), y, num_samples=4000
    )
    wide = psis_diagnostic(normal_model, normal_guide_factory(1.5), y, num_samples=4000)
    slightly_wide = psis_diagnostic(normal_model, normal_guide_factory(1.1), y, num_samples=4000)
    # The exact guide's weights are constant up to rounding: no tail at all.
    exact = psis_diagnostic(normal_model, normal_guide_factory(1.0), y, num_samples=4000)
    # Guide sd s times the posterior's: P(w > t) ~ t^(-1 / (1 - s^2)), so k = 1 - s^2 = 0.75
    # for s = 0.5 (off-centre by 1 sd, which makes k-hat at S=4000 ~0.8-1.2 over seeds);
    # wider guides (s >= 1) have bounded weights (k <= 0).
    assert narrow > 0.7
    assert wide < 0.5
    assert slightly_wide < 0.5
    assert exact < 0.5


def test_khat_agrees_with_pyro(dtype):
    y = normal_data()
    guide = normal_guide_factory(0.7)  # true k = 1 - 0.7^2 = 0.51
    ours = psis_diagnostic(normal_model, guide, y, num_samples=4000)
    theirs = pyro_psis_diagnostic(normal_model, guide, y, num_particles=4000)
    # Both fit a GPD to the top 3 sqrt(S) weights of independent draws; their spread at
    # S=4000 is ~0.1 (ecosystem.md §5.3), so two estimates agree within 0.3.
    assert abs(ours - theirs) < 0.3


def test_stderr_is_honest_across_seeds(dtype):
    """Across independent batches, the spread of the estimates matches the reported stderr."""
    y = normal_data()
    guide = normal_guide_factory(1.4, shift=0.3)
    num_batches, batch = 40, 250
    log_w = log_importance_weights(normal_model, guide, y, num_samples=num_batches * batch)
    assert log_w.shape == (num_batches * batch,)
    results = [log_evidence_from_weights(w) for w in log_w.reshape(num_batches, batch)]
    estimates = np.array([r.estimate for r in results])
    stderrs = np.array([r.stderr for r in results])
    # The sample sd of 40 estimates has ~11% relative error; allow a factor of 1.5.
    ratio = estimates.std(ddof=1) / stderrs.mean()
    assert 1 / 1.5 < ratio < 1.5, ratio
    # And they centre on the exact evidence: the batch mean is within 4 of its standard
    # errors, after the stderr^2/2 Jensen bias of each log-mean.
    bias = (stderrs**2 / 2).mean()
    gap = abs(estimates.mean() + bias - normal_evidence(y))
    assert gap < 4 * estimates.std(ddof=1) / math.sqrt(num_batches)


def test_chunking_keeps_the_draw_count(dtype):
    y = normal_data()
    log_w = log_importance_weights(
        normal_model, normal_guide_factory(1.2), y, num_samples=250, chunk_size=100
    )
    assert log_w.shape == (250,) and np.isfinite(log_w).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_samples": 0}, "num_samples"), ({"num_samples": 10, "chunk_size": 0}, "chunk_size")],
)
def test_bad_sizes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        log_evidence(normal_model, normal_guide_factory(), normal_data(), **kwargs)
