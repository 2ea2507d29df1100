"""Exact oracles for the JNF tests (numpy only, shared by both backends).

A linear-Gaussian multimodal model ``z ~ N(0, I_D)``, ``x_j = A_j z + s_j ε_j`` has Gaussian
posteriors for every subset ``S``: precision ``I + Σ_{j∈S} A_jᵀA_j / s_j²`` and mean
``cov Σ_{j∈S} A_jᵀ x_j / s_j²``; they satisfy ``p(z|X_S) ∝ Π_{j∈S} p(z|x_j) / p(z)^{|S|-1}``.
With ``diagonal=True`` each ``A_j = Q_j diag(a_j)`` has orthonormal ``Q_j``, so every posterior
covariance is diagonal and a diagonal Gaussian joint encoder can be exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LinearGaussian:
    """``x_j = A_j z + s_j ε_j`` with ``z ~ N(0, I)``."""

    loadings: list[np.ndarray]  # A_j, (d_j, D)
    noise: list[float]  # s_j

    @classmethod
    def make(cls, rng, latent_dim, dims, *, diagonal=True, noise=0.5):
        loadings = []
        for d in dims:
            if diagonal:
                q, _ = np.linalg.qr(rng.normal(size=(d, latent_dim)))
                loadings.append(q * rng.uniform(0.6, 1.6, size=latent_dim))
            else:
                loadings.append(rng.normal(size=(d, latent_dim)))
        return cls(loadings, [noise] * len(dims))

    @property
    def latent_dim(self) -> int:
        return self.loadings[0].shape[1]

    def sample(self, rng, num):
        z = rng.normal(size=(num, self.latent_dim))
        xs = [
            z @ a.T + s * rng.normal(size=(num, a.shape[0]))
            for a, s in zip(self.loadings, self.noise, strict=True)
        ]
        return z, xs

    def posterior(self, subset, xs):
        """Mean ``(N, D)`` and covariance ``(D, D)`` of ``p(z | x_j, j ∈ subset)``."""
        precision = np.eye(self.latent_dim)
        shift = 0.0
        for j in subset:
            a, s = self.loadings[j], self.noise[j]
            precision = precision + a.T @ a / s**2
            shift = shift + xs[j] @ a / s**2
        cov = np.linalg.inv(precision)
        return shift @ cov, cov


def gaussian_log_prob(z, mean, cov):
    """``log N(z; mean, cov)`` for ``z (..., D)``, ``mean`` broadcastable, ``cov (D, D)``."""
    diff = z - mean
    prec = np.linalg.inv(cov)
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (
        np.einsum("...i,ij,...j->...", diff, prec, diff) + logdet + len(cov) * np.log(2 * np.pi)
    )


def two_gaussian_expert_log_prob(z):
    """An awkward 2-D expert: a two-component Gaussian mixture (for sampler checks)."""
    a = gaussian_log_prob(z, np.array([-1.0, 0.5]), np.array([[0.4, 0.15], [0.15, 0.3]]))
    b = gaussian_log_prob(z, np.array([1.2, -0.3]), np.array([[0.3, -0.1], [-0.1, 0.5]]))
    return np.logaddexp(a + np.log(0.4), b + np.log(0.6))
