"""ClassifierWeightedMixture (density, sampling, EM, fit) and the AutoCWM guide (Pyro)."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceGraph_ELBO
from pyro.optim import Adam

from pyro_mixvi.distributions.cwm import (
    ClassifierWeightedMixture,
    init_classifier_params,
    init_component_flows,
)
from pyro_mixvi.elbos.rb_mixture import RBMixture_ELBO
from pyro_mixvi.guides.cwm import AutoCWM
from tests.properties import (
    assert_close_in_mc_error,
    assert_normalized_2d,
    assert_samples_match_density_2d,
    grid_2d,
)

BOUNDS = (-7.0, 7.0, -7.0, 7.0)


def random_cwm(covariance="diag", hidden_dims=(8, 8), num_components=4, dim=2, seed=0, *,
               max_scale=0.8, flow_layers=0, perturb=0.3):
    """A CWM with random parameters whose mass lies well inside ``BOUNDS`` in 2-D.

    Locations in [-2, 2], scales in [0.3, ``max_scale``] (|off-diagonal| <= 0.3): 7 is > 6 sd
    away. With ``flow_layers > 0`` each component gets a flow whose zeroed output layers are
    N(0, perturb^2), so every coupling's log-scale is O(perturb) (a non-identity map).
    """
    g = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()

    def u(*shape, lo, hi):
        return (lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)).to(dtype)

    k, d = num_components, dim
    locs = u(k, d, lo=-2, hi=2)
    if covariance == "diag":
        scales = {"scale": u(k, d, lo=0.3, hi=max_scale)}
    else:
        tril = (u(k, d, d, lo=-0.3, hi=0.3).tril(-1)
                + torch.diag_embed(u(k, d, lo=0.3, hi=max_scale)))
        scales = {"scale_tril": tril}
    torch.manual_seed(seed)
    layers = init_classifier_params(d, k, hidden_dims, locs)
    if layers:  # a non-trivial last layer, so the weights really depend on z
        layers[-1] = (u(*layers[-1][0].shape, lo=-2, hi=2), u(k, lo=-1, hi=1))
    flows = init_component_flows(d, k, flow_layers, locs) if flow_layers else None
    if flows is not None:
        with torch.no_grad():
            for p in flows.parameters():
                if (p == 0).all():  # the zeroed output layers
                    p.copy_(perturb * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return ClassifierWeightedMixture(locs, logits=u(k, lo=-1, hi=1), classifier_params=layers,
                                     flows=flows, **scales)


def numpy_log_prob(cwm):
    def log_prob(points):
        x = torch.as_tensor(points, dtype=cwm.locs.dtype)
        return cwm.log_prob(x).detach().double().numpy()

    return log_prob


@pytest.mark.parametrize("covariance", ["diag", "full"])
@pytest.mark.parametrize("hidden_dims", [None, (), (8, 8)], ids=["constant", "linear", "mlp"])
def test_log_prob_integrates_to_one(dtype, covariance, hidden_dims):
    cwm = random_cwm(covariance, hidden_dims)
    assert cwm.log_prob(torch.zeros(2)).dtype == dtype
    # midpoint rule, 300 cells a side: O(h^2) error ~ 1e-4 for scales >= 0.3; tails < 1e-8.
    assert_normalized_2d(numpy_log_prob(cwm), BOUNDS, num=300, atol=5e-3)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_samples_match_log_prob(dtype, covariance):
    cwm = random_cwm(covariance)
    samples = cwm.sample((20000,)).double().numpy()
    # chi-square two-sample test against grid probabilities, alpha = 1e-3.
    assert_samples_match_density_2d(samples, numpy_log_prob(cwm), BOUNDS, bins=12)


def test_rao_blackwellized_expectation_matches_quadrature(dtype):
    cwm = random_cwm("full")
    points, area = grid_2d(BOUNDS, 300)
    density = np.exp(numpy_log_prob(cwm)(points)) * area
    h = lambda x: x[..., 0] ** 2 + np.sin(3 * x[..., 1])  # noqa: E731
    exact = float((density * h(points)).sum())
    x, log_weights = cwm.rsample_components((20000,))
    assert x.shape == (20000, 4, 2) and log_weights.shape == (20000, 4)
    terms = (log_weights.exp() * torch.as_tensor(h(x.detach().double().numpy()))).sum(-1)
    # each RB term is an i.i.d. unbiased estimate of E_q[h]: mean within 4 standard errors.
    assert_close_in_mc_error(terms.detach().double().numpy(), exact)


def test_constant_classifier_is_a_gaussian_mixture(dtype):
    cwm = random_cwm("full", hidden_dims=None)
    gmm = dist.MixtureSameFamily(
        dist.Categorical(logits=cwm.logits),
        dist.MultivariateNormal(cwm.locs, scale_tril=cwm.scale_tril),
    )
    x = torch.randn(50, 2) * 2
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(cwm.log_prob(x), gmm.log_prob(x), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(), (13,), (2, 3)])
def test_shapes(shape):
    cwm = random_cwm("full", num_components=3, dim=3)
    assert cwm.sample(shape).shape == shape + (3,)
    assert cwm.log_prob(torch.zeros(shape + (3,))).shape == shape
    x, log_w = cwm.rsample_components(shape)
    assert x.shape == shape + (3, 3) and log_w.shape == shape + (3,)
    torch.testing.assert_close(log_w.logsumexp(-1), torch.zeros(shape))


def test_component_maps_are_inverse(dtype):
    cwm = random_cwm("full")
    z = torch.randn(7, 2)
    x = cwm.component_forward(z)  # (7, K, D)
    z_back = cwm.component_inverse(x.reshape(-1, 2)).reshape(7, 4, 4, 2)
    torch.testing.assert_close(z_back.diagonal(dim1=1, dim2=2).permute(0, 2, 1),
                               z[:, None].expand(7, 4, 2), atol=1e-4, rtol=1e-4)


def test_every_parameter_gets_a_gradient():
    base = random_cwm("full")
    leaves = [base.locs, base.scale_tril, base.logits]
    leaves += [t for layer in base.classifier_params for t in layer]
    for t in leaves:
        t.requires_grad_()
    x, log_w = base.rsample_components((16,))
    (base.log_prob(x) * log_w.exp()).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


BAD_ARGS = {
    "K < 1": (lambda: ClassifierWeightedMixture(torch.zeros(0, 2), scale=torch.ones(0, 2)),
              "K >= 1"),
    "scale shape": (lambda: ClassifierWeightedMixture(torch.zeros(3, 2), scale=torch.ones(3, 3)),
                    "scale must have shape"),
    "both scales": (lambda: ClassifierWeightedMixture(torch.zeros(3, 2), scale=torch.ones(3, 2),
                                                      scale_tril=torch.eye(2).expand(3, 2, 2)),
                    "exactly one"),
    "scale_tril shape": (lambda: ClassifierWeightedMixture(torch.zeros(3, 2),
                                                           scale_tril=torch.eye(2)),
                         "scale_tril must have shape"),
    "logits shape": (lambda: ClassifierWeightedMixture(torch.zeros(3, 2), scale=torch.ones(3, 2),
                                                       logits=torch.zeros(4)), "logits"),
    "classifier input": (lambda: ClassifierWeightedMixture(
        torch.zeros(3, 2), scale=torch.ones(3, 2),
        classifier_params=[(torch.zeros(5, 3), torch.zeros(3))]), "classifier_params\\[0\\]"),
    "classifier output": (lambda: ClassifierWeightedMixture(
        torch.zeros(3, 2), scale=torch.ones(3, 2),
        classifier_params=[(torch.zeros(2, 4), torch.zeros(4))]), "K=3"),
    "from_samples K": (lambda: ClassifierWeightedMixture.from_samples(torch.randn(10, 2), 0),
                       "num_components"),
    "from_samples nan": (lambda: ClassifierWeightedMixture.from_samples(
        torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 2.0]]), 2), "non-finite"),
    "from_samples ndim": (lambda: ClassifierWeightedMixture.from_samples(torch.randn(10), 2),
                          "shape"),
    "covariance": (lambda: ClassifierWeightedMixture.from_samples(torch.randn(10, 2), 2,
                                                                 covariance="dense"),
                   "covariance"),
    "fit dim": (lambda: random_cwm().fit(torch.randn(10, 3), num_steps=1), "\\(N, 2\\)"),
    "fit inf": (lambda: random_cwm().fit(torch.tensor([[0.0, float("inf")]]), num_steps=1),
                "non-finite"),
    "AutoCWM K": (lambda: AutoCWM(lambda: None, num_components=0), "num_components"),
    "AutoCWM scale": (lambda: AutoCWM(lambda: None, init_scale=0.0), "init_scale"),
    "AutoCWM covariance": (lambda: AutoCWM(lambda: None, covariance="dense"), "covariance"),
    "AutoCWM hidden": (lambda: AutoCWM(lambda: None, hidden_dims=(0,)), "hidden_dims"),
}


@pytest.mark.parametrize("make,match", BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_bad_input_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_fit_raises_on_divergence():
    cwm = ClassifierWeightedMixture.from_samples(torch.randn(100, 2), 2)
    with pytest.raises(FloatingPointError, match="step"):
        cwm.fit(torch.randn(100, 2) * 1e30, num_steps=5, progress_bar=False)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_em_recovers_a_gaussian_mixture(dtype, covariance):
    g = torch.Generator().manual_seed(1)
    n = 4000
    labels = torch.rand(n, generator=g) < 0.3
    x = torch.randn(n, 2, generator=g) * 0.5 + torch.where(labels[:, None], 3.0, -1.0)
    cwm = ClassifierWeightedMixture.from_samples(x, 2, covariance=covariance, em_steps=50,
                                                 generator=g)
    order = cwm.locs[:, 0].argsort()
    # mean of ~1200 points with sd 0.5: standard error 0.015; 0.1 is > 6 se.
    torch.testing.assert_close(cwm.locs[order], torch.tensor([[-1.0, -1.0], [3.0, 3.0]]),
                               atol=0.1, rtol=0)
    # weight 0.3 from 4000 Bernoulli draws: sd 0.007.
    assert abs(cwm.logits.exp()[order][1].item() - 0.3) < 0.04


def test_fit_beats_the_em_gaussian_mixture(dtype):
    """On a ring, ML fitting of the classifier beats the EM mixture with the same K (held out)."""
    g = torch.Generator().manual_seed(2)
    angle = torch.rand(6000, generator=g) * 2 * math.pi
    radius = 2.0 + 0.15 * torch.randn(6000, generator=g)
    x = torch.stack([radius * angle.cos(), radius * angle.sin()], -1)
    train, test = x[:4000], x[4000:]
    em = ClassifierWeightedMixture.from_samples(train, 4, hidden_dims=None, em_steps=100,
                                                generator=g)
    torch.manual_seed(0)
    cwm = ClassifierWeightedMixture.from_samples(train, 4, hidden_dims=(16, 16), em_steps=100,
                                                 generator=torch.Generator().manual_seed(2))
    gmm_fit, _ = em.fit(train, num_steps=300, batch_size=512, lr=1e-2, progress_bar=False,
                        generator=g)
    cwm_fit, losses = cwm.fit(train, num_steps=300, batch_size=512, lr=1e-2, progress_bar=False,
                              generator=g)
    assert losses.shape == (300,) and torch.isfinite(losses).all()
    nll = {name: -d.log_prob(test).detach() for name, d in
           [("em", em), ("gmm", gmm_fit), ("cwm", cwm_fit)]}
    # paired held-out NLL differences: mean gap must exceed 4 standard errors.
    for baseline in ("em", "gmm"):
        diff = (nll[baseline] - nll["cwm"]).double().numpy()
        assert diff.mean() > 4 * diff.std(ddof=1) / math.sqrt(len(diff)), baseline


def constrained_model(data):
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("groups", 3):
        loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(loc.sum(), scale), obs=data)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_autocwm_svi_predictive_and_particles(dtype, covariance):
    data = torch.randn(20) + 1.0
    guide = AutoCWM(constrained_model, num_components=3, covariance=covariance, hidden_dims=(8,))
    svi = SVI(constrained_model, guide, Adam({"lr": 1e-2}), RBMixture_ELBO(num_particles=4))
    losses = [svi.step(data) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)
    posterior = guide.get_posterior()
    assert isinstance(posterior, ClassifierWeightedMixture) and posterior.locs.dtype == dtype
    samples = Predictive(constrained_model, guide=guide, num_samples=30)(data)
    assert samples["scale"].shape == (30, 1) and (samples["scale"] > 0).all()
    assert samples["loc"].shape == (30, 3) and samples["obs"].shape == (30, 20)
    with pyro.plate_stack("particles", (5, 2), rightmost_dim=-2):
        draws = guide(data)
    assert draws["scale"].shape == (5, 2, 1) and draws["loc"].shape == (5, 2, 3)
    with pytest.raises(NotImplementedError, match="Predictive"):
        guide.median()
    with pytest.raises(NotImplementedError, match="Predictive"):
        guide.quantiles([0.5])


def test_autocwm_initialization():
    guide = AutoCWM(constrained_model, num_components=5, init_scale=0.2)
    data = torch.randn(4)
    guide(data)
    loc = guide._init_loc()
    posterior = guide.get_posterior()
    torch.testing.assert_close(posterior.locs.mean(0), loc)
    assert (posterior.locs[None] - posterior.locs[:, None]).abs().sum(-1).add(
        torch.eye(5)).min() > 0  # components do not coincide
    torch.testing.assert_close(posterior.scale, torch.full((5, 4), 0.2))
    weights = posterior.log_weights(torch.randn(10, 4)).exp()
    torch.testing.assert_close(weights, torch.full((10, 5), 0.2))


def test_autocwm_save_load(tmp_path):
    data = torch.randn(10)
    guide = AutoCWM(constrained_model, num_components=3, covariance="full")
    svi = SVI(constrained_model, guide, Adam({"lr": 1e-2}), RBMixture_ELBO(num_particles=2))
    svi.step(data)
    torch.save(guide, tmp_path / "guide.pt")
    loaded = torch.load(tmp_path / "guide.pt", weights_only=False)
    x = torch.randn(6, guide.latent_dim)
    expected = guide.get_posterior().log_prob(x)
    torch.testing.assert_close(loaded.get_posterior().log_prob(x), expected)
    pyro.get_param_store().save(tmp_path / "params.pt")


def test_discrete_latent_gets_the_helpful_error():
    def model():
        pyro.sample("k", dist.Categorical(torch.ones(3)))

    with pytest.raises(ValueError, match="enumeration"):
        AutoCWM(model)()


def test_no_latent_sites_raises():
    def model():
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(RuntimeError, match="no latent"):
        AutoCWM(model)()


@pytest.mark.parametrize(
    "elbo",
    [Trace_ELBO(), Trace_ELBO(num_particles=3, vectorize_particles=True), TraceGraph_ELBO()],
    ids=["Trace_ELBO", "Trace_ELBO-vectorized", "TraceGraph_ELBO"],
)
def test_stock_elbos_raise_and_point_to_rb_mixture_elbo(elbo):
    """Trace_ELBO would be biased (it leaves the auxiliary latent out of log r): refuse."""
    data = torch.randn(5)
    guide = AutoCWM(constrained_model, num_components=2)
    with pytest.raises(NotImplementedError, match="RBMixture_ELBO"):
        SVI(constrained_model, guide, Adam({"lr": 1e-2}), elbo).step(data)
