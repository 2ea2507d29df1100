# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Bayesian logistic regression (NumPyro)
#
# A 31-parameter logistic regression on scikit-learn's breast-cancer data (569 patients, 30
# standardized features; shipped with scikit-learn, nothing is downloaded). We fit it with NUTS
# (the reference), with NumPyro's built-in guides and with every mixvi guide, on the same SVI
# budget, and compare them on what a user cares about:
#
# * posterior means and standard deviations against NUTS,
# * held-out log predictive density (a test split the fit never saw),
# * Pareto-k̂ of the importance weights `p(θ, y) / q(θ)` (can the fit be trusted?),
# * wall-clock time.
#
# Then one fit goes through ArviZ: `az.summary`, `az.loo`, the k̂ plot and a pair plot against NUTS.
#
# Set `MIXVI_TUTORIAL_QUICK=1` to run everything with small budgets (that is what the tests
# and `make demo` do); `MIXVI_TUTORIAL_OUTPUT=folder` also saves the figures there.

# %%
import os
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook kernel

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from numpyro.infer.util import log_density, log_likelihood
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import mixvi
from mixvi.arviz_bridge import from_draws
from numpyro_mixvi import SIVI_ELBO, AutoCWM, AutoFlowMixture, AutoSIVI, RBMixture_ELBO

QUICK = os.environ.get("MIXVI_TUTORIAL_QUICK", "0") == "1"
OUTPUT = os.environ.get("MIXVI_TUTORIAL_OUTPUT")
NUM_STEPS = 1000 if QUICK else 5000  # SVI steps, the same for every guide
NUM_WARMUP, NUM_SAMPLES = (200, 300) if QUICK else (1000, 2000)  # NUTS
NUM_DRAWS = 500 if QUICK else 4000  # draws from each fitted guide


def save(fig, name):
    """Save a figure when MIXVI_TUTORIAL_OUTPUT names a folder (as `make demo` does)."""
    if OUTPUT:
        os.makedirs(OUTPUT, exist_ok=True)
        fig.savefig(os.path.join(OUTPUT, name), dpi=110, bbox_inches="tight")


# %% [markdown]
# ## Data and model
#
# Standardize the features, hold out 30% of the patients, and put a standard normal prior on
# the weights. The features are strongly correlated (several are the radius, perimeter and area
# of the same nucleus), so the posterior is correlated: a mean-field guide cannot represent it.

# %%
features, labels = load_breast_cancer(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(
    features, labels, test_size=0.3, random_state=0, stratify=labels
)
center, scale = x_train.mean(0), x_train.std(0)
x_train = jnp.asarray((x_train - center) / scale, dtype=jnp.float32)
x_test = jnp.asarray((x_test - center) / scale, dtype=jnp.float32)
y_train = jnp.asarray(y_train, dtype=jnp.float32)
y_test = jnp.asarray(y_test, dtype=jnp.float32)
print(f"train {x_train.shape}, test {x_test.shape}")


def model(x, y=None):
    num_features = x.shape[-1]
    weights = numpyro.sample("weights", dist.Normal(0.0, 1.0).expand([num_features]).to_event(1))
    bias = numpyro.sample("bias", dist.Normal(0.0, 5.0))
    with numpyro.plate("data", x.shape[0]):
        # Broadcast-safe (not x @ weights): mixvi ELBOs evaluate the model at many points at once.
        logits = (x * weights).sum(-1) + bias
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


# %% [markdown]
# ## NUTS reference

# %%
start = time.perf_counter()
mcmc = MCMC(NUTS(model), num_warmup=NUM_WARMUP, num_samples=NUM_SAMPLES, progress_bar=False)
mcmc.run(jax.random.PRNGKey(0), x_train, y_train)
nuts_seconds = time.perf_counter() - start
reference = {name: np.asarray(value) for name, value in mcmc.get_samples().items()}
reference_flat, columns = mixvi.flatten_draws(reference)
print(f"NUTS: {NUM_SAMPLES} draws in {nuts_seconds:.1f} s")

# %% [markdown]
# ## The guides
#
# Each entry builds a guide and the ELBO it trains with. Swapping a guide is exactly this:
# everything else in the loop (`SVI`, `svi.run`, `guide.sample_posterior`) stays the same.
# mixvi's `AutoCWM` trains with `RBMixture_ELBO`, which sums the mixture's component index out
# (`K` model evaluations per particle, vectorized), and `AutoSIVI` with `SIVI_ELBO`, which
# estimates the semi-implicit score `∇ log q` by importance sampling with a learned proposal.
# `AutoFlowMixture` has no ELBO entry (`None`): its own staged `fit` (each flow by its own ELBO,
# RBIG on importance-resampled draws, then the mixture weights) replaces `svi.run`, here with
# the same number of gradient steps as the SVI guides, split over its two trained flows.

# %%
GUIDES = {
    "AutoNormal": (lambda: AutoNormal(model), lambda: Trace_ELBO()),
    "AutoMultivariateNormal": (lambda: AutoMultivariateNormal(model), lambda: Trace_ELBO()),
    "AutoIAFNormal": (lambda: AutoIAFNormal(model, num_flows=2), lambda: Trace_ELBO()),
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
# `log_p_and_log_q` traces the fitted guide and scores each draw under the model and the guide;
# `log p − log q` are the importance log-weights whose Pareto-k̂ says whether the guide covers
# the posterior (k̂ < 0.5 good, 0.5–0.7 usable with care, > 0.7 the guide misses mass).
# `AutoSIVI`'s `log q` is an importance-sampled estimate that needs its draw's intermediates
# (the mixing noise and a key); it is biased high by `O(1/k)`, and k̂ inherits that.


# %%
def intermediates(site):
    """A site's intermediates as ``log_prob`` takes them (semi-implicit guides need them)."""
    return [site["intermediates"]] if site["intermediates"] else []


def log_p_and_log_q(rng_key, guide, params, num_draws, *args):
    """Per-draw ``log p(θ, y)`` and ``log q(θ)`` for ``num_draws`` draws of a fitted guide."""

    def one(key):
        seeded = handlers.seed(handlers.substitute(guide, data=params), key)
        trace = handlers.trace(seeded).get_trace(*args)
        sites = {
            name: site
            for name, site in trace.items()
            if site["type"] == "sample" and not site["is_observed"]
        }
        log_q = sum(
            jnp.sum(site["fn"].log_prob(site["value"], *intermediates(site)))
            for site in sites.values()
        )
        values = {name: site["value"] for name, site in sites.items()}
        log_p, _ = log_density(model, args, {}, values)
        return log_p, log_q

    return jax.vmap(one)(jax.random.split(rng_key, num_draws))


def held_out_log_predictive(draws):
    """Sum over test points of ``log mean_s p(y_i | θ_s)``."""
    pointwise = log_likelihood(model, draws, x_test, y_test)["y"]
    num_draws = pointwise.shape[0]
    return float(jnp.sum(jax.scipy.special.logsumexp(pointwise, axis=0) - jnp.log(num_draws)))


def fit(name, seed=1):
    make_guide, make_elbo = GUIDES[name]
    guide = make_guide()
    start = time.perf_counter()
    if make_elbo is None:  # AutoFlowMixture: its staged fit replaces svi.run
        params, _ = guide.fit(
            jax.random.PRNGKey(seed), x_train, y_train, num_steps=NUM_STEPS // 2, lr=1e-2,
            progress_bar=False,
        )
    else:
        svi = SVI(model, guide, numpyro.optim.Adam(1e-2), make_elbo())
        params = svi.run(
            jax.random.PRNGKey(seed), NUM_STEPS, x_train, y_train, progress_bar=False
        ).params
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    key = jax.random.PRNGKey(seed + 100)
    draws = guide.sample_posterior(key, params, sample_shape=(NUM_DRAWS,))
    draws = {site: np.asarray(draws[site]) for site in reference}
    log_p, log_q = log_p_and_log_q(key, guide, params, NUM_DRAWS, x_train, y_train)
    flat, _ = mixvi.flatten_draws(draws, names=sorted(reference))
    row = {
        "guide": name,
        "max |mean err|/sd": float(mixvi.standardized_mean_error(flat, reference_flat).max()),
        "median sd ratio": float(np.median(mixvi.sd_ratio(flat, reference_flat))),
        "held-out lpd": held_out_log_predictive(draws),
        "k-hat": mixvi.pareto_khat(np.asarray(log_p - log_q)),
        "seconds": seconds,
    }
    return row, guide, params, draws, np.asarray(log_p), np.asarray(log_q)


# %% [markdown]
# Fit every guide on the same budget (`NUM_STEPS` Adam steps) and tabulate. Wall-clock
# includes JAX's compilation, which is part of what a user waits for.

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
# How to read it: the mean error is in posterior standard deviations (NUTS's), so 0.1 means the
# guide's mean is a tenth of a posterior sd away from the reference; an sd ratio below 1 means
# the guide is over-confident (the mean-field guide typically is, on correlated coefficients).
# The held-out log predictive density is the number to maximize; k̂ tells whether the guide's
# draws can be importance-reweighted into posterior draws.

# %% [markdown]
# ## ArviZ: summary, LOO and PSIS
#
# `from_draws` turns the draws, the pointwise log-likelihood and the per-draw `log p`, `log q`
# into ArviZ data (an `InferenceData` on ArviZ 0.x, a `DataTree` on 1.x).

# %%
best = max(GUIDES, key=lambda name: fits[name][0]["held-out lpd"])
_, guide, params, draws, log_p, log_q = fits[best]
# Pointwise log-likelihood in float64 numpy: PSIS needs the small differences between draws
# that float32 rounds away for observations the model predicts almost surely.
logits = draws["weights"].astype(np.float64) @ np.asarray(x_train, np.float64).T
logits += draws["bias"].astype(np.float64)[:, None]
y_obs = np.asarray(y_train, np.float64)
pointwise = y_obs * -np.logaddexp(0.0, -logits) + (1 - y_obs) * -np.logaddexp(0.0, logits)
idata = from_draws(
    draws,
    log_likelihood={"y": pointwise},
    observed_data={"y": np.asarray(y_train)},
    log_p=log_p,
    log_q=log_q,
)
print(f"guide: {best}")
print(az.summary(idata, var_names=["bias", "weights"], kind="stats").head(8))

# %% [markdown]
# PSIS-LOO. The draws come from the guide, not from the posterior; on ArviZ 1.x
# `az.loo_approximate_posterior` corrects for that with the `log p − log q` weights, on ArviZ 0.x
# `az.loo` treats the draws as posterior draws (a good approximation only when k̂ of the guide is
# small). Each observation gets its own k̂; the plot shows them.

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
#
# The two most correlated coefficients under the reference posterior, NUTS in grey and each
# guide in colour: a mean-field guide is an axis-aligned ellipse inside the tilted reference.

# %%
corr = np.corrcoef(reference["weights"].T)
np.fill_diagonal(corr, 0.0)
i, j = np.unravel_index(np.argmax(np.abs(corr)), corr.shape)
fig, axes = plt.subplots(1, len(GUIDES), figsize=(4 * len(GUIDES), 3.6), sharex=True, sharey=True)
for ax, name in zip(np.atleast_1d(axes), GUIDES, strict=True):
    guide_draws = fits[name][3]["weights"]
    ax.scatter(reference["weights"][:, i], reference["weights"][:, j], s=3, c="0.6", label="NUTS")
    ax.scatter(guide_draws[:, i], guide_draws[:, j], s=3, alpha=0.5, label=name)
    ax.set_title(f"{name}  (k̂ = {fits[name][0]['k-hat']:.2f})")
    ax.set_xlabel(f"weights[{i}]")
axes_flat = np.atleast_1d(axes)
axes_flat[0].set_ylabel(f"weights[{j}]")
axes_flat[0].legend(loc="upper right", markerscale=4)
fig.tight_layout()
save(fig, "pair_vs_nuts.png")
