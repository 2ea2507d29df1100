# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Multimodal VAE with joint normalizing flows (Pyro)
#
# Two modalities that share only a class: two different 8×8 handwritten digits of the same class,
# the second one rotated and inverted (scikit-learn's digits, shipped with it; nothing is
# downloaded). A multimodal VAE learns one latent `z` for both; given one modality it should
# generate the other *of the same class*. That is **coherence**: the fraction of generated images
# that a classifier trained on real images of that modality assigns to the conditioning class.
#
# `JNF` trains in two stages: (1) a joint VAE (one Gaussian encoder of both modalities, one decoder
# per modality, β-ELBO); (2) the joint VAE frozen, one conditional flow `q_j(z | x_j)` per modality,
# fit by forward KL to the joint encoder. Conditioning on a subset `S` of modalities uses the
# product of experts `Π_j q_j(z|x_j) / p(z)^{|S|-1}`; a single modality samples its flow directly.
# The baseline is `PoEVAE` (MVAE-style Gaussian product of experts, trained end to end).
#
# `MIXVI_TUTORIAL_QUICK=1` shrinks the budgets; `MIXVI_TUTORIAL_OUTPUT=folder` saves the figures.

# %%
import os
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook kernel

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression

from mixvi.multimodal_data import make_paired_digits
from pyro_mixvi.multimodal.baselines import PoEVAE
from pyro_mixvi.multimodal.jnf import JNF

QUICK = os.environ.get("MIXVI_TUTORIAL_QUICK", "0") == "1"
OUTPUT = os.environ.get("MIXVI_TUTORIAL_OUTPUT")
NUM_STEPS = 300 if QUICK else 4000  # per stage
NUM_TEST = 100 if QUICK else 500


def save(fig, name):
    """Save a figure when MIXVI_TUTORIAL_OUTPUT names a folder."""
    if OUTPUT:
        os.makedirs(OUTPUT, exist_ok=True)
        fig.savefig(os.path.join(OUTPUT, name), dpi=110, bbox_inches="tight")


# %% [markdown]
# ## Data

# %%
train = make_paired_digits(split="train", num_pairs=600 if QUICK else 3000, seed=0)
test = make_paired_digits(split="test", num_pairs=NUM_TEST, seed=0)
x_train = [torch.as_tensor(m, dtype=torch.float32) for m in train.modalities]
x_test = [torch.as_tensor(m, dtype=torch.float32) for m in test.modalities]
print([tuple(x.shape) for x in x_train], "classes:", np.bincount(train.labels))

fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
for k in range(8):
    for j in range(2):
        axes[j, k].imshow(train.modalities[j][k].reshape(8, 8), cmap="gray_r")
        axes[j, k].set_axis_off()
    axes[0, k].set_title(str(train.labels[k]), fontsize=9)
fig.suptitle("pairs: modality 0 (top), modality 1 (bottom)", fontsize=10)
save(fig, "pairs.png")

# %% [markdown]
# ## Classifiers that judge coherence
#
# One logistic regression per modality, trained on real training images; their accuracy on real
# test images is the ceiling for coherence.

# %%
classifiers = [
    LogisticRegression(max_iter=2000).fit(train.modalities[j], train.labels) for j in range(2)
]
ceiling = [classifiers[j].score(test.modalities[j], test.labels) for j in range(2)]
print("classifier accuracy on real test images:", np.round(ceiling, 3))

# %% [markdown]
# ## Train JNF (both stages) and the PoE baseline
#
# Same latent size, networks, pixel likelihood (the default: normal with a fixed scale) and number
# of steps per stage.

# %%
torch.manual_seed(0)
models = {
    "JNF": JNF([64, 64], latent_dim=8, hidden_dims=(128, 128)),
    "PoEVAE": PoEVAE([64, 64], latent_dim=8, hidden_dims=(128, 128)),
}
seconds = {}
for name, model in models.items():
    start = time.perf_counter()
    model.fit(x_train, num_steps=NUM_STEPS, generator=torch.Generator().manual_seed(1))
    seconds[name] = time.perf_counter() - start
    print(f"{name}: trained in {seconds[name]:.1f} s")

# %% [markdown]
# ## Cross-modal generation and coherence
#
# Condition on one modality of each test pair, decode the other, and classify it. `generate`
# returns decoder means for every modality, shape `(num_samples, N, 64)`.


# %%
def coherence(model, given, target, num_samples=1):
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        generated = model.generate(
            {given: x_test[given]}, num_samples=num_samples, generator=generator
        )[target]
    images = generated.reshape(-1, 64).numpy()
    labels = np.tile(test.labels, num_samples)
    return float(np.mean(classifiers[target].predict(images) == labels)), generated[0].numpy()


rows, examples = [], {}
for name, model in models.items():
    row = {"model": name, "train seconds": seconds[name]}
    for given, target in [(0, 1), (1, 0)]:
        row[f"coherence {given}→{target}"], examples[name, given] = coherence(model, given, target)
    rows.append(row)
table = pd.DataFrame(rows).set_index("model").round(3)
print(table.to_string())

# %% [markdown]
# Generated modality 1 given modality 0, for the first test pairs (top: the conditioning image;
# then one row per model).

# %%
fig, axes = plt.subplots(1 + len(models), 10, figsize=(10, 1.2 * (1 + len(models))))
for k in range(10):
    axes[0, k].imshow(test.modalities[0][k].reshape(8, 8), cmap="gray_r")
    axes[0, k].set_title(str(test.labels[k]), fontsize=9)
    for r, name in enumerate(models, start=1):
        axes[r, k].imshow(examples[name, 0][k].reshape(8, 8), cmap="gray_r")
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set_ylabel("given", fontsize=8)
for r, name in enumerate(models, start=1):
    axes[r, 0].set_ylabel(name, fontsize=8)
fig.tight_layout()
save(fig, "cross_modal.png")
