"""AutoSIVI: semi-implicit guide over the model's flat unconstrained latent (NumPyro)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpyro
from numpyro import handlers
from numpyro.distributions import biject_to
from numpyro.infer.autoguide import AutoContinuous
from numpyro.infer.initialization import init_to_median

from mixvi._checks import check_positive_int

from .._sivi import SemiImplicitNormal, StandardizedProposal, generator_init
from ..flows import MAF, RealNVP
from ..flows._flowjax import zero_last_layers

__all__ = ["AutoSIVI"]

PROPOSALS = ("flow", "prior")


# Soft bound on each proposal layer's |log-scale| (zuko's default slope 1e-3, as the Pyro twin).
PROPOSAL_MAX_LOG_SCALE = math.log(1e3)


def _make_flow_proposal(rng_key, mixing_dim, latent_dim, num_transforms, hidden_dims):
    """Conditional flow ``tau(eps | z)``: RealNVP (``m >= 2``) or, for ``m = 1``, an affine MAF.

    ``numpyro_mixvi``'s ``RealNVP`` / ``MAF`` with the coupling scale of the Pyro backend's zuko
    flows, ``exp(r / (1 + |r| / log 1e3))``, bounded in ``[1e-3, 1e3]`` per layer. flowjax's
    default ``softplus`` scale is unbounded above and reaches 0 exponentially: on centered eight
    schools at Adam lr 3e-2 the proposal then put near-zero density at some contexts, the
    importance weights of the draw's own ``eps`` jumped by ``e^17`` and SVI diverged after ~900
    steps, while the Pyro backend (bounded scale) and the prior proposal stayed finite.
    The last layer of every conditioner MLP is zero, so the flow starts as the prior
    ``N(0, I_m)`` (flowjax builds each transformer at ``initial + conditioner output``).
    """
    factory = RealNVP if mixing_dim >= 2 else MAF
    flow = factory(rng_key, int(mixing_dim), context_dim=int(latent_dim),
                   num_transforms=num_transforms, hidden_dims=hidden_dims,
                   max_log_scale=PROPOSAL_MAX_LOG_SCALE)
    return zero_last_layers(flow)


class AutoSIVI(AutoContinuous):
    r"""Semi-implicit guide over the model's flat unconstrained latent ``x`` (AISIVI / BSIVI).

    .. math::
        q(x) = \int \mathcal{N}\big(x; \mu_\phi(\epsilon),
        \mathrm{diag}\,\sigma_\phi(\epsilon)^2\big) \,\mathcal{N}(\epsilon; 0, I_m)\, d\epsilon

    Draws are exact. ``log_prob`` of the latent site is the importance-sampled
    :math:`\log \hat q(x)` from ``num_importance_samples`` draws of the proposal
    :math:`\tau(\epsilon \mid x)`: a conditional RealNVP (flowjax, ``proposal="flow"``, AISIVI)
    or the prior (``proposal="prior"``, BSIVI). It is biased low by ``O(1/k)``, so ELBO
    estimates are biased high and ``log_evidence`` / PSIS inherit that bias. Its gradient is
    the SIVI path gradient (detached importance-sampled score), so ``Trace_ELBO`` trains the
    guide correctly and the flow proposal by forward KL in the same step; :class:`SIVI_ELBO`
    adds per-step ``k`` and proposal choice. The whole step jits.

    Shapes:
        ``D`` is the unconstrained latent size, fixed at the first call; ``m = mixing_dim``.
        ``get_posterior(params, rng_key=...).log_prob(x)`` maps ``(..., D)`` to ``(...)``.

    Args:
        model: A NumPyro model whose latent sites are continuous.
        prefix: Prefix of the parameter names (``{prefix}_loc``, ``{prefix}_raw_scale``,
            ``{prefix}_net``, ``{prefix}_proposal``).
        mixing_dim: Size ``m`` of the mixing noise; default ``D``.
        hidden_dims: Hidden widths of the ReLU network ``mu_phi``; ``()`` makes it affine.
        conditional_scale: Whether ``sigma`` depends on ``eps`` (default: global diagonal).
        init_mixing_fraction: Share of the initial variance ``init_scale^2`` carried by the
            spread of ``mu(eps)`` (random last layer), the rest by ``sigma^2``; in ``[0, 1)``.
            0.5 (default) starts the network off the Gaussian saddle of fraction 0
            (``N(loc, init_scale^2 I)``, which it leaves only by noise: banana ELBO -0.68
            after 800 steps, a Gaussian's). With the hidden layers' ``1 / sqrt(fan_in)`` step
            scaling it stays stable on funnels at Adam lr 1e-2 to 3e-2 (centered eight schools).
        proposal: ``"flow"`` (AISIVI) or ``"prior"`` (BSIVI).
        num_proposal_transforms: Layers of the conditional RealNVP proposal (``mixvi`` ``flows``;
            an affine MAF when ``m = 1``).
        proposal_hidden_dims: Coupling-network widths (flowjax MLPs: one repeated width).
        num_importance_samples: ``k`` used by ``log_prob`` (and the ELBO unless overridden).
        proposal_batch_size: Fresh pairs ``eps ~ N(0, I_m)``, ``z ~ q(z | eps)`` (guide
            detached) on which the flow proposal takes its forward-KL step, per SVI step (split
            over the particles by :class:`SIVI_ELBO`; per draw under a plain ``Trace_ELBO``).
            With only the particles' own pairs the proposal barely learns and AISIVI trains
            like BSIVI. Cost: one proposal pass per pair, no graph to the guide.
        chunk_size: Importance draws held in memory at once (default 128; ``None`` = all ``k``):
            peak memory is flat in ``k`` beyond it.
        init_loc_fn: Per-site initialization, as in ``AutoContinuous``.
        init_scale: Initial ``sigma``; positive.

    Example:
        >>> guide = AutoSIVI(model, mixing_dim=4)
        >>> svi = SVI(model, guide, optim.Adam(1e-2), SIVI_ELBO(num_importance_samples=64))
        >>> result = svi.run(random.key(0), 2000, data)
        >>> draws = guide.sample_posterior(random.key(1), result.params, sample_shape=(1000,))

    Cost:
        Sampling: one network pass. ``log_prob``: ``k`` network and proposal passes per point,
        no tangents, memory ``O(chunk_size * D)`` per point.

    Raises:
        ValueError: If ``mixing_dim``, ``num_importance_samples``, ``num_proposal_transforms``,
            ``proposal_batch_size`` or ``chunk_size`` is < 1, ``init_scale <= 0``,
            ``init_mixing_fraction`` is outside ``[0, 1)`` or ``proposal`` is unknown; a
            discrete latent site (the host's message names it).

    References:
        Revisiting Unbiased Implicit Variational Inference (Pielok, Bischl, Rügamer, 2025).
        https://arxiv.org/abs/2506.03839
    """

    def __init__(
        self,
        model,
        *,
        prefix: str = "auto",
        mixing_dim: int | None = None,
        hidden_dims: Sequence[int] = (128, 128),
        conditional_scale: bool = False,
        init_mixing_fraction: float = 0.5,
        proposal: Literal["flow", "prior"] = "flow",
        num_proposal_transforms: int = 4,
        proposal_hidden_dims: Sequence[int] = (64, 64),
        num_importance_samples: int = 64,
        proposal_batch_size: int = 128,
        chunk_size: int | None = 128,
        init_loc_fn=init_to_median,
        init_scale: float = 0.1,
    ) -> None:
        if mixing_dim is not None:
            check_positive_int("mixing_dim", mixing_dim)
        check_positive_int("num_importance_samples", num_importance_samples)
        check_positive_int("num_proposal_transforms", num_proposal_transforms)
        check_positive_int("proposal_batch_size", proposal_batch_size)
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        if proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}; got {proposal!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0; got {init_scale}")
        if not 0 <= init_mixing_fraction < 1:
            raise ValueError(f"init_mixing_fraction must be in [0, 1); got {init_mixing_fraction}")
        self.mixing_dim = mixing_dim
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.conditional_scale = conditional_scale
        self.init_mixing_fraction = init_mixing_fraction
        self.proposal = proposal
        self.num_proposal_transforms = num_proposal_transforms
        self.proposal_hidden_dims = tuple(int(h) for h in proposal_hidden_dims)
        self.num_importance_samples = num_importance_samples
        self.proposal_batch_size = proposal_batch_size
        self.chunk_size = chunk_size
        self._init_scale = init_scale
        self._score_override: dict = {}
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        if self.mixing_dim is None:
            self.mixing_dim = self.latent_dim
        net_key, flow_key = jax.random.split(numpyro.prng_key())
        self._generator_init = generator_init(
            net_key,
            self.mixing_dim,
            self._init_latent,
            self.hidden_dims,
            init_scale=self._init_scale,
            conditional_scale=self.conditional_scale,
            init_mixing_fraction=self.init_mixing_fraction,
        )
        self._proposal_init = None
        if self.proposal == "flow":
            self._proposal_init = _make_flow_proposal(
                flow_key,
                self.mixing_dim,
                self.latent_dim,
                self.num_proposal_transforms,
                self.proposal_hidden_dims,
            )

    @contextlib.contextmanager
    def score_options(
        self,
        *,
        num_importance_samples: int | None = None,
        proposal: str | None = None,
        num_particles: int | None = None,
    ) -> Iterator[None]:
        """Temporarily override ``k`` and the proposal used by the posterior (see Pyro's).

        ``num_particles`` (set by :class:`SIVI_ELBO`) splits the ``proposal_batch_size``
        fresh proposal-training pairs of a step over the particles.
        """
        if proposal is not None and proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}; got {proposal!r}")
        if proposal == "flow" and self.proposal != "flow":
            raise ValueError(
                "proposal='flow' needs a guide built with AutoSIVI(..., proposal='flow'); "
                "this guide has no flow proposal"
            )
        if num_importance_samples is not None:
            check_positive_int("num_importance_samples", num_importance_samples)
        if num_particles is not None:
            check_positive_int("num_particles", num_particles)
        previous = self._score_override
        self._score_override = {
            "num_importance_samples": num_importance_samples,
            "proposal": proposal,
            "num_particles": num_particles,
        }
        try:
            yield
        finally:
            self._score_override = previous

    def _pairs_per_draw(self) -> int:
        """Fresh proposal-training pairs per guide draw: ``proposal_batch_size`` per step."""
        num_particles = self._score_override.get("num_particles") or 1
        return -(-self.proposal_batch_size // num_particles)

    def _get_posterior(self, rng_key=None) -> SemiImplicitNormal:
        from flowjax.experimental.numpyro import register_params

        params = {
            "loc": numpyro.param(f"{self.prefix}_loc", self._generator_init["loc"]),
            "raw_scale": numpyro.param(
                f"{self.prefix}_raw_scale", self._generator_init["raw_scale"]
            ),
            "net": numpyro.param(f"{self.prefix}_net", self._generator_init["net"]),
        }
        k = self._score_override.get("num_importance_samples") or self.num_importance_samples
        proposal = self._score_override.get("proposal") or self.proposal
        flow = None
        if proposal == "flow":
            flow = StandardizedProposal(
                register_params(f"{self.prefix}_proposal", self._proposal_init),
                params["loc"],
                jax.nn.softplus(params["raw_scale"]),
            )
        return SemiImplicitNormal(
            params,
            flow,
            mixing_dim=self.mixing_dim,
            num_importance_samples=k,
            chunk_size=self.chunk_size,
            proposal_batch_size=self._pairs_per_draw() if proposal == "flow" else 0,
            rng_key=rng_key,
        )

    def get_posterior(self, params: dict, *, rng_key: jax.Array | None = None):
        """The semi-implicit distribution over the flat unconstrained latent, at ``params``.

        ``rng_key`` feeds the importance draws of ``log_prob`` on given points.
        """
        return handlers.substitute(self._get_posterior, params)(rng_key)

    def quantiles(
        self, params: dict, quantiles, *, rng_key: jax.Array | None = None, num_samples: int = 4000
    ) -> dict:
        """Per-coordinate Monte Carlo quantiles of the unconstrained latent, mapped per site.

        No closed form exists; the error of a quantile is about ``sqrt(q(1-q)/num_samples)``
        over the density. ``rng_key`` defaults to ``jax.random.key(0)`` (a fixed, documented
        key: the call is deterministic; the global state is untouched).
        """
        rng_key = jax.random.key(0) if rng_key is None else rng_key
        draws = self.get_posterior(params).sample(rng_key, (num_samples,))
        latents = jnp.quantile(draws, jnp.asarray(quantiles, draws.dtype), axis=0)
        unpacked = jax.vmap(self._unpack_latent)(latents)
        return {
            name: biject_to(self.prototype_trace[name]["fn"].support)(value)
            for name, value in unpacked.items()
        }

    def median(
        self, params: dict, *, rng_key: jax.Array | None = None, num_samples: int = 4000
    ) -> dict:
        """Per-coordinate Monte Carlo median (see :meth:`quantiles`)."""
        values = self.quantiles(params, [0.5], rng_key=rng_key, num_samples=num_samples)
        return {name: value[0] for name, value in values.items()}
