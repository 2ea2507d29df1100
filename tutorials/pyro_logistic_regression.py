# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Bayesian logistic regression (Pyro)
#
# The Pyro twin of the [NumPyro tutorial](numpyro_logistic_regression.ipynb): a 31-parameter
# logistic regression on scikit-learn's breast-cancer data (shipped with scikit-learn, nothing is
# downloaded), fit with NUTS (the reference), with Pyro's built-in guides and with every mixvi
# guide on the same budget, and compared on posterior means and sds against NUTS, held-out log
# predictive density, Pareto-k̂ and wall-clock.
#
# `MIXVI_TUTORIAL_QUICK=1` shrinks every budget (the test suite runs it that way);
# `MIXVI_TUTORIAL_OUTPUT=folder` also saves the figures there.

# %%
import os
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook kernel

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import mixvi
from pyro_mixvi import SIVI_ELBO, AutoCWM, AutoFlowMixture, AutoSIVI, RBMixture_ELBO, to_arviz

QUICK = os.environ.get("MIXVI_TUTORIAL_QUICK", "0") == "1"
OUTPUT = os.environ.get("MIXVI_TUTORIAL_OUTPUT")
NUM_STEPS = 500 if QUICK else 5000  # SVI steps, the same for every guide
NUM_WARMUP, NUM_SAMPLES = (100, 100) if QUICK else (800, 1500)  # NUTS
NUM_DRAWS = 300 if QUICK else 2000  # draws from each fitted guide


def save(fig, name):
    """Save a figure when MIXVI_TUTORIAL_OUTPUT names a folder."""
    if OUTPUT:
        os.makedirs(OUTPUT, exist_ok=True)
        fig.savefig(os.path.join(OUTPUT, name), dpi=110, bbox_inches="tight")


# %% [markdown]
# ## Data and model
#
# Standardized features, 30% of the patients held out, a standard normal prior on the weights.
# The features are strongly correlated, and so is the posterior.

# %%
features, labels = load_breast_cancer(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(
    features, labels, test_size=0.3, random_state=0, stratify=labels
)
center, scale = x_train.mean(0), x_train.std(0)
x_train = torch.as_tensor((x_train - center) / scale, dtype=torch.float32)
x_test = torch.as_tensor((x_test - center) / scale, dtype=torch.float32)
y_train = torch.as_tensor(y_train, dtype=torch.float32)
y_test = torch.as_tensor(y_test, dtype=torch.float32)
print(f"train {tuple(x_train.shape)}, test {tuple(x_test.shape)}")


def model(x, y=None):
    num_features = x.shape[-1]
    zero, one = x.new_zeros(()), x.new_ones(())
    weights = pyro.sample("weights", dist.Normal(zero, one).expand([num_features]).to_event(1))
    bias = pyro.sample("bias", dist.Normal(zero, 5 * one))
    with pyro.plate("data", x.shape[0]):
        # Broadcast-safe (not x @ weights): mixvi ELBOs evaluate the model at many points at once.
        logits = (x * weights).sum(-1) + bias
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


# %% [markdown]
# ## NUTS reference

# %%
pyro.set_rng_seed(0)
start = time.perf_counter()
mcmc = MCMC(NUTS(model), num_samples=NUM_SAMPLES, warmup_steps=NUM_WARMUP, disable_progbar=True)
mcmc.run(x_train, y_train)
nuts_seconds = time.perf_counter() - start
reference = {name: value.numpy() for name, value in mcmc.get_samples().items()}
reference_flat, columns = mixvi.flatten_draws(reference)
print(f"NUTS: {NUM_SAMPLES} draws in {nuts_seconds:.1f} s")

# %% [markdown]
# ## The guides
#
# Each entry builds a guide and the ELBO it trains with; swapping a guide changes nothing else.
# The mixvi guides need their own ELBO: `RBMixture_ELBO` for `AutoCWM` (the mixture's component
# index is summed out, `K` model evaluations per particle) and `SIVI_ELBO` for `AutoSIVI`.
# `AutoFlowMixture` has no ELBO entry (`None`): it trains by its own staged `fit` (each flow by
# its own ELBO, RBIG on importance-resampled draws, then the mixture weights), here with the
# same number of gradient steps as the SVI guides, split over its two trained flows.

# %%
GUIDES = {
    "AutoNormal": (lambda: AutoNormal(model), lambda: Trace_ELBO()),
    "AutoMultivariateNormal": (lambda: AutoMultivariateNormal(model), lambda: Trace_ELBO()),
    "AutoIAFNormal": (lambda: AutoIAFNormal(model, num_transforms=2), lambda: Trace_ELBO()),
    # mixvi: a classifier-weighted mixture, trained with the component index summed out
    "AutoCWM": (
        lambda: AutoCWM(model, num_components=4),
        lambda: RBMixture_ELBO(num_particles=4),
    ),
    # mixvi: semi-implicit, score by importance sampling with a learned flow proposal
    "AutoSIVI": (
        lambda: AutoSIVI(model, hidden_dims=(64, 64)),
        lambda: SIVI_ELBO(num_importance_samples=32),
    ),
    # mixvi: MAF, RealNVP and RBIG experts with global weights (AMF-VI)
    "AutoFlowMixture": (lambda: AutoFlowMixture(model), None),
}


# %% [markdown]
# ## Fit and compare
#
# `to_arviz` draws from the fitted guide and returns ArviZ data with the posterior draws, the
# pointwise log-likelihood and, per draw, `log p(θ, y)` and `log q(θ)`: their difference is the
# importance log-weight whose Pareto-k̂ says whether the guide can be trusted.


# %%
def pointwise_log_likelihood(draws, x, y):
    """``(S, N)`` log-likelihood of each observation under each draw."""
    logits = torch.as_tensor(draws["weights"]) @ x.T + torch.as_tensor(draws["bias"])[:, None]
    return dist.Bernoulli(logits=logits).log_prob(y).numpy()


def held_out_log_predictive(draws):
    """Sum over test points of ``log mean_s p(y_i | θ_s)``."""
    pointwise = pointwise_log_likelihood(draws, x_test, y_test)
    lse = np.logaddexp.reduce(pointwise, axis=0)
    return float(np.sum(lse - np.log(pointwise.shape[0])))


def train(guide, make_elbo):
    if make_elbo is None:  # AutoFlowMixture: its staged fit replaces the SVI loop
        guide.fit(x_train, y_train, num_steps=NUM_STEPS // 2, lr=1e-2, progress_bar=False)
        return
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), make_elbo())
    for _ in range(NUM_STEPS):
        svi.step(x_train, y_train)


def fit(name, seed=1):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    make_guide, make_elbo = GUIDES[name]
    guide = make_guide()
    start = time.perf_counter()
    train(guide, make_elbo)
    seconds = time.perf_counter() - start
    idata = to_arviz(model, guide, x_train, y_train, num_samples=NUM_DRAWS)
    draws = {site: idata.posterior[site].values[0] for site in reference}
    log_weights = (idata.sample_stats["log_p"] - idata.sample_stats["log_q"]).values[0]
    flat, _ = mixvi.flatten_draws(draws, names=sorted(reference))
    row = {
        "guide": name,
        "max |mean err|/sd": float(mixvi.standardized_mean_error(flat, reference_flat).max()),
        "median sd ratio": float(np.median(mixvi.sd_ratio(flat, reference_flat))),
        "held-out lpd": held_out_log_predictive(draws),
        "k-hat": mixvi.pareto_khat(log_weights),
        "seconds": seconds,
    }
    return row, idata, draws


# %%
fits = {name: fit(name) for name in GUIDES}
rows = [fits[name][0] for name in GUIDES]
rows.append(
    {
        "guide": "NUTS (reference)",
        "max |mean err|/sd": 0.0,
        "median sd ratio": 1.0,
        "held-out lpd": held_out_log_predictive(reference),
        "k-hat": float("nan"),
        "seconds": nuts_seconds,
    }
)
table = pd.DataFrame(rows).set_index("guide").round(3)
print(table.to_string())

# %% [markdown]
# ## ArviZ: summary, LOO and PSIS

# %%
best = max(GUIDES, key=lambda name: fits[name][0]["held-out lpd"])
_, idata, draws = fits[best]
log_p, log_q = (idata.sample_stats[name].values[0] for name in ("log_p", "log_q"))
pointwise = idata.log_likelihood["y"].values[0]
print(f"guide: {best}")
print(az.summary(idata, var_names=["bias", "weights"], kind="stats").head(8))

# %% [markdown]
# PSIS-LOO on the guide's draws (ArviZ 1.x corrects for drawing from `q` with
# `loo_approximate_posterior`; ArviZ 0.x treats them as posterior draws) and the per-observation
# k̂ plot.

# %%
if hasattr(az, "loo_approximate_posterior"):
    loo = az.loo_approximate_posterior(idata, log_p=log_p, log_q=log_q, pointwise=True)
else:
    loo = az.loo(idata, pointwise=True)
print(loo)
pointwise_elpd = np.asarray(getattr(loo, "loo_i", getattr(loo, "elpd_i", np.zeros(1))))
if not np.all(np.isfinite(pointwise_elpd)):
    bad = np.flatnonzero(~np.isfinite(pointwise_elpd)).tolist()
    spread = np.ptp(pointwise[:, bad], axis=0)
    print(
        f"No Pareto tail could be fit for observations {bad}: their log-likelihood varies by "
        f"only {spread.max():.1e} across the draws (predicted with certainty), so the PSIS "
        "weights are all equal and this ArviZ reports elpd_loo as NaN for them."
    )
az.plot_khat(loo)
save(plt.gcf(), "khat.png")

# %% [markdown]
# ## Pair plot against NUTS

# %%
corr = np.corrcoef(reference["weights"].T)
np.fill_diagonal(corr, 0.0)
i, j = np.unravel_index(np.argmax(np.abs(corr)), corr.shape)
fig, axes = plt.subplots(1, len(GUIDES), figsize=(3.2 * len(GUIDES), 3.4), sharex=True, sharey=True)
axes = np.atleast_1d(axes)
for ax, name in zip(axes, GUIDES, strict=True):
    guide_draws = fits[name][2]["weights"]
    ax.scatter(reference["weights"][:, i], reference["weights"][:, j], s=3, c="0.6", label="NUTS")
    ax.scatter(guide_draws[:, i], guide_draws[:, j], s=3, alpha=0.5, label=name)
    ax.set_title(f"{name}  (k̂ = {fits[name][0]['k-hat']:.2f})")
    ax.set_xlabel(f"weights[{i}]")
axes[0].set_ylabel(f"weights[{j}]")
axes[0].legend(loc="upper right", markerscale=4)
fig.tight_layout()
save(fig, "pair_vs_nuts.png")
