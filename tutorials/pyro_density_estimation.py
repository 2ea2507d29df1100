# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Density estimation from samples (Pyro)
#
# mixvi's mixtures are ordinary distributions too: fit them to samples (MCMC draws, data) by
# maximum likelihood and use `log_prob` and `sample`. Here, two 2-D data sets made by
# scikit-learn (two moons, and a noisy ring; nothing is downloaded), and three densities:
#
# * a Gaussian mixture fit by EM (`ClassifierWeightedMixture.from_samples`, whose classifier
#   starts constant, so it *is* that Gaussian mixture) — the baseline a CWM must beat;
# * a classifier-weighted mixture (CWM): the same components, with a classifier that picks the
#   component per point, trained by maximum likelihood (`.fit`);
#
# compared on the average log-likelihood of held-out samples (higher is better).
#
# `MIXVI_TUTORIAL_QUICK=1` shrinks the budgets; `MIXVI_TUTORIAL_OUTPUT=folder` saves the figures.

# %%
import os
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook kernel

import matplotlib.pyplot as plt
import pandas as pd
import torch
from sklearn.datasets import make_circles, make_moons

from pyro_mixvi import ClassifierWeightedMixture

QUICK = os.environ.get("MIXVI_TUTORIAL_QUICK", "0") == "1"
OUTPUT = os.environ.get("MIXVI_TUTORIAL_OUTPUT")
NUM_TRAIN = 2000 if QUICK else 10000
NUM_STEPS = 300 if QUICK else 3000
NUM_COMPONENTS = 6


def save(fig, name):
    """Save a figure when MIXVI_TUTORIAL_OUTPUT names a folder."""
    if OUTPUT:
        os.makedirs(OUTPUT, exist_ok=True)
        fig.savefig(os.path.join(OUTPUT, name), dpi=110, bbox_inches="tight")


# %% [markdown]
# ## Data
#
# Standardized, with a held-out half the fits never see.


# %%
def standardized(points):
    points = (points - points.mean(0)) / points.std(0)
    return torch.as_tensor(points, dtype=torch.float32)


datasets = {
    "moons": standardized(make_moons(2 * NUM_TRAIN, noise=0.08, random_state=0)[0]),
    "ring": standardized(make_circles(2 * NUM_TRAIN, noise=0.05, factor=0.5, random_state=0)[0]),
}
splits = {name: (x[:NUM_TRAIN], x[NUM_TRAIN:]) for name, x in datasets.items()}

# %% [markdown]
# ## Fit
#
# `from_samples` runs EM for the Gaussian mixture; `fit` then trains every parameter, the
# classifier included, by Adam on minibatches. Both take a `torch.Generator` for their
# randomness.

# %%
fits, rows = {}, []
for name, (train, test) in splits.items():
    generator = torch.Generator().manual_seed(0)
    gmm = ClassifierWeightedMixture.from_samples(train, NUM_COMPONENTS, generator=generator)
    cwm, losses = gmm.fit(train, num_steps=NUM_STEPS, progress_bar=False, generator=generator)
    fits[name] = {"Gaussian mixture (EM)": gmm, "CWM": cwm}
    with torch.no_grad():
        for label, density in fits[name].items():
            rows.append(
                {
                    "data": name,
                    "density": label,
                    "held-out mean log-likelihood": float(density.log_prob(test).mean()),
                }
            )
table = pd.DataFrame(rows).pivot(
    index="density", columns="data", values="held-out mean log-likelihood"
)
print(table.round(3).to_string())

# %% [markdown]
# ## The densities
#
# `exp(log_prob)` on a grid (columns: the data, then each fitted density), and samples drawn from
# the CWM (`sample`) over the data.

# %%
grid = torch.linspace(-2.6, 2.6, 160)
xx, yy = torch.meshgrid(grid, grid, indexing="xy")
points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)
fig, axes = plt.subplots(len(splits), 4, figsize=(13, 3.2 * len(splits)))
for row, (name, (train, _)) in zip(axes, splits.items(), strict=True):
    row[0].scatter(train[:, 0], train[:, 1], s=1, c="k", alpha=0.3)
    row[0].set_title(f"{name}: training samples")
    with torch.no_grad():
        for ax, (label, density) in zip(row[1:3], fits[name].items(), strict=True):
            values = density.log_prob(points).exp().reshape(xx.shape)
            ax.pcolormesh(xx, yy, values, cmap="viridis", shading="auto")
            ax.set_title(label)
        drawn = fits[name]["CWM"].sample((train.shape[0],))
    row[3].scatter(train[:, 0], train[:, 1], s=1, c="0.7")
    row[3].scatter(drawn[:, 0], drawn[:, 1], s=1, c="C1", alpha=0.4)
    row[3].set_title("CWM samples (orange) over data")
    for ax in row:
        ax.set_xlim(-2.6, 2.6)
        ax.set_ylim(-2.6, 2.6)
        ax.set_aspect("equal")
fig.tight_layout()
save(fig, "densities.png")
