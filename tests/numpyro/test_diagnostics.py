"""log_evidence and psis_diagnostic against conjugate models with known evidence (NumPyro)."""

import math

import numpy as np
import pytest
from scipy import stats

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402
from numpyro.infer import psis_diagnostic as numpyro_psis_diagnostic  # noqa: E402
from numpyro.infer.autoguide import AutoDiagonalNormal  # noqa: E402
from numpyro.optim import Adam  # noqa: E402

from mixvi.psis import log_evidence_from_weights  # noqa: E402
from numpyro_mixvi.diagnostics import (  # noqa: E402
    log_evidence,
    log_importance_weights,
    psis_diagnostic,
)

# Normal-normal: mu ~ N(0, 1) (2 coordinates), y_i | mu ~ N(mu, 1), i = 1..N.
NUM_DATA = 10


KEY = jax.random.PRNGKey(0)


def float_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def normal_data():
    rng = np.random.default_rng(0)
    y = np.array([0.5, -1.0]) + rng.normal(size=(NUM_DATA, 2))
    return jnp.asarray(y, dtype=float_dtype())


def normal_model(y):
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(2, y.dtype), 1.0).to_event(1))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("obs", dist.Normal(mu, 1.0).to_event(1), obs=y)


def normal_posterior(y):
    n = y.shape[0]
    return y.sum(0) / (n + 1), (n + 1.0) ** -0.5


def normal_evidence(y):
    """Each coordinate of y is N(0, I + 1 1^T) once mu is integrated out."""
    y = np.asarray(y, dtype=np.float64)
    cov = np.eye(len(y)) + 1.0
    return sum(stats.multivariate_normal(np.zeros(len(y)), cov).logpdf(y[:, j]) for j in range(2))


def normal_guide_factory(scale_factor=1.0, shift=0.0):
    """Guide N(mean + shift * sd, (scale_factor * sd)^2): the exact posterior when (1, 0)."""

    def guide(y):
        mean, sd = normal_posterior(y)
        numpyro.sample("mu", dist.Normal(mean + shift * sd, scale_factor * sd).to_event(1))

    return guide


# Gamma-Poisson: rate ~ Gamma(a, b), y_i ~ Poisson(rate): a constrained (positive) latent.
A, B = 2.0, 1.0


def poisson_data():
    y = np.random.default_rng(1).poisson(3.0, size=NUM_DATA)
    return jnp.asarray(y, dtype=float_dtype())


def poisson_model(y):
    rate = numpyro.sample("rate", dist.Gamma(jnp.asarray(A, y.dtype), jnp.asarray(B, y.dtype)))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("obs", dist.Poisson(rate), obs=y)


def poisson_exact_guide(y):
    numpyro.sample("rate", dist.Gamma(A + y.sum(), B + y.shape[0]))


def poisson_evidence(y):
    y = np.asarray(y, dtype=np.float64)
    a_post, b_post = A + y.sum(), B + len(y)
    return float(
        A * math.log(B)
        - math.lgamma(A)
        + math.lgamma(a_post)
        - a_post * math.log(b_post)
        - sum(math.lgamma(v + 1) for v in y)
    )


def tolerance(x64):
    # Rounding of log-densities of size ~30 in the working precision.
    return 1e-8 if x64 else 2e-3


def test_exact_posterior_gives_exact_evidence_with_zero_error(x64):
    y = normal_data()
    result = log_evidence(KEY, {}, normal_model, normal_guide_factory(), y, num_samples=500)
    assert abs(result.estimate - normal_evidence(y)) < tolerance(x64)
    assert result.stderr < tolerance(x64)


def test_exact_constrained_posterior_gives_exact_evidence(x64):
    y = poisson_data()
    result = log_evidence(
        KEY, {}, poisson_model, poisson_exact_guide, y, num_samples=300, chunk_size=128
    )
    assert abs(result.estimate - poisson_evidence(y)) < tolerance(x64)
    assert result.stderr < tolerance(x64)


def test_autoguide_log_q_includes_the_jacobian(x64):
    """AutoDiagonalNormal works on log(rate); its trace carries the log-Jacobian."""
    y = poisson_data()
    guide = AutoDiagonalNormal(poisson_model)
    svi = SVI(poisson_model, guide, Adam(0.05), Trace_ELBO(num_particles=4))
    params = svi.run(KEY, 400, y, progress_bar=False).params
    result = log_evidence(KEY, params, poisson_model, guide, y, num_samples=4000)
    # A log-normal guide of a Gamma(>30) posterior: weights of finite variance, so the
    # estimate is within a few standard errors (plus the stderr^2/2 Jensen bias) of exact.
    assert result.stderr < 0.05
    assert abs(result.estimate - poisson_evidence(y)) < 5 * result.stderr + 1e-3
    assert psis_diagnostic(KEY, params, poisson_model, guide, y, num_samples=4000) < 0.7


def test_khat_flags_a_narrow_guide_and_passes_wide_ones(x64):
    y = normal_data()
    narrow = psis_diagnostic(
        KEY, {}, normal_model, normal_guide_factory(0.5, shift=1.0), y, num_samples=4000
    )
    wide = psis_diagnostic(KEY, {}, normal_model, normal_guide_factory(1.5), y, num_samples=4000)
    slightly_wide = psis_diagnostic(
        KEY, {}, normal_model, normal_guide_factory(1.1), y, num_samples=4000
    )
    # The exact guide's weights are constant up to rounding: no tail at all.
    exact = psis_diagnostic(KEY, {}, normal_model, normal_guide_factory(1.0), y, num_samples=4000)
    # Guide sd s times the posterior's: P(w > t) ~ t^(-1 / (1 - s^2)), so k = 1 - s^2 = 0.75
    # for s = 0.5 (off-centre by 1 sd, which makes k-hat at S=4000 ~0.8-1.2 over seeds);
    # wider guides (s >= 1) have bounded weights (k <= 0).
    assert narrow > 0.7
    assert wide < 0.5
    assert slightly_wide < 0.5
    assert exact < 0.5


def test_khat_agrees_with_numpyro(x64):
    y = normal_data()
    guide = normal_guide_factory(0.7)  # true k = 1 - 0.7^2 = 0.51
    ours = psis_diagnostic(KEY, {}, normal_model, guide, y, num_samples=4000)
    theirs = numpyro_psis_diagnostic(KEY, {}, normal_model, guide, y, num_particles=4000)
    # Both fit a GPD to the top 3 sqrt(S) weights of independent draws; their spread at
    # S=4000 is ~0.1 (ecosystem.md §5.3), so two estimates agree within 0.3.
    assert abs(ours - theirs) < 0.3


def test_stderr_is_honest_across_seeds(x64):
    """Across independent batches, the spread of the estimates matches the reported stderr."""
    y = normal_data()
    guide = normal_guide_factory(1.4, shift=0.3)
    num_batches, batch = 40, 250
    log_w = log_importance_weights(KEY, {}, normal_model, guide, y, num_samples=num_batches * batch)
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


def test_chunking_keeps_the_draw_count(x64):
    y = normal_data()
    log_w = log_importance_weights(
        KEY, {}, normal_model, normal_guide_factory(1.2), y, num_samples=250, chunk_size=100
    )
    assert log_w.shape == (250,) and np.isfinite(log_w).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_samples": 0}, "num_samples"), ({"num_samples": 10, "chunk_size": 0}, "chunk_size")],
)
def test_bad_sizes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        log_evidence(KEY, {}, normal_model, normal_guide_factory(), normal_data(), **kwargs)
