"""The base of mixvi's mixtures over R^D whose draws pick a discrete component index."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution

__all__ = ["IndexMixture"]


class IndexMixture(TorchDistribution):
    """A Pyro distribution that refuses stock ELBOs and expands through Pyro's wrapper.

    Drawing from a finite mixture picks a discrete component index. Pyro's ``Trace_ELBO`` (and
    its relatives) would either differentiate only through the chosen component's draw (missing
    the weights' gradient) or, with a score function, leave the guide's auxiliary latent out of
    the log-ratio: both bias the gradient silently. :meth:`score_parts` therefore raises and
    points to ``RBMixture_ELBO``, which sums the index out (the finite-mixture protocol of
    :mod:`pyro_mixvi.guides.base`). Subclasses implement ``log_prob`` and
    ``rsample_components``.
    """

    def score_parts(self, value: torch.Tensor):  # noqa: ANN201
        """Refused: a stock ELBO would silently bias or ignore the mixture index.

        Raises:
            NotImplementedError: Always, pointing to ``RBMixture_ELBO``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} draws a discrete component index, so stock ELBOs "
            "(Trace_ELBO, TraceGraph_ELBO, ...) cannot differentiate through it without bias; "
            "use pyro_mixvi.RBMixture_ELBO, which sums the index out"
            " (AutoFlowMixture.fit runs it as its stage 3)"
        )

    def expand(self, batch_shape, _instance=None):  # noqa: ANN001, ANN201
        """Batch expansion goes through Pyro's ``ExpandedDistribution`` (for particle plates)."""
        return TorchDistribution.expand(self, batch_shape)
