"""JNF, JNFShared and the aggregation baselines (numpyro_mixvi.multimodal)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_mixvi.multimodal import JNF, JNFShared, MoEVAE, PoEVAE, make_paired_digits
from tests.jnf_oracles import LinearGaussian, gaussian_log_prob
from tests.properties import grid_2d

CLASSES = {"JNF": JNF, "JNFShared": JNFShared, "PoEVAE": PoEVAE, "MoEVAE": MoEVAE}


def exact_joint_encoder(oracle):
    """An equinox Linear whose (loc, softplus^-1(scale)) output is p(z|X) of a diagonal oracle."""
    dims = [a.shape[0] for a in oracle.loadings]
    _, cov = oracle.posterior(range(len(dims)), [np.zeros((1, d)) for d in dims])
    weight = (
        np.concatenate([a / s**2 for a, s in zip(oracle.loadings, oracle.noise, strict=True)]) @ cov
    )
    scale = np.sqrt(np.diag(cov))
    raw_scale = np.log(np.expm1(scale - 1e-4))
    linear = eqx.nn.Linear(sum(dims), 2 * len(scale), key=jax.random.key(0))
    linear = eqx.tree_at(
        lambda m: m.weight, linear, jnp.asarray(np.concatenate([weight.T, 0 * weight.T]))
    )
    bias = np.concatenate([np.zeros_like(scale), raw_scale])
    return eqx.tree_at(lambda m: m.bias, linear, jnp.asarray(bias))


def test_stage2_recovers_the_exact_conditionals_and_joint(x64):
    # Linear-Gaussian model with an exact (diagonal) joint encoder: the forward-KL optimum of
    # stage 2 is q_j(z|x_j) = p(z|x_j) exactly, and the PoE over all modalities is p(z|X).
    rng = np.random.default_rng(0)
    oracle = LinearGaussian.make(rng, 2, [3, 4], diagonal=True)
    _, xs = oracle.sample(rng, 4000)
    jnf = JNF([3, 4], latent_dim=2, hidden_dims=(32,), flow_hidden_dims=(32, 32), context_dim=8)
    jnf.init_networks(jax.random.key(1))
    jnf.joint_encoder = exact_joint_encoder(oracle)
    data = [jnp.asarray(x) for x in xs]
    # A short run, then a lower learning rate to settle the stochastic optimization noise.
    for seed, (steps, learning_rate) in enumerate(((600, 3e-3), (300, 5e-4))):
        jnf.fit_unimodal(
            jax.random.key(seed), data, num_steps=steps, batch_size=256, learning_rate=learning_rate
        )
    _, x_test = oracle.sample(rng, 3)
    points, area = grid_2d((-4, 4, -4, 4), 200)
    for row in range(3):
        x_row = [x[row : row + 1] for x in x_test]
        for j in range(2):
            mean, cov = oracle.posterior([j], x_row)
            z = rng.multivariate_normal(mean[0], cov, size=4000)
            log_q = jnf.unimodal_log_prob(j, jnp.asarray(z)[:, None], jnp.asarray(x_row[j]))
            diff = gaussian_log_prob(z, mean[0], cov) - np.asarray(log_q[:, 0], dtype=np.float64)
            # 0.03 nats is the approximation budget of a small flow fitted from 900 noisy steps;
            # 3 standard errors cover the Monte Carlo error of the 4000-draw KL estimate.
            assert diff.mean() < 0.03 + 3 * diff.std() / np.sqrt(len(diff)), (row, j)
        # PoE of the fitted flows against the exact joint by 2-D midpoint quadrature (200^2
        # cells); expert errors compound in the product, hence about three unimodal budgets.
        log_poe = jnf.log_prob(jnp.asarray(points)[:, None], [jnp.asarray(x) for x in x_row])
        log_poe = np.array(log_poe[:, 0], dtype=np.float64)
        log_poe -= np.log(np.exp(log_poe).sum() * area)
        mean, cov = oracle.posterior([0, 1], x_row)
        log_p = gaussian_log_prob(points, mean[0], cov)
        kl = float((np.exp(log_p) * (log_p - log_poe)).sum() * area)
        assert kl < 0.1, (row, kl)


@pytest.mark.parametrize("name", ["JNF", "PoEVAE", "MoEVAE"])  # JNFShared's stage 1 is JNF's
def test_stage1_svi_lowers_the_loss(x64, name):
    data = make_paired_digits(num_modalities=2, num_pairs=200, seed=1)
    xs = [jnp.asarray(x) for x in data.modalities]
    model = CLASSES[name]([64, 64], latent_dim=3, hidden_dims=(32,))
    losses = model.fit_joint(
        jax.random.key(0), xs, num_steps=150, batch_size=64, learning_rate=3e-3
    )
    assert losses.shape == (150,)
    # Minibatch losses are noisy; compare means of the first and last 20 steps.
    assert losses[-20:].mean() < 0.8 * losses[:20].mean()
    leaf = jax.tree_util.tree_leaves(eqx.filter(model.decoders, eqx.is_inexact_array))[0]
    assert leaf.dtype == (jnp.float64 if x64 else jnp.float32)


@pytest.mark.parametrize("name", CLASSES)
def test_fit_and_generate_shapes(name):
    data = make_paired_digits(num_modalities=3, num_pairs=60, seed=2)
    xs = [jnp.asarray(x) for x in data.modalities]
    model = CLASSES[name]([64, 64, 64], latent_dim=2, hidden_dims=(16,))
    stages = model.fit(jax.random.key(0), xs, num_steps=3, batch_size=16)
    expected = {"JNF": {"joint", "unimodal"}, "JNFShared": {"projections", "joint", "unimodal"}}
    assert set(stages) == expected.get(name, {"joint"})
    nuts = {"num_warmup": 5} if name.startswith("JNF") else {}
    key = jax.random.key(1)
    # Every inference route (one modality, a NUTS subset, all modalities); generation decodes the
    # same draws, so it is checked on the cheap route only (each NUTS call compiles).
    routes = [{0: xs[0][:4]}, [xs[0][:4], None, xs[2][:4]], [x[:4] for x in xs]]
    if name == "JNFShared":  # its NUTS route is JNF's code; each NUTS call compiles (slow)
        del routes[1]
    for observed in routes:
        z = model.sample_posterior(key, observed, num_samples=3, **nuts)
        assert z.shape == (3, 4, 2)
    outputs = model.generate(key, {1: xs[1][:4]}, num_samples=3)
    assert [x.shape for x in outputs] == [(3, 4, 64)] * 3
    assert [x.shape for x in model.generate(key, None, num_samples=5)] == [(5, 64)] * 3


@pytest.mark.parametrize("name", CLASSES)
def test_wrong_modality_counts_and_shapes_are_rejected(name):
    model = CLASSES[name]([5, 3], latent_dim=2, hidden_dims=(8,))
    key = jax.random.key(0)
    with pytest.raises(RuntimeError, match="no networks yet"):
        model.generate(key, None)
    good = [jnp.zeros((4, 5)), jnp.zeros((4, 3))]
    with pytest.raises(ValueError, match="expected 2 modalities"):
        model.fit(key, [good[0]], num_steps=1)
    with pytest.raises(
        ValueError, match=r"modality 1 must be an array of shape \(N, 3\); got \(4, 4\)"
    ):
        model.fit(key, [good[0], jnp.zeros((4, 4))], num_steps=1)
    with pytest.raises(ValueError, match=r"training needs all 2 modalities; \[1\] missing"):
        model.fit_joint(key, [good[0], None], num_steps=1)
    model.init_networks(key)
    with pytest.raises(ValueError, match="modality 0 must be an array of shape"):
        model.sample_posterior(key, {0: jnp.zeros(5)})
    with pytest.raises(ValueError, match="modality index must be in 0..1"):
        model.generate(key, {2: jnp.zeros((4, 3))})
    with pytest.raises(ValueError, match="paired row by row"):
        model.sample_posterior(key, [jnp.zeros((4, 5)), jnp.zeros((3, 3))])
    with pytest.raises(ValueError, match="at least one observed"):
        model.sample_posterior(key, [None, None])
    with pytest.raises(TypeError, match="mapping"):
        model.sample_posterior(key, jnp.zeros((4, 5)))


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
    from numpyro.distributions import Normal

    from numpyro_mixvi.multimodal._base import gaussian_encoder

    model = PoEVAE([4, 4, 4], latent_dim=3, hidden_dims=(8,))
    model.init_networks(jax.random.key(0))
    xs = [jax.random.normal(jax.random.key(i), (5, 4)) for i in range(3)]
    posterior = model.subset_posterior([xs[0], None, xs[2]])
    z = jax.random.normal(jax.random.key(9), (7, 5, 3))
    experts = [Normal(*gaussian_encoder(model.encoders[j], xs[j])) for j in (0, 2)]
    unnormalized = sum(e.log_prob(z).sum(-1) for e in experts) + Normal(0.0, 1.0).log_prob(z).sum(
        -1
    )
    ratio = posterior.log_prob(z) - unnormalized
    assert jnp.allclose(ratio, ratio[:1], atol=1e-4)


def test_moe_guide_scores_with_the_mixture_and_draws_from_its_expert():
    from numpyro_mixvi.multimodal._base import gaussian_encoder

    model = MoEVAE([4, 4], latent_dim=2, hidden_dims=(8,))
    model.init_networks(jax.random.key(0))
    xs = [jax.random.normal(jax.random.key(i), (6, 4)) for i in range(2)]
    site = model.guide_distribution("z_1", xs, model.encoders)
    mixture = model.subset_posterior(xs)
    z = jax.random.normal(jax.random.key(5), (9, 6, 2))
    assert jnp.allclose(site.log_prob(z), mixture.log_prob(z), atol=1e-5)
    loc, scale = gaussian_encoder(model.encoders[1], xs[1])
    draws = site.sample(jax.random.key(3), (4000,))
    # Mean of expert 1 within 5 standard errors (scale / sqrt(4000)).
    assert (jnp.abs(draws.mean(0) - loc) < 5 * scale / np.sqrt(4000)).all()
