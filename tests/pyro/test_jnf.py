"""JNF, JNFShared and the aggregation baselines (pyro_mixvi.multimodal)."""

import numpy as np
import pyro
import pytest
import torch

from pyro_mixvi.multimodal import JNF, JNFShared, MoEVAE, PoEVAE, make_paired_digits
from tests.jnf_oracles import LinearGaussian, gaussian_log_prob
from tests.properties import grid_2d

CLASSES = {"JNF": JNF, "JNFShared": JNFShared, "PoEVAE": PoEVAE, "MoEVAE": MoEVAE}


class ExactJointEncoder(torch.nn.Module):
    """q(z|X) = p(z|X) of a diagonal linear-Gaussian oracle: loc linear in X, constant scale."""

    def __init__(self, oracle, dtype):
        super().__init__()
        subset = range(len(oracle.loadings))
        _, cov = oracle.posterior(subset, [np.zeros((1, a.shape[0])) for a in oracle.loadings])
        weight = (
            np.concatenate([a / s**2 for a, s in zip(oracle.loadings, oracle.noise, strict=True)])
            @ cov
        )
        self.register_buffer("weight", torch.as_tensor(weight, dtype=dtype))
        self.register_buffer("scale", torch.as_tensor(np.sqrt(np.diag(cov)), dtype=dtype))

    def forward(self, x):
        loc = x @ self.weight
        return loc, self.scale.expand(loc.shape)


def _kl_exact_to_model(jnf, oracle, x_test, subset, rng):
    """Monte Carlo KL(p(z|x_S) || model) with its standard error, for one test row."""
    mean, cov = oracle.posterior(subset, x_test)
    z = rng.multivariate_normal(mean[0], cov, size=4000)
    observed = {j: torch.as_tensor(x_test[j], dtype=torch.get_default_dtype()) for j in subset}
    with torch.no_grad():
        if len(subset) == 1:
            (j,) = subset
            log_q = jnf.unimodal_posterior(j, observed[j]).log_prob(
                torch.as_tensor(z, dtype=torch.get_default_dtype())[:, None]
            )
            log_q = log_q[:, 0].double().numpy()
        else:
            raise AssertionError("use the quadrature check for subsets")
    diff = gaussian_log_prob(z, mean[0], cov) - log_q
    return diff.mean(), diff.std() / np.sqrt(len(diff))


def test_stage2_recovers_the_exact_conditionals_and_joint(dtype):
    # Linear-Gaussian model with an exact (diagonal) joint encoder: the forward-KL optimum of
    # stage 2 is q_j(z|x_j) = p(z|x_j) exactly, and the PoE over all modalities is p(z|X).
    rng = np.random.default_rng(0)
    oracle = LinearGaussian.make(rng, 2, [3, 4], diagonal=True)
    _, xs = oracle.sample(rng, 4000)
    jnf = JNF([3, 4], latent_dim=2, hidden_dims=(32,), flow_hidden_dims=(32, 32), context_dim=8)
    jnf.joint_encoder = ExactJointEncoder(oracle, dtype)
    data = [torch.as_tensor(x, dtype=dtype) for x in xs]
    generator = torch.Generator().manual_seed(0)
    # A short run, then a lower learning rate to settle the stochastic optimization noise.
    for steps, learning_rate in ((600, 3e-3), (300, 5e-4)):
        jnf.fit_unimodal(
            data, num_steps=steps, batch_size=256, learning_rate=learning_rate, generator=generator
        )
    _, x_test = oracle.sample(rng, 3)
    for row in range(3):
        x_row = [x[row : row + 1] for x in x_test]
        for j in range(2):
            kl, stderr = _kl_exact_to_model(jnf, oracle, x_row, [j], rng)
            # 0.03 nats is the approximation budget of a small flow fitted from 800 noisy steps;
            # 3 standard errors cover the Monte Carlo error of the 4000-draw estimate.
            assert kl < 0.03 + 3 * stderr, (row, j, kl)
        # The PoE of the fitted flows over both modalities against the exact joint, by 2-D
        # quadrature (midpoint rule, 200^2 cells: error far below the tolerance). Errors of the two
        # experts compound in the product (precisions add), so the budget is about three times
        # the unimodal one.
        points, area = grid_2d((-4, 4, -4, 4), 200)
        observed = [torch.as_tensor(x, dtype=dtype) for x in x_row]
        with torch.no_grad():
            log_poe = jnf.log_prob(torch.as_tensor(points, dtype=dtype)[:, None], observed)
        log_poe = log_poe[:, 0].double().numpy()
        log_poe -= np.log(np.exp(log_poe).sum() * area)
        mean, cov = oracle.posterior([0, 1], x_row)
        log_p = gaussian_log_prob(points, mean[0], cov)
        kl = float((np.exp(log_p) * (log_p - log_poe)).sum() * area)
        assert kl < 0.1, (row, kl)


@pytest.mark.parametrize("name", CLASSES)
def test_stage1_svi_lowers_the_loss_and_leaves_the_param_store_alone(dtype, name):
    data = make_paired_digits(num_modalities=2, num_pairs=200, seed=1)
    xs = [torch.as_tensor(x, dtype=dtype) for x in data.modalities]
    model = CLASSES[name]([64, 64], latent_dim=3, hidden_dims=(32,))
    generator = torch.Generator().manual_seed(0)
    losses = model.fit_joint(
        xs, num_steps=150, batch_size=64, learning_rate=3e-3, generator=generator
    )
    assert losses.shape == (150,)
    # Minibatch losses are noisy; compare means of the first and last 20 steps.
    assert losses[-20:].mean() < 0.8 * losses[:20].mean()
    assert len(pyro.get_param_store()) == 0
    assert next(model.decoders.parameters()).dtype == dtype


@pytest.mark.parametrize("name", CLASSES)
def test_fit_and_generate_shapes(name):
    data = make_paired_digits(num_modalities=3, num_pairs=60, seed=2)
    xs = [torch.as_tensor(x, dtype=torch.get_default_dtype()) for x in data.modalities]
    model = CLASSES[name]([64, 64, 64], latent_dim=2, hidden_dims=(16,))
    stages = model.fit(xs, num_steps=3, batch_size=16)
    expected = {"JNF": {"joint", "unimodal"}, "JNFShared": {"projections", "joint", "unimodal"}}
    assert set(stages) == expected.get(name, {"joint"})
    generator = torch.Generator().manual_seed(0)
    nuts = {"num_warmup": 5} if name.startswith("JNF") else {}
    for observed in (
        {0: xs[0][:4]},
        [xs[0][:4], None, xs[2][:4]],
        xs[:1] * 0 + [x[:4] for x in xs],
    ):
        z = model.sample_posterior(observed, num_samples=3, generator=generator, **nuts)
        assert z.shape == (3, 4, 2)
        outputs = model.generate(observed, num_samples=3, generator=generator, **nuts)
        assert [tuple(x.shape) for x in outputs] == [(3, 4, 64)] * 3
    assert [tuple(x.shape) for x in model.generate(None, num_samples=5)] == [(5, 64)] * 3


@pytest.mark.parametrize("name", CLASSES)
def test_wrong_modality_counts_and_shapes_are_rejected(name):
    model = CLASSES[name]([5, 3], latent_dim=2, hidden_dims=(8,))
    good = [torch.zeros(4, 5), torch.zeros(4, 3)]
    with pytest.raises(ValueError, match="expected 2 modalities"):
        model.fit([good[0]], num_steps=1)
    with pytest.raises(
        ValueError, match=r"modality 1 must be a tensor of shape \(N, 3\); got \(4, 4\)"
    ):
        model.fit([good[0], torch.zeros(4, 4)], num_steps=1)
    with pytest.raises(ValueError, match=r"training needs all 2 modalities; \[1\] missing"):
        model.fit_joint([good[0], None], num_steps=1)
    with pytest.raises(ValueError, match="modality 0 must be a tensor of shape"):
        model.sample_posterior({0: torch.zeros(5)})
    with pytest.raises(ValueError, match="modality index must be in 0..1"):
        model.generate({2: torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="paired row by row"):
        model.sample_posterior([torch.zeros(4, 5), torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="at least one observed"):
        model.sample_posterior([None, None])
    with pytest.raises(TypeError, match="mapping"):
        model.sample_posterior(torch.zeros(4, 5))


def test_constructor_errors():
    with pytest.raises(ValueError, match="input_dims"):
        JNF([], latent_dim=2)
    with pytest.raises(ValueError, match="latent_dim"):
        JNF([3], latent_dim=0)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        PoEVAE([3, 3], likelihood="poisson")
    with pytest.raises(ValueError, match="likelihood_scale must be one value or 2 values"):
        MoEVAE([3, 3], likelihood_scale=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="num_transforms"):
        JNF([3, 3], num_transforms=0)
    with pytest.raises(ValueError, match="at least two modalities"):
        JNFShared([3])
    with pytest.raises(ValueError, match="temperature"):
        JNFShared([3, 3], temperature=0.0)


def test_poe_baseline_is_the_closed_form_product_with_the_prior():
    model = PoEVAE([4, 4, 4], latent_dim=3, hidden_dims=(8,))
    xs = [torch.randn(5, 4) for _ in range(3)]
    posterior = model.subset_posterior([xs[0], None, xs[2]])
    z = torch.randn(7, 5, 3)
    # Unnormalized check: log q(z|X_S) - [log p(z) + sum_j log q_j(z|x_j)] is constant in z.
    experts = [torch.distributions.Normal(*model.encoders[j](xs[j])) for j in (0, 2)]
    unnormalized = sum(e.log_prob(z).sum(-1) for e in experts) + torch.distributions.Normal(
        0.0, 1.0
    ).log_prob(z).sum(-1)
    ratio = posterior.log_prob(z) - unnormalized
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), atol=1e-4)


def test_moe_guide_scores_with_the_mixture_and_draws_from_its_expert():
    model = MoEVAE([4, 4], latent_dim=2, hidden_dims=(8,))
    xs = [torch.randn(6, 4) for _ in range(2)]
    site = model.guide_distribution("z_1", xs)
    mixture = model.subset_posterior(xs)
    z = torch.randn(9, 6, 2)
    assert torch.allclose(site.log_prob(z), mixture.log_prob(z), atol=1e-5)
    loc, scale = model.encoders[1](xs[1])
    draws = site.rsample(torch.Size([4000]))
    # Mean of expert 1 within 5 standard errors (scale / sqrt(4000)).
    assert ((draws.mean(0) - loc).abs() < 5 * scale / np.sqrt(4000)).all()


def test_stage2_leaves_the_joint_vae_untouched():
    xs = [torch.randn(40, 5), torch.randn(40, 3)]
    jnf = JNF([5, 3], latent_dim=2, hidden_dims=(8,))
    frozen = {
        k: v.clone() for k, v in jnf.state_dict().items() if not k.startswith(("flows", "context"))
    }
    flows = {k: v.clone() for k, v in jnf.flows.state_dict().items()}
    jnf.fit_unimodal(xs, num_steps=5, batch_size=16, learning_rate=1e-2)
    after = jnf.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(jnf.flows.state_dict()[k], v) for k, v in flows.items())
    assert all(p.grad is None for p in jnf.joint_encoder.parameters())
