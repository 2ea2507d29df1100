"""MAF and RealNVP factories (zuko): exact densities in any dimension, with and without context."""

import math

import pytest
import torch

from pyro_mixvi.flows import MAF, RealNVP
from tests.properties import assert_normalized_2d

# name -> (factory, input_dim, context_dim); D > 2 is where the reference MAF goes wrong.
FLOWS = {
    "MAF (D=5)": (MAF, 5, 0),
    "MAF (D=4, context)": (MAF, 4, 3),
    "RealNVP (D=5)": (RealNVP, 5, 0),
    "RealNVP (D=3, context)": (RealNVP, 3, 2),
    "MAF (D=3, max_log_scale=1)": (lambda *a, **k: MAF(*a, max_log_scale=1.0, **k), 3, 0),
    "RealNVP (D=4, max_log_scale=1)": (lambda *a, **k: RealNVP(*a, max_log_scale=1.0, **k), 4, 0),
}


def _build(name):
    factory, dim, ctx = FLOWS[name]
    flow = factory(dim, context_dim=ctx, num_transforms=3, hidden_dims=(16, 16))
    # Random (non-identity) weights so the check exercises real couplings and context paths.
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    context = torch.randn(ctx) if ctx else None
    return flow, dim, context


def _dist(flow, context):
    return flow(context) if context is not None else flow()


def _tol(dtype):
    return 1e-4 if dtype == torch.float64 else 2e-3


@pytest.mark.parametrize("name", list(FLOWS))
def test_log_prob_equals_base_plus_autodiff_logdet(name, dtype):
    flow, dim, context = _build(name)
    dist = _dist(flow, context)
    x = torch.randn(dim, dtype=dtype)
    jac = torch.autograd.functional.jacobian(dist.transform, x)
    z = dist.transform(x)
    expected = dist.base.log_prob(z) + torch.linalg.slogdet(jac)[1]
    assert torch.allclose(dist.log_prob(x), expected, atol=_tol(dtype), rtol=_tol(dtype))


@pytest.mark.parametrize("name", list(FLOWS))
def test_round_trip_and_fused(name, dtype):
    flow, dim, context = _build(name)
    dist = _dist(flow, context)
    x, log_q = dist.rsample_and_log_prob((7,))
    assert x.shape == (7, dim) and log_q.shape == (7,) and x.dtype == dtype
    # clone() defeats torch's transform cache, so the inverse is really computed.
    back = dist.transform.inv(dist.transform(x.clone()).clone())
    assert torch.allclose(back, x, atol=10 * _tol(dtype))
    assert torch.allclose(dist.log_prob(x.clone()), log_q, atol=_tol(dtype), rtol=_tol(dtype))


@pytest.mark.parametrize("name", [n for n in FLOWS if FLOWS[n][2]])
def test_context_batches_and_matters(name, dtype):
    flow, dim, _ = _build(name)
    ctx = FLOWS[name][2]
    context = torch.randn(2, 3, ctx)
    dist = flow(context)
    x = dist.sample((4,))
    assert x.shape == (4, 2, 3, dim)
    assert dist.log_prob(x).shape == (4, 2, 3)
    point = torch.zeros(dim)
    first, last = flow(context[0, 0]).log_prob(point), flow(context[1, 2]).log_prob(point)
    assert not torch.allclose(first, last)


@pytest.mark.parametrize("factory", [MAF, RealNVP], ids=["MAF", "RealNVP"])
def test_normalized_in_2d(factory, dtype):
    flow = factory(2, num_transforms=2, hidden_dims=(8,))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
        log_prob = lambda pts: flow().log_prob(torch.as_tensor(pts, dtype=dtype)).numpy()
        # 300x300 midpoint rule on [-10, 10]^2: O(h^2) error far below atol for an O(1) density.
        assert_normalized_2d(log_prob, (-10, 10, -10, 10), atol=0.02)


@pytest.mark.parametrize("factory", [MAF, RealNVP], ids=["MAF", "RealNVP"])
def test_fit_beats_gaussian_in_4d(factory, dtype):
    """A dependence a Gaussian cannot express (x2 = x0 * x1 + noise) in D=4, fit by ML."""
    gen = torch.Generator().manual_seed(0)

    def draw(n):
        base = torch.randn(n, 4, generator=gen, dtype=dtype)
        base[:, 2] = base[:, 0] * base[:, 1] + 0.3 * base[:, 2]
        return base

    train, test = draw(2000), draw(2000)
    flow = factory(4, num_transforms=4, hidden_dims=(32, 32))
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
    for _ in range(120):  # early-stopped: longer runs overfit 2000 points
        opt.zero_grad()
        loss = -flow().log_prob(train).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        nll_flow = -flow().log_prob(test).mean().item()
    cov = torch.cov(train.T)
    gauss = torch.distributions.MultivariateNormal(train.mean(0), cov)
    nll_gauss = -gauss.log_prob(test).mean().item()
    # Gaussian NLL here is ~5.6 nats vs the true entropy ~4.9; the MC sd of a 2000-point mean NLL
    # is ~0.02, so a 0.2-nat margin is ~10 standard errors.
    assert math.isfinite(nll_flow) and nll_flow < nll_gauss - 0.2, (nll_flow, nll_gauss)


@pytest.mark.parametrize("factory", [MAF, RealNVP], ids=["MAF", "RealNVP"])
def test_max_log_scale_bounds_every_layer(factory):
    """Huge conditioner outputs: each of the 3 layers scales each of the 4 coordinates by at
    most e^0.5, so |log det| < 3 * 4 * 0.5 = 6 everywhere; the unbounded flow exceeds it."""
    torch.manual_seed(0)
    x = 3 * torch.randn(500, 4)
    log_dets = []
    for bound in (0.5, None):
        torch.manual_seed(1)
        flow = factory(4, num_transforms=3, hidden_dims=(16,), max_log_scale=bound)
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(30 * torch.randn_like(p))
            log_dets.append(flow().transform.call_and_ladj(x)[1].abs().max())
    assert log_dets[0] < 6 < log_dets[1], log_dets


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_dim": 0}, "input_dim"),
        ({"input_dim": 3, "context_dim": -1}, "context_dim"),
        ({"input_dim": 3, "num_transforms": 0}, "num_transforms"),
        ({"input_dim": 3, "hidden_dims": ()}, "hidden_dims"),
    ],
)
def test_bad_arguments(kwargs, match):
    for factory in (MAF, RealNVP):
        with pytest.raises(ValueError, match=match):
            factory(**kwargs)
    with pytest.raises(ValueError, match="input_dim"):
        RealNVP(1)


