"""to_arviz (Pyro, ArviZ 0.x in .venv): groups, shapes, constrained sites, plates, log p / log q."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
az = pytest.importorskip("arviz")

import pyro.distributions as dist  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal  # noqa: E402
from pyro.optim import Adam  # noqa: E402

from mixvi.arviz_bridge import arviz_major  # noqa: E402
from pyro_mixvi import to_arviz  # noqa: E402

NUM_DATA, NUM_GROUPS = 30, 3


def make_data():
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(NUM_DATA, 2)), dtype=torch.get_default_dtype())
    y = x @ torch.tensor([1.0, -0.5], dtype=x.dtype) + 0.3 * torch.randn(NUM_DATA, dtype=x.dtype)
    return x, y


def model(x, y):
    """Regression with one latent of each common support, a nested plate and a deterministic."""
    zero = x.new_zeros(())
    sigma = pyro.sample("sigma", dist.HalfNormal(zero + 1.0))  # positive
    pyro.sample("w", dist.Dirichlet(x.new_ones(3)))  # simplex
    pyro.sample("p", dist.Beta(zero + 2.0, zero + 2.0))  # unit interval
    pyro.sample("L", dist.LKJCholesky(3, zero + 1.0))  # correlation Cholesky
    base = dist.Normal(x.new_zeros(3), 1.0).to_event(1)
    pyro.sample("c", dist.TransformedDistribution(base, [dist.transforms.OrderedTransform()]))
    beta = pyro.sample("beta", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
    pyro.deterministic("beta_scaled", beta * sigma[..., None], event_dim=1)
    with pyro.plate("groups", NUM_GROUPS, dim=-2):
        offset = pyro.sample("offset", dist.Normal(zero, 0.1))  # local, shape (3, 1)
    with pyro.plate("data", x.shape[0], dim=-1):
        # Broadcast-safe under a particle plate: (x * beta) keeps beta's batch dims.
        mean = (x * beta).sum(-1) + offset.mean(-2, keepdim=True)
        pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


SHAPES = {
    "sigma": (),
    "w": (3,),
    "p": (),
    "L": (3, 3),
    "c": (3,),
    "beta": (2,),
    "beta_scaled": (2,),
    "offset": (NUM_GROUPS, 1),
}


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoDiagonalNormal])
def test_groups_shapes_and_log_densities(guide_class, dtype):
    x, y = make_data()
    guide = guide_class(model)
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(30):
        svi.step(x, y)
    num_samples = 40
    data = to_arviz(model, guide, x, y, num_samples=num_samples, chunk_size=16)
    assert type(data).__name__ == ("InferenceData" if arviz_major() == 0 else "DataTree")
    for name, shape in SHAPES.items():
        assert data.posterior[name].shape == (1, num_samples, *shape), name
    draws = {name: torch.as_tensor(data.posterior[name].values[0]) for name in SHAPES}
    assert bool((draws["sigma"] > 0).all()) and bool((draws["p"] < 1).all())
    torch.testing.assert_close(draws["w"].sum(-1), torch.ones(num_samples, dtype=dtype))
    assert bool((draws["c"].diff(dim=-1) > 0).all())
    torch.testing.assert_close(draws["beta_scaled"], draws["beta"] * draws["sigma"][:, None])
    np.testing.assert_array_equal(data.observed_data["obs"].values, y.numpy())
    log_lik = data.log_likelihood["obs"].values[0]
    assert log_lik.shape == (num_samples, NUM_DATA)
    log_p = data.sample_stats["log_p"].values[0]
    log_q = data.sample_stats["log_q"].values[0]
    assert log_p.shape == log_q.shape == (num_samples,)
    # Recompute log p(y, θ) and the pointwise log-likelihood at a few draws, one at a time.
    latent = [n for n in SHAPES if n != "beta_scaled"]
    for s in (0, 17, num_samples - 1):
        values = {n: draws[n][s] for n in latent}
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x, y)
        expected = trace.log_prob_sum()
        tol = 1e-3 if dtype == torch.float32 else 1e-9
        assert abs(float(expected) - float(log_p[s])) < tol * max(1.0, abs(float(expected)))
        pointwise = trace.nodes["obs"]["fn"].log_prob(y)
        np.testing.assert_allclose(log_lik[s], pointwise.reshape(-1).numpy(), rtol=tol, atol=tol)
    assert np.isfinite(log_q).all()


def test_summary_and_loo_run(dtype):
    x, y = make_data()
    guide = AutoDiagonalNormal(model)
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(200):
        svi.step(x, y)
    data = to_arviz(model, guide, x, y, num_samples=500, dims={"obs": ["N"]})
    summary = az.summary(data, var_names=["sigma", "beta"], kind="stats")
    assert {"mean", "sd"} <= set(summary.columns) and len(summary) == 3
    loo = az.loo(data)
    # elpd is a sum over the 30 points of log-predictive densities, each finite and < 0 here.
    assert np.isfinite(loo["elpd_loo"]) and loo["elpd_loo"] < 0
    assert data.log_likelihood["obs"].dims[-1] == "N"
