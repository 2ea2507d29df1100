"""AutoCWM against AutoNormal, AutoMultivariateNormal and the constant-weight mixture (Pyro).

Every guide gets the same Adam steps, learning rate, number of particles per step (for the
mixtures, ``RBMixture_ELBO(num_particles=N)``: ``N`` base draws, ``N * K`` model evaluations)
and start: ``init_to_feasible``, the origin of the latent space, in both backends. (The hosts'
default ``init_to_median`` differs on these targets' single 2-D site: Pyro falls back to the
origin for a multivariate site, NumPyro takes coordinate-wise medians of 15 prior draws, which
can sit inside one mode; that, not the estimator, is what made the two backends' fits differ.)
The constant-weight mixture is ``AutoCWM(hidden_dims=None)``: the same diagonal components and
initialization, without the classifier. Scores: the ELBO from 10000 guide draws (exact log q)
and the sliced W2 distance to 10000 exact target draws.
"""

import functools
import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.optim import Adam

from mixvi.metrics import sliced_wasserstein
from pyro_mixvi import TARGETS, AutoCWM, RBMixture_ELBO, target_model
from tests.properties import assert_wins_over_seeds

NUM_DRAWS = 10000
BASELINES = ("AutoNormal", "AutoMultivariateNormal", "constant-weight mixture")
SEEDS = (0, 1, 2, 3, 4)


def _guides(model, num_components, num_particles):
    vectorized = dict(num_particles=num_particles, vectorize_particles=True)
    init = dict(init_loc_fn=init_to_feasible)
    return {
        "AutoNormal": (AutoNormal(model, **init), Trace_ELBO(**vectorized)),
        "AutoMultivariateNormal": (AutoMultivariateNormal(model, **init),
                                   Trace_ELBO(**vectorized)),
        "constant-weight mixture": (
            AutoCWM(model, num_components=num_components, hidden_dims=None, **init),
            RBMixture_ELBO(num_particles=num_particles)),
        "AutoCWM": (AutoCWM(model, num_components=num_components, **init),
                    RBMixture_ELBO(num_particles=num_particles)),
    }


def _score(target, model, guide):
    """ELBO terms ``log p - log q`` at guide draws, and the draws."""
    with torch.no_grad():
        if isinstance(guide, AutoCWM):
            posterior = guide.get_posterior()
            x = posterior.sample((NUM_DRAWS,))
            log_q = posterior.log_prob(x)
        else:
            x = pyro.infer.Predictive(model, guide=guide, num_samples=NUM_DRAWS)()["x"]
            log_q = (guide.get_posterior().log_prob(x) if hasattr(guide, "get_posterior")
                     else torch.distributions.Normal(guide.locs.x, guide.scales.x)
                     .log_prob(x).sum(-1))
        return (target.log_prob(x) - log_q).double().numpy(), x.double().numpy()


@functools.cache  # the two slow tests share their fits
def fit_scores(name, *, num_steps, seed, num_components=4, num_particles=8, lr=2e-2):
    """Fit every guide at one budget and start: ``({label: (elbo, se, sw2)}, floor)``."""
    torch.set_default_dtype(torch.float64)
    target = TARGETS[name]()
    model = target_model(target)
    pyro.set_rng_seed(1000)
    exact = target.sample((NUM_DRAWS,)).numpy()
    # the sliced W2 between two exact samples of this size: the metric's noise floor.
    floor = sliced_wasserstein(target.sample((NUM_DRAWS,)).numpy(), exact)
    scores = {}
    for label, (guide, elbo) in _guides(model, num_components, num_particles).items():
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        svi = SVI(model, guide, Adam({"lr": lr}), elbo)
        for _ in range(num_steps):
            svi.step()
        log_ratio, draws = _score(target, model, guide)
        scores[label] = (log_ratio.mean(), log_ratio.std(ddof=1) / math.sqrt(NUM_DRAWS),
                         sliced_wasserstein(draws, exact))
    return scores, floor


def assert_autocwm_wins(name, *, num_steps, seeds, baselines=BASELINES):
    """AutoCWM's seed-mean ELBO and sliced W2 beat every baseline's (seeds paired; see
    :func:`tests.properties.assert_wins_over_seeds` for the margins)."""
    runs = [fit_scores(name, num_steps=num_steps, seed=seed) for seed in seeds]
    assert_wins_over_seeds(runs, "AutoCWM", baselines, name)


def test_autocwm_beats_the_baselines_fast():
    """The default-run version: one target, 1000 steps, one seed; the slow test runs all three."""
    assert_autocwm_wins("x_shape", num_steps=1000, seeds=(0,))


def _saturated_fraction(posterior, z):
    """Fraction of the last hidden layer's pre-activations beyond ``|2|`` (tanh' < 0.08)."""
    h = z
    for weight, bias in posterior.classifier_params[:-1]:
        pre = h @ weight + bias
        h = torch.tanh(pre)
    return (pre.abs() > 2).double().mean().item()


def test_classifier_stays_trainable_early_in_the_fit(dtype):
    """Regression: while the weights' constant part is learned, the hidden layers do not saturate.

    With only the output layer slowed, Adam moved the hidden layers at full step size (it
    normalizes their gradient, proportional to the near-zero output layer) and after 250 steps on
    banana every pre-activation of the last hidden layer was beyond |2| at every base point
    (fraction 1.000 in seeds 0, 3 and 4): a classifier constant in z, whose gradient is gone.
    With every classifier layer slowed the fraction was 0.04, 0.00002, 0.002. The bound 0.5
    sits between; the fraction's Monte Carlo error over 2000 x 32 values is below 0.01.
    """
    seed = 4 if dtype == torch.float64 else 0  # two of the seeds measured, one per dtype
    target = TARGETS["banana"]()
    model = target_model(target)
    pyro.set_rng_seed(seed)
    guide = AutoCWM(model, num_components=4, init_loc_fn=init_to_feasible)
    svi = SVI(model, guide, Adam({"lr": 2e-2}), RBMixture_ELBO(num_particles=8))
    for _ in range(250):
        svi.step()
    with torch.no_grad():
        posterior = guide.get_posterior()
        z = torch.randn(2000, 2, dtype=dtype)
        assert posterior.locs.dtype == dtype
        assert _saturated_fraction(posterior, z) < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["banana", "x_shape", "eight_modes"])
def test_autocwm_beats_the_gaussian_guides(name):
    assert_autocwm_wins(name, num_steps=2000, seeds=SEEDS,
                        baselines=("AutoNormal", "AutoMultivariateNormal"))


# Measured with this test's code, 5 seeds, 2000 steps (AutoCWM minus mixture, mean +- se over
# seeds; Pyro / NumPyro): banana ELBO 0.177 +- 0.006 / 0.169 +- 0.013, sliced W2 0.213 +- 0.026 /
# 0.190 +- 0.025 better, AutoCWM's ELBO -0.08 to -0.14 in every seed (the mixture's -0.28).
# Before every classifier layer was slowed by WEIGHT_STEP_SCALE, 2 of 5 seeds ended at the
# mixture's ELBO with the tanh layers saturated (see guides/cwm.py) and the gap was 0.088 +- 0.036.
# eight_modes (same fix), this test's code, 5 seeds: K = 4, ELBO gap 0.115 +- 0.070 / 0.123 +-
# 0.074, sliced W2 worse by 0.064 +- 0.053 / 0.043 +- 0.027; K = 8, ELBO 0.152 +- 0.143 / 0.156 +-
# 0.066, sliced W2 0.074 +- 0.062 better / 0.041 +- 0.051 worse. Equal-budget setups tried for
# the claim (NumPyro, float32, these guides and scores with init_scale / hidden_dims / steps
# changed alike for both mixtures; 10 paired seeds 0-9 unless stated; gap = AutoCWM - mixture,
# SW2 = sliced W2, mean +- se over seeds):
#   K = 8, default, 15 seeds 0-14       ELBO +0.100 +- 0.047 (2.1 se)   SW2 worse 0.047 +- 0.021
#   K = 8, 4000 steps                   ELBO +0.170 +- 0.062 (2.7 se)   SW2 worse 0.043 +- 0.032
#   K = 8, hidden_dims (64, 64)         ELBO +0.202 +- 0.062 (3.3 se)   SW2 worse 0.060 +- 0.039
#   K = 8, init_scale 0.6               ELBO -0.039 +- 0.025            SW2 worse 0.064 +- 0.022
#   K = 8, init_scale 1.0               ELBO +0.007 +- 0.053            SW2 worse 0.058 +- 0.031
#   K = 8, init_scale 3.0               ELBO -0.305 +- 0.175            SW2 worse 0.395 +- 0.097
#   K = 4, 4000 steps                   ELBO +0.094 +- 0.048            SW2 worse 0.005 +- 0.021
#   K = 4, hidden_dims (64, 64)         ELBO +0.027 +- 0.090            SW2 worse 0.082 +- 0.044
#   K = 4, init_scale 1.0               ELBO +0.132 +- 0.062            SW2 better 0.017 +- 0.035
#   K = 4, init_scale 3.0               ELBO -0.118 +- 0.133            SW2 worse 0.240 +- 0.074
#   Pyro (float64, seeds 0-4): K = 8, init_scale 1.0: ELBO -0.100 +- 0.096, SW2 worse 0.078 +-
#   0.042; K = 8, (64, 64): ELBO +0.021 +- 0.207, SW2 better 0.080 +- 0.087 (one fit at 2 modes).
# No setup gives both; sliced W2 is never better by 3 se. Mechanism (modes = those holding > 2%
# of 10000 draws): from the default start every component sits within 0.3 of the origin, 10 sd
# from every mode, and leaves along its random offset; the mixture's components collide (4-6 of
# 8 modes at K = 8; 8 random directions give 8 (1 - (7/8)^8) = 5.3 on average). The classifier
# splits the base space between overlapping components, so AutoCWM reaches 4-7: its ELBO edge.
# Sliced W2 rewards a different coverage: the mixture often ends on the four diagonal modes
# (.x.x.x.x), the symmetric 4-set, 0.246; AutoCWM's 5-6 modes are asymmetric (adds to that set,
# or contiguous arcs such as xxxx...x) and scored 0.20-0.59, below 0.246 in 1 of 26 fits; only
# its 7-mode ends (5 of 35 fits at K = 8) score 0.21-0.24. A wider start (0.6, 1.0) lifts the
# mixture to 6-8 modes and the ELBO edge is gone: with K = 8 the target is in the mixture's own
# family, so whatever helps discovery helps both. With K = 4, AutoCWM went past K modes (one
# component carving its base mass between two modes, ELBO -0.61 to -0.66 > log 1/2) in 3 of 30
# fits from the default start; otherwise it stops at log 1/2, the mixture's best, and its ELBO
# edge is only the mixture's collisions (log 3/8). Each row: the NumPyro module's fit_scores
# at that setting, restricted to the two mixtures. We keep K = 4, as on the other two targets.
@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "banana",
    "x_shape",
    pytest.param("eight_modes", marks=pytest.mark.xfail(
        reason="K=4: both stop near 4 of 8 modes; K=8: ELBO < 3 se, sliced W2 worse",
        strict=False)),
])
def test_autocwm_beats_the_constant_weight_mixture(name):
    assert_autocwm_wins(name, num_steps=2000, seeds=SEEDS, baselines=("constant-weight mixture",))
