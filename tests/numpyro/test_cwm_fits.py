"""AutoCWM against AutoNormal, AutoMultivariateNormal and the constant-weight mixture (NumPyro).

Every guide gets the same Adam steps, learning rate and number of particles per step (for the
mixtures, ``RBMixture_ELBO(num_particles=N)``: ``N`` base draws, ``N * K`` model evaluations).
The constant-weight mixture is ``AutoCWM(hidden_dims=None)``: the same diagonal components and
initialization, without the classifier. Scores: the ELBO from 10000 guide draws (exact log q)
and the sliced W2 distance to 10000 exact target draws.
"""

import math

import jax
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from mixvi.metrics import sliced_wasserstein
from numpyro_mixvi import TARGETS, AutoCWM, RBMixture_ELBO, target_model

NUM_DRAWS = 10000


def _guides(model, num_components, num_particles):
    return {
        "AutoNormal": (AutoNormal(model), Trace_ELBO(num_particles=num_particles)),
        "AutoMultivariateNormal": (AutoMultivariateNormal(model),
                                   Trace_ELBO(num_particles=num_particles)),
        "constant-weight mixture": (
            AutoCWM(model, num_components=num_components, hidden_dims=None),
            RBMixture_ELBO(num_particles=num_particles)),
        "AutoCWM": (AutoCWM(model, num_components=num_components),
                    RBMixture_ELBO(num_particles=num_particles)),
    }


def compare_on(name, *, num_steps, num_components=4, num_particles=8, lr=2e-2):
    """Every guide at the same budget and with its defaults (AutoCWM: K, hidden_dims, init)."""
    target = TARGETS[name]()
    model = target_model(target)
    exact = np.asarray(target.sample(random.key(1), (NUM_DRAWS,)), np.float64)
    # the sliced W2 between two exact samples of this size: the metric's noise floor.
    floor = sliced_wasserstein(np.asarray(target.sample(random.key(2), (NUM_DRAWS,))), exact)
    scores = {}
    for label, (guide, elbo) in _guides(model, num_components, num_particles).items():
        result = SVI(model, guide, optax.adam(lr), elbo).run(random.key(0), num_steps,
                                                             progress_bar=False)
        if isinstance(guide, AutoNormal):  # the target's support is R^2: x is the latent
            posterior = dist.Normal(result.params["x_auto_loc"],
                                    result.params["x_auto_scale"]).to_event(1)
        else:
            posterior = guide.get_posterior(result.params)
        x = posterior.sample(random.key(3), (NUM_DRAWS,))
        log_q = jax.jit(posterior.log_prob)(x)
        log_ratio = np.asarray(target.log_prob(x) - log_q, np.float64)
        scores[label] = (log_ratio.mean(), log_ratio.std(ddof=1) / math.sqrt(NUM_DRAWS),
                         sliced_wasserstein(np.asarray(x, np.float64), exact))
    cwm_elbo, cwm_se, cwm_sw = scores.pop("AutoCWM")
    for label, (elbo, se, sw) in scores.items():
        # independent ELBO estimates: the gap must exceed 3 joint standard errors.
        assert cwm_elbo - elbo > 3 * math.hypot(cwm_se, se), (name, label, cwm_elbo, elbo)
        # sliced W2 must improve by more than the metric's noise floor.
        assert cwm_sw < sw - floor, (name, label, cwm_sw, sw, floor)


def test_autocwm_beats_the_baselines_fast():
    """The default-run version: one target, 1000 steps; the slow test runs all three."""
    compare_on("x_shape", num_steps=1000)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["banana", "x_shape", "eight_modes"])
def test_autocwm_beats_the_baselines(name):
    compare_on(name, num_steps=2000)
