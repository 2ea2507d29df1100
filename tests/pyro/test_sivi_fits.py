"""AutoSIVI fits on the AISIVI paper's 2-D targets beat Gaussian guides (Pyro).

Equal budget for every guide (steps, particles, Adam schedule). Scores on fresh draws:
ELBO ``E_q[log p - log q]`` (SIVI: ``log q_hat`` with 1024 proposal draws, biased high by
``O(1/k)``, a few hundredths here) and sliced W2 to exact target draws. The fast test runs
``x_shape`` at a small budget; the slow one runs all three targets at the reference budget.
"""

import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.optim import ClippedAdam

from mixvi.metrics import sliced_wasserstein
from pyro_mixvi import SIVI_ELBO, TARGETS, AutoSIVI, target_model


def fit_and_score(target_name, guide_name, *, steps, particles, k, num_eval=2000, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    target = TARGETS[target_name]()
    model = target_model(target)
    if guide_name in ("AISIVI", "BSIVI"):
        # The guide's defaults (init_mixing_fraction 0.5: half the initial variance in the
        # spread of mu(eps), so the network starts off its Gaussian saddle).
        guide = AutoSIVI(model, mixing_dim=2, hidden_dims=(64, 64), init_scale=0.5,
                         proposal="flow" if guide_name == "AISIVI" else "prior",
                         num_importance_samples=1024)
        elbo = SIVI_ELBO(num_particles=particles, num_importance_samples=k,
                         vectorize_particles=True)
    else:
        guide = (AutoNormal if guide_name == "AutoNormal" else AutoMultivariateNormal)(model)
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True)
    optim = ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / steps), "clip_norm": 100.0})
    svi = SVI(model, guide, optim, elbo)
    for _ in range(steps):
        svi.step()
    with torch.no_grad():
        with pyro.plate("draws", num_eval):
            trace = pyro.poutine.trace(guide).get_trace()
        trace.compute_log_prob()
        q = trace.nodes["x"]["value"]
        log_q = sum(s["log_prob"] for s in trace.nodes.values() if s["type"] == "sample")
        terms = (target.log_prob(q) - log_q).double()
        exact = target.sample((num_eval,))
    return {"elbo": float(terms.mean()), "elbo_se": float(terms.std() / math.sqrt(num_eval)),
            "sw2": sliced_wasserstein(q.numpy(), exact.numpy(), seed=seed)}


def check_ranking(scores, *, sw2_margin):
    # ELBO differences: require the gap to exceed 4 combined standard errors; sliced W2 of
    # 2000 vs 2000 draws has a sampling floor near 0.05 here, so the margin is above that.
    for base in ("AutoNormal", "AutoMultivariateNormal"):
        gap = scores["AISIVI"]["elbo"] - scores[base]["elbo"]
        se = math.hypot(scores["AISIVI"]["elbo_se"], scores[base]["elbo_se"])
        assert gap > 4 * se, (base, scores)
        assert scores["AISIVI"]["sw2"] < scores[base]["sw2"] - sw2_margin, (base, scores)


def test_aisivi_beats_gaussian_guides_on_x_shape_fast():
    scores = {g: fit_and_score("x_shape", g, steps=400, particles=32, k=64)
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
