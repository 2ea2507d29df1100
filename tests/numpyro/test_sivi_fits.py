"""AutoSIVI fits on the AISIVI paper's 2-D targets beat Gaussian guides (NumPyro).

Mirror of ``tests/pyro/test_sivi_fits.py``: the same targets, budgets (steps, particles, ``k``,
Adam 1e-2 decayed tenfold over the run, elementwise gradient clip 100) and margins, with the
guide's defaults (no ``init_mixing_fraction`` passed). Every guide starts at the origin
(``init_to_feasible``; Pyro's ``init_to_median`` also gives the origin for these single 2-D
sites, NumPyro's would take medians of prior draws). Scores on fresh draws: the ELBO
``E_q[log p - log q]`` (SIVI: as ``SIVI_ELBO`` reports it, each draw's own ``eps`` among
``k = 1024`` importance draws, biased *low* by ``O(1/k)``) and the sliced W2 distance to exact
target draws.
"""

import functools
import math

import jax
import numpy as np
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from numpyro.infer.initialization import init_to_feasible

from mixvi.metrics import sliced_wasserstein
from numpyro_mixvi import SIVI_ELBO, TARGETS, AutoSIVI, target_model


def _guide_and_elbo(model, guide_name, particles, k, eval_k):
    if guide_name in ("AISIVI", "BSIVI"):
        guide = AutoSIVI(model, mixing_dim=2, hidden_dims=(64, 64), init_scale=0.5,
                         proposal="flow" if guide_name == "AISIVI" else "prior",
                         num_importance_samples=eval_k, init_loc_fn=init_to_feasible)
        return guide, SIVI_ELBO(num_particles=particles, num_importance_samples=k), SIVI_ELBO()
    guide = (AutoNormal if guide_name == "AutoNormal" else AutoMultivariateNormal)(
        model, init_loc_fn=init_to_feasible)
    return guide, Trace_ELBO(num_particles=particles), Trace_ELBO()


@functools.cache  # the slow tests share the Gaussian guides' fits
def fit_and_score(target_name, guide_name, *, steps, particles, k, num_eval=2000, eval_k=1024,
                  seed=0):
    target = TARGETS[target_name]()
    model = target_model(target)
    guide, elbo, score = _guide_and_elbo(model, guide_name, particles, k, eval_k)
    schedule = optax.exponential_decay(1e-2, transition_steps=steps, decay_rate=0.1)
    optimizer = optax.chain(optax.clip(100.0), optax.adam(schedule))
    result = SVI(model, guide, optimizer, elbo).run(jax.random.key(seed), steps,
                                                    progress_bar=False)
    params = result.params
    keys = jax.random.split(jax.random.key(seed + 100), num_eval)
    # One particle per key: per-draw ELBO terms, whose spread gives the standard error.
    terms = -np.asarray(jax.lax.map(lambda key: score.loss(key, params, model, guide), keys,
                                    batch_size=250), np.float64)
    draws = guide.sample_posterior(jax.random.key(seed + 200), params,
                                   sample_shape=(num_eval,))["x"]
    exact = target.sample(jax.random.key(seed + 300), (num_eval,))
    return {"elbo": float(terms.mean()), "elbo_se": float(terms.std() / math.sqrt(num_eval)),
            "sw2": sliced_wasserstein(np.asarray(draws, np.float64),
                                      np.asarray(exact, np.float64), seed=seed)}


def check_ranking(scores, *, sw2_margin):
    # As in the Pyro test: ELBO gaps above 4 combined standard errors; the sliced W2 margin sits
    # on top of the metric's sampling floor (about 0.05 for 2000 vs 2000 draws here), which
    # both scores carry.
    for base in ("AutoNormal", "AutoMultivariateNormal"):
        gap = scores["AISIVI"]["elbo"] - scores[base]["elbo"]
        se = math.hypot(scores["AISIVI"]["elbo_se"], scores[base]["elbo_se"])
        assert gap > 4 * se, (base, scores)
        assert scores["AISIVI"]["sw2"] < scores[base]["sw2"] - sw2_margin, (base, scores)


def test_aisivi_beats_gaussian_guides_on_x_shape_fast():
    # A quarter of the Pyro fast test's budget (JAX compiles each guide's step first); the
    # measured margins are still 50x the ELBO standard error and 4x the sliced-W2 floor.
    scores = {g: fit_and_score("x_shape", g, steps=200, particles=16, k=32, num_eval=1000,
                               eval_k=256)
              for g in ("AISIVI", "AutoNormal", "AutoMultivariateNormal")}
    check_ranking(scores, sw2_margin=0.02)


# x_shape was a tie with BSIVI before the hidden layers' 1/sqrt(fan_in) storage and the
# init_mixing_fraction 0.5 default. Measured since (NumPyro, this test's budget, seeds 0-2):
# AISIVI ELBO -0.004/-0.001/-0.009 vs BSIVI -0.025/-0.020/-0.022 (gaps 3.3-4.8 se), sliced W2
# 0.053/0.062/0.079 vs 0.098/0.084/0.080; Pyro seed 0 passes too.
@pytest.mark.slow
@pytest.mark.parametrize("target_name", [
    "banana",
    "x_shape",
    "multimodal",
])
def test_aisivi_beats_gaussians_and_bsivi_at_equal_k(target_name):
    guides = ("AISIVI", "BSIVI", "AutoNormal", "AutoMultivariateNormal")
    scores = {g: fit_and_score(target_name, g, steps=2000, particles=64, k=64) for g in guides}
    check_ranking(scores, sw2_margin=0.02)
    # AISIVI vs BSIVI at equal k: at least as good in ELBO up to 4 standard errors, and better
    # in ELBO or sliced W2.
    a, b = scores["AISIVI"], scores["BSIVI"]
    assert a["elbo"] > b["elbo"] - 4 * math.hypot(a["elbo_se"], b["elbo_se"]), scores
    assert a["elbo"] > b["elbo"] or a["sw2"] < b["sw2"], scores
