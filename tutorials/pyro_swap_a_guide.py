# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Swap a guide (Pyro): eight schools
#
# You have a model and an SVI loop with `AutoNormal`. This tutorial keeps both and changes only
# the line that builds the guide (and, for some guides, the line that builds the ELBO). The model
# is eight schools in its *centered* form, whose posterior is a funnel: when the between-school
# scale `tau` is small, every `theta` is squeezed towards `mu`. A Gaussian over the unconstrained
# latent (`log tau`, `mu`, `theta`) cannot follow the funnel's neck, and the diagnostics say so.
# The [NumPyro version](numpyro_swap_a_guide.ipynb) is the same, line for line.
#
# `MIXVI_TUTORIAL_QUICK=1` shrinks the budgets; `MIXVI_TUTORIAL_OUTPUT=folder` saves the figures.

# %%
import os
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook kernel

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.reparam import LocScaleReparam

import mixvi
from pyro_mixvi import (
    SIVI_ELBO,
    AutoCWM,
    AutoFlowMixture,
    AutoSIVI,
    RBMixture_ELBO,
    log_importance_weights,
)

QUICK = os.environ.get("MIXVI_TUTORIAL_QUICK", "0") == "1"
OUTPUT = os.environ.get("MIXVI_TUTORIAL_OUTPUT")
NUM_STEPS = 800 if QUICK else 8000
NUM_DRAWS = 300 if QUICK else 4000


def save(fig, name):
    """Save a figure when MIXVI_TUTORIAL_OUTPUT names a folder."""
    if OUTPUT:
        os.makedirs(OUTPUT, exist_ok=True)
        fig.savefig(os.path.join(OUTPUT, name), dpi=110, bbox_inches="tight")


# %% [markdown]
# ## The model you already have

# %%
y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(sigma.new_zeros(()), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("school", sigma.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


# %% [markdown]
# A reference posterior: NUTS on the non-centered form of the same model (`LocScaleReparam`
# samples `theta` through a standard normal, which removes the funnel for the sampler only).

# %%
pyro.set_rng_seed(0)
reparam_model = poutine.reparam(eight_schools, config={"theta": LocScaleReparam(0.0)})
mcmc = MCMC(
    NUTS(reparam_model, target_accept_prob=0.95),
    warmup_steps=200 if QUICK else 1500,
    num_samples=300 if QUICK else 4000,
    disable_progbar=True,
)
mcmc.run(sigma, y)
samples = mcmc.get_samples()
reference = {"mu": samples["mu"].numpy(), "tau": samples["tau"].numpy()}
# The reparameterized model samples theta_decentered; theta itself is mu + tau * theta_decentered.
reference["theta"] = (
    samples["mu"][:, None] + samples["tau"][:, None] * samples["theta_decentered"]
).numpy()

# %% [markdown]
# ## Fit with AutoNormal
#
# `check` draws from the fitted guide once, takes the importance log-weights `log p − log q` of
# those draws (`log_importance_weights`), and reports two diagnostics of the same weights: the
# Pareto-k̂ (`mixvi.pareto_khat`; k̂ < 0.5 good, 0.5–0.7 usable with care, > 0.7 the guide misses
# posterior mass) and the importance-sampled log marginal likelihood with the guide as proposal
# (`mixvi.log_evidence_from_weights`; a lower bound in expectation: higher is better). The
# one-call forms `psis_diagnostic` and `log_evidence` each draw afresh. Then: how well the guide
# matches the reference on `log tau`, the funnel's axis.


# %%
def check(name, guide):
    predictive = Predictive(eight_schools, guide=guide, num_samples=NUM_DRAWS)
    with torch.no_grad():
        samples = predictive(sigma)
    # Predictive adds a sample plate left of the model's plates; reshape to the sites' shapes.
    draws = {k: samples[k].reshape((NUM_DRAWS, *v.shape[1:])).numpy() for k, v in reference.items()}
    log_weights = log_importance_weights(eight_schools, guide, sigma, y, num_samples=NUM_DRAWS)
    log_tau, log_tau_ref = np.log(draws["tau"]), np.log(reference["tau"])
    flat, _ = mixvi.flatten_draws(draws)
    flat_ref, _ = mixvi.flatten_draws(reference)
    return {
        "guide": name,
        "k-hat": mixvi.pareto_khat(log_weights),
        "log Z": mixvi.log_evidence_from_weights(log_weights).estimate,
        "sd(log tau) / NUTS": float(log_tau.std() / log_tau_ref.std()),
        "5% of tau": float(np.quantile(draws["tau"], 0.05)),
        "max |mean err|/sd": float(mixvi.standardized_mean_error(flat, flat_ref).max()),
    }, draws


def run_svi(guide, elbo, lr=5e-3, seed=1):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = SVI(eight_schools, guide, pyro.optim.Adam({"lr": lr}), elbo)
    for _ in range(NUM_STEPS):
        svi.step(sigma, y)


# %%
guide = AutoNormal(eight_schools)
run_svi(guide, Trace_ELBO())
results = {"AutoNormal": check("AutoNormal", guide)}
print(pd.Series(results["AutoNormal"][0]).to_string())

# %% [markdown]
# ## Swap the guide
#
# Only the first line of each cell changes. A richer built-in guide first: a full-covariance
# Gaussian, then Pyro's inverse autoregressive flow.

# %%
guide = AutoMultivariateNormal(eight_schools)  # was: AutoNormal(eight_schools)
run_svi(guide, Trace_ELBO())
results["AutoMultivariateNormal"] = check("AutoMultivariateNormal", guide)

# %%
guide = AutoIAFNormal(eight_schools, num_transforms=2)  # was: AutoNormal(eight_schools)
run_svi(guide, Trace_ELBO())
results["AutoIAFNormal"] = check("AutoIAFNormal", guide)

# %% [markdown]
# ## Swap in a mixvi guide
#
# `AutoCWM` is a classifier-weighted mixture of Gaussians: the classifier picks a component per
# point, so different components can cover the funnel's mouth and neck. It trains with
# `RBMixture_ELBO`, which sums the component index out (two changed lines).

# %%
guide = AutoCWM(eight_schools, num_components=4)  # was: AutoNormal(eight_schools)
run_svi(guide, RBMixture_ELBO(num_particles=8))  # was: Trace_ELBO()
results["AutoCWM"] = check("AutoCWM", guide)

# %% [markdown]
# `AutoSIVI` is semi-implicit: `x = mu(eps) + sigma * u` with a neural `mu` of a noise `eps`.
# `SIVI_ELBO` estimates the score `∇ log q` by importance sampling with a learned proposal.
# Its `log q` is itself an importance-sampled estimate (biased low by `O(1/k)`), which the
# k̂ and ELBO columns inherit.

# %%
guide = AutoSIVI(eight_schools, hidden_dims=(64, 64))  # was: AutoNormal(eight_schools)
run_svi(guide, SIVI_ELBO(num_importance_samples=32))  # was: Trace_ELBO()
results["AutoSIVI"] = check("AutoSIVI", guide)

# %% [markdown]
# `AutoFlowMixture` is a mixture of heterogeneous flows (MAF, RealNVP and RBIG) with global
# weights. It is trained by its own staged `fit` (each flow by its own ELBO, RBIG on
# importance-resampled draws, then the weights), which replaces the SVI loop; the budget below
# is the same number of gradient steps as the other guides, split over its two trained flows.

# %%
pyro.clear_param_store()
pyro.set_rng_seed(1)
guide = AutoFlowMixture(eight_schools)  # was: AutoNormal(eight_schools)
fit = guide.fit(sigma, y, num_steps=NUM_STEPS // 2, lr=5e-3, progress_bar=False)  # was: SVI
print("weights (MAF, RealNVP, RBIG):", fit.weights.numpy().round(3), "N_eff:", float(fit.n_eff))
results["AutoFlowMixture"] = check("AutoFlowMixture", guide)

# %% [markdown]
# ## What the diagnostics say

# %%
table = pd.DataFrame([row for row, _ in results.values()]).set_index("guide").round(3)
print(f"NUTS: 5% of tau = {np.quantile(reference['tau'], 0.05):.3f}")
print(table.to_string())

# %% [markdown]
# Reading the table: `log Z` is the importance-sampled log evidence with the guide as proposal;
# for an exact `log q` it is a lower bound in expectation, so among guides higher is better.
# `AutoSIVI`'s `log q` is an importance-sampled estimate biased low, so its `log Z` is biased high
# and its k̂ inherits the error; a `log Z` above the other guides' by many nats is that bias, not
# a better fit (raise the guide's `num_importance_samples` to shrink it). `sd(log tau) / NUTS`
# far below 1 means the guide does not reach into the funnel's neck.

# %% [markdown]
# The funnel in the plane of `log tau` and `theta[0]`: NUTS in grey, each guide in colour.

# %%
fig, axes = plt.subplots(
    1, len(results), figsize=(3.4 * len(results), 3.4), sharex=True, sharey=True
)
axes = np.atleast_1d(axes)
for ax, (name, (row, draws)) in zip(axes, results.items(), strict=True):
    ax.scatter(np.log(reference["tau"]), reference["theta"][:, 0], s=2, c="0.6", label="NUTS")
    ax.scatter(np.log(draws["tau"]), draws["theta"][:, 0], s=2, alpha=0.5, label=name)
    ax.set_title(f"{name} (k̂ = {row['k-hat']:.2f})")
    ax.set_xlabel("log tau")
axes[0].set_ylabel("theta[0]")
axes[0].legend(loc="lower left", markerscale=4)
fig.tight_layout()
save(fig, "funnel.png")
