r"""AutoFlowMixture: a heterogeneous mixture of flow experts (AMF-VI) over the packed latent.

.. math:: q(x) = \sum_k \pi_k\, q_k(x), \qquad
          q_k = \text{law of } x = \text{init\_loc} + \text{init\_scale} \odot f_k(y),\
          y \sim \mathcal{N}(0, I)

with ``f_k`` a MAF or RealNVP (trainable, flowjax) or an RBIG fit from importance-resampled
draws. :meth:`AutoFlowMixture.fit` runs the paper's procedure from a model's unnormalized
posterior (stage 1: each parametric expert by its own ELBO; RBIG from resampled draws; stage 2:
EMA weights from self-normalized importance-weighted log-likelihoods; optional stage 3: joint
fine-tuning by ``RBMixture_ELBO``). Every stage's step is jitted.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import optax
from flowjax.bijections import Affine
from flowjax.distributions import Transformed
from jax import Array
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer import SVI
from numpyro.infer.autoguide import AutoContinuous
from numpyro.infer.initialization import init_to_median
from tqdm.auto import tqdm

from numpyro_mixvi.distributions.flow_mixture import (
    EXPERTS,
    FlowMixture,
    ema_weights_init,
    ema_weights_step,
    partition_trainable,
    train_expert,
)

# Stage 3 is the floor-4 ELBO by design (AFM_API.md). No cycle: elbos.rb_mixture imports only
# guides.base, and the package __init__ files import nothing.
from numpyro_mixvi.elbos.rb_mixture import RBMixture_ELBO
from numpyro_mixvi.flows import MAF, RBIG, RealNVP, rbig_init, rbig_step
from numpyro_mixvi.flows._flowjax import typed_key, zero_last_layers
from numpyro_mixvi.flows.rbig import marginal_gaussianize
from numpyro_mixvi.guides.base import (
    SampleSummariesOnly,
    latent_site_name,
    unconstrained_log_joint,
)

__all__ = ["AutoFlowMixture", "FitResult"]

_FACTORIES = {"maf": MAF, "realnvp": RealNVP}
_LOG_P_CHUNK = 1024
#: Default ``max_log_scale`` of the parametric experts' layers (soft bound on ``|log-scale|``;
#: the Pyro twin's measurement on centered eight schools).
EXPERT_MAX_LOG_SCALE = 2.0
_RBIG_OPTIONS = ("max_layers", "tol", "patience", "rotation", "num_knots", "bandwidth_factor")


class FitResult(NamedTuple):
    """What :meth:`AutoFlowMixture.fit` reports besides the parameters.

    Attributes:
        expert_losses: One array per entry of ``experts`` (same order): the stage-1 losses
            (minus the expert's own ELBO) per step; empty for ``"rbig"``. An expert whose loss
            turned non-finite has a shorter array ending with that loss.
        weights: Final mixture weights ``pi`` ``(K,)``.
        n_eff: ``1 / sum_k pi_k^2`` after stage 2 (and stage 3 if run).
        joint_losses: Stage-3 losses (minus the RB mixture ELBO) per step; empty if
            ``num_joint_steps == 0``.
    """

    expert_losses: tuple[Array, ...]
    weights: Array
    n_eff: Array
    joint_losses: Array


class AutoFlowMixture(SampleSummariesOnly, AutoContinuous):
    r"""Mixture of heterogeneous flow experts with global weights (AMF-VI) as a NumPyro autoguide.

    ``get_posterior(params)`` returns a :class:`~numpyro_mixvi.FlowMixture` over the packed
    unconstrained latent ``x`` in ``R^D``, a finite mixture in the sense of
    :mod:`numpyro_mixvi.guides.base`. Each parametric expert (``"maf"``, ``"realnvp"``) is a
    flowjax flow (identity at initialization: zero output layers) followed by a trainable
    affine map, so every expert starts as exactly ``N(init_loc, init_scale^2 I)``; :meth:`fit`
    moves expert ``k`` to ``init_loc + offset_k`` before training it alone (offsets random,
    centered, of RMS norm ``init_spread``), so that experts trained by reverse KL can settle in
    different modes.
    ``"rbig"`` has no trainable parameter: :meth:`fit` fits it to importance-resampled draws
    and stores it on the guide. **Until** :meth:`fit` **has run, the posterior is the mixture of
    the parametric experts only** (uniform weights at initialization).

    Train with :meth:`fit` (the paper's stages), or with your own SVI loop and
    :class:`~numpyro_mixvi.RBMixture_ELBO` (that is stage 3: experts and ``pi`` jointly). Stock
    ELBOs raise ``NotImplementedError`` pointing there: ``Trace_ELBO`` would differentiate
    through the ancestral expert index and silently miss its contribution.

    Shapes:
        ``D`` is the unconstrained latent size, fixed at the first call.
        ``get_posterior(params).log_prob(x)`` maps ``(..., D)`` to ``(...)``.

    Args:
        model: A NumPyro model whose latent sites are continuous.
        prefix: Prefix of the guide's parameter names.
        experts: Names in ``("maf", "realnvp", "rbig")``, at least one parametric; repeats
            allowed. Parameters are ``{prefix}_expert{k}_{name}`` (a list of arrays) and
            ``{prefix}_weights`` (on the simplex).
        expert_kwargs: Per-name keyword arguments, e.g. ``{"maf": {"num_transforms": 3,
            "hidden_dims": (32, 32)}, "rbig": {"max_layers": 20}}``: ``MAF``/``RealNVP``
            keywords (``max_log_scale`` defaults to :data:`EXPERT_MAX_LOG_SCALE` here), and
            for ``"rbig"`` any of ``max_layers``, ``tol``, ``patience``,
            ``rotation``, ``num_knots``, ``bandwidth_factor``. Names not in ``experts`` are
            ignored.
        init_loc_fn: Per-site initialization, as in ``AutoMultivariateNormal``.
        init_scale: Initial scale of every parametric expert; positive.
        init_spread: Root-mean-square distance from the init location at which :meth:`fit`
            starts each parametric expert's stage-1 training (random, centered offsets); ``>= 0``,
            0 starts them all at the init location. In unconstrained units. An ordinary SVI
            loop does not use it.

    Example:
        >>> guide = AutoFlowMixture(model)                # was: AutoNormal(model)
        >>> params, result = guide.fit(random.key(0), data, num_steps=2000)
        >>> result.weights, result.n_eff
        >>> draws = guide.sample_posterior(random.key(1), params, sample_shape=(1000,))

    Cost:
        ``log_prob`` evaluates every expert; ancestral sampling draws every expert (MAF's and
        RBIG's sampling are the slow directions). ``RBMixture_ELBO`` evaluates the model at
        ``num_particles * K`` points per step.

    Raises:
        ValueError: If ``experts`` is empty, names an unknown expert or no parametric one,
            ``expert_kwargs["rbig"]`` has an unknown key, ``init_scale <= 0`` or
            ``init_spread < 0``; at the first
            call, if the model has a discrete latent site (the host's message names it) or
            ``"realnvp"`` meets a 1-D latent.

    References:
        AMF-VI: adaptive heterogeneous mixtures of normalizing flows (2025),
        https://github.com/benjaminsw/AMF-VIJ
    """

    def __init__(
        self,
        model: Callable,
        *,
        prefix: str = "auto",
        experts: Sequence[str] = EXPERTS,
        expert_kwargs: dict[str, dict] | None = None,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        init_spread: float = 1.0,
    ) -> None:
        experts = (experts,) if isinstance(experts, str) else tuple(experts)
        if not experts:
            raise ValueError(f"experts must name at least one of {EXPERTS}; got ()")
        unknown = [name for name in experts if name not in EXPERTS]
        if unknown:
            raise ValueError(f"experts entries must be one of {EXPERTS}; got {unknown}")
        if all(name == "rbig" for name in experts):
            raise ValueError("experts needs at least one parametric expert ('maf' or 'realnvp'): "
                             "RBIG is fit to importance-resampled draws from them")
        expert_kwargs = {name: dict(options) for name, options in (expert_kwargs or {}).items()}
        stray = sorted(set(expert_kwargs.get("rbig", {})) - set(_RBIG_OPTIONS))
        if stray:
            raise ValueError(f"expert_kwargs['rbig'] accepts {_RBIG_OPTIONS}; got {stray}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0; got {init_scale}")
        if not init_spread >= 0:
            raise ValueError(f"init_spread must be >= 0; got {init_spread}")
        self.experts = experts
        self.expert_kwargs = expert_kwargs
        self._init_scale = float(init_scale)
        self._init_spread = float(init_spread)
        self._rbig: dict[int, RBIG] = {}
        self._dropped: set[int] = set()
        self._skeletons: dict[int, tuple] = {}
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_skeletons"] = {}  # holds flowjax closures; rebuilt on demand
        return state

    def _setup_prototype(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._setup_prototype(*args, **kwargs)
        if self.latent_dim < 2 and "realnvp" in self.experts:
            raise ValueError(
                f"expert 'realnvp' needs an unconstrained latent of dimension >= 2 (a coupling "
                f"splits it in two); this model's has {self.latent_dim}: use 'maf' instead"
            )

    def _param_name(self, k: int) -> str:
        return f"{self.prefix}_expert{k}_{self.experts[k]}"

    def _build_expert(self, k: int, rng_key: Array) -> Transformed:
        """Expert ``k``: flow ``f_k`` over ``R^D`` then ``x = init_loc + init_scale * f_k(y)``."""
        name = self.experts[k]
        options = {"max_log_scale": EXPERT_MAX_LOG_SCALE, **self.expert_kwargs.get(name, {})}
        flow = zero_last_layers(_FACTORIES[name](typed_key(rng_key), self.latent_dim,
                                                  **options))
        loc = self._init_latent
        return Transformed(flow, Affine(loc, jnp.full_like(loc, self._init_scale)))

    def _skeleton(self, k: int) -> tuple:
        """``(treedef, static)`` of expert ``k``'s trainable partition (network-key independent)."""
        if k not in self._skeletons:
            params, static = partition_trainable(self._build_expert(k, jax.random.PRNGKey(0)))
            self._skeletons[k] = (jax.tree.structure(params), static)
        return self._skeletons[k]

    def _expert_from_leaves(self, k: int, leaves: list) -> Transformed:
        treedef, static = self._skeleton(k)
        return eqx.combine(jax.tree.unflatten(treedef, leaves), static)

    def _init_leaves(self, k: int, rng_key: Array) -> list:
        return jax.tree.leaves(partition_trainable(self._build_expert(k, rng_key))[0])

    def _active(self) -> list[int]:
        """Indices of the experts in the mixture: parametric ones and RBIG once fit, minus any
        that :meth:`fit` switched off (weight 0 after stage 2)."""
        return [k for k, name in enumerate(self.experts)
                if (name != "rbig" or k in self._rbig) and k not in self._dropped]

    def _get_posterior(self) -> FlowMixture:
        experts = []
        for k in self._active():
            if self.experts[k] == "rbig":
                experts.append(self._rbig[k])
            else:
                leaves = numpyro.param(self._param_name(k),
                                       lambda key, k=k: self._init_leaves(k, key))
                experts.append(self._expert_from_leaves(k, leaves))
        num = len(experts)
        weights = numpyro.param(
            f"{self.prefix}_weights",
            jnp.full((num,), 1.0 / num, jnp.result_type(self._init_latent)),
            constraint=constraints.simplex,
        )
        return FlowMixture(experts, weights)

    def get_posterior(self, params: dict) -> FlowMixture:
        """The flow mixture over the packed unconstrained latent at ``params``."""
        return handlers.substitute(self._get_posterior, data=params)()

    def fit(
        self,
        rng_key: Array,
        *args,  # noqa: ANN002
        num_steps: int = 1000,
        lr: float = 1e-2,
        num_particles: int = 8,
        num_rbig_draws: int = 4096,
        num_weight_steps: int = 50,
        weight_batch_size: int = 512,
        beta: float = 0.9,
        weight_update: Literal["elbo", "ema", "responsibility"] = "elbo",
        num_joint_steps: int = 0,
        progress_bar: bool = True,
        **kwargs,  # noqa: ANN003
    ) -> tuple[dict, FitResult]:
        r"""The paper's stages from the model's unnormalized posterior: ``(params, result)``.

        1. Each parametric expert alone, from its own start ``init_loc + offset_k`` (see
           ``init_spread``), maximizes its own reparameterized ELBO
           ``E_{q_k}[log p(x) - log q_k(x)]`` (``num_particles`` draws, ``num_steps`` Adam
           steps in jitted chunks: ``lr`` for the affine map, ``lr / 10`` for the flow's
           conditioners, see :func:`_expert_adam`), with ``log p`` from
           :func:`~numpyro_mixvi.guides.base.unconstrained_log_joint` (plates, factors,
           constrained sites and subsample scaling as in ``RBMixture_ELBO``). A non-finite
           loss stops that expert with a ``RuntimeWarning`` and it leaves the mixture (weight 0 in
           stage 2: its last finite parameters are untrained); if every expert fails,
           ``FloatingPointError``.
        2. Each ``"rbig"`` is fit to ``num_rbig_draws`` draws of the uniform mixture of the
           trained parametric experts, importance-weighted by ``p/q`` and systematically
           resampled. Resampling cannot create points the proposal never drew: **RBIG is capped
           at the proposal's support**; it adds shape where the experts put mass, not new modes.
        3. Weights. ``weight_update="elbo"`` (default): ``weight_batch_size`` draws of every
           expert (RBIG included), then ``pi`` maximizes the mixture ELBO estimated on them
           (concave in ``pi``; :func:`_elbo_optimal_weights`), so the mixture's ELBO is at
           least each expert's up to Monte Carlo error; an expert whose draws, own density or
           ``log p`` at its draws are non-finite gets weight 0 and leaves the mixture. In the
           model setting this replaces the paper's rule: experts trained by reverse KL that
           miss a mode have a huge ``CE(p, q_k)``, so the EMA gives them ~0 weight even when
           together they are the better mixture (see the Pyro twin's measurement).
           ``num_weight_steps`` and ``beta`` are then unused. ``"ema"``/``"responsibility"``:
           ``num_weight_steps`` :func:`~numpyro_mixvi.distributions.flow_mixture.ema_weights_step`
           updates (jitted) on fresh batches of ``weight_batch_size`` draws of the uniform
           mixture of all experts (``weight_batch_size / K`` per expert, rounded up), with the
           self-normalized importance weights ``p / q_mix`` as ``sample_weights``: the batch
           reaches the posterior by importance sampling. An expert whose draws or own
           log-density are non-finite leaves the proposal for that batch (its rows weigh 0)
           and gets weight exactly 0, so it cannot poison the others; an expert with a
           ``-inf`` log-density on the batch decays geometrically (``ema_weights_step``).
           Experts with weight exactly 0 then leave the mixture (``RuntimeWarning``).
        4. If ``num_joint_steps > 0``: ``RBMixture_ELBO(num_particles)`` on every expert
           parameter and ``pi`` through ``SVI`` (jitted), Adam(``lr``) for ``pi``,
           Adam(``lr / 10``) for the experts' affine maps and Adam(``lr / 100``) for their
           conditioners. The small expert step keeps them near their stage-1 optima
           (at ``lr`` the first steps undo stage 1); ``pi`` gets the full step because stage 2
           aims it at ``exp(-CE(p, q_k))``, not at the mixture ELBO's optimum, and stage 3 is
           where it moves there (same choice as the Pyro twin).

        Shapes:
            ``params``: the guide's parameters (constrained, as ``SVI.get_params`` returns),
            usable with ``sample_posterior``, ``Predictive``, ``to_arviz``,
            ``psis_diagnostic`` and ``log_evidence``.

        Args:
            rng_key: PRNG key for every stage.
            *args: The model's positional arguments.
            num_steps: Stage-1 Adam steps per parametric expert; at least 1.
            lr: Stage-1 Adam step size of the affine maps (``lr / 10`` for the flows; stage 3:
                ``lr`` for ``pi``, ``lr / 10`` and ``lr / 100`` for the experts).
            num_particles: Draws per ELBO estimate (stages 1 and 3); at least 1.
            num_rbig_draws: Proposal draws importance-resampled for RBIG; at least 2.
            num_weight_steps: Stage-2 EMA steps; at least 1. Each costs ``weight_batch_size``
                model evaluations; at ``beta = 0.9`` fifty steps leave ``0.9**50 < 0.01`` of the
                uniform start (the from-samples ``FlowMixture.fit`` keeps the paper's 200).
            weight_batch_size: Stage-2 batch size; at least 1.
            beta: EMA factor in ``[0, 1)``.
            weight_update: ``"elbo"`` (ELBO-optimal weights, see 3.), ``"ema"`` (paper) or
                ``"responsibility"`` (ML weights).
            num_joint_steps: Stage-3 steps; 0 skips it.
            progress_bar: Show tqdm bars per stage.
            **kwargs: The model's keyword arguments.

        Returns:
            ``(params, FitResult)``.

        Raises:
            ValueError: If an argument is out of range (the message names it).
            FloatingPointError: If every expert's stage-1 loss turns non-finite, the importance
                weights or the stage-2 weights are NaN, or a stage-3 loss is non-finite.
        """
        _check_fit_args(num_steps, num_particles, num_rbig_draws, num_weight_steps,
                        weight_batch_size, beta, weight_update, num_joint_steps)
        key_init, key_stage1, key_rbig, key_weights, key_joint = jax.random.split(rng_key, 5)
        self._rbig, self._dropped = {}, set()
        params = self._initial_params(key_init, args, kwargs)
        losses, healthy = self._fit_experts(key_stage1, params, args, kwargs, num_steps=num_steps,
                                            lr=lr, num_particles=num_particles,
                                            progress_bar=progress_bar)
        self._fit_rbig(key_rbig, healthy, params, args, kwargs, num_rbig_draws, progress_bar)
        weights = self._fit_weights(key_weights, healthy, params, args, kwargs, num_weight_steps,
                                    weight_batch_size, beta, weight_update, progress_bar)
        self._keep_members(params, weights)
        joint_losses = jnp.zeros((0,), weights.dtype)
        if num_joint_steps > 0:
            params, joint_losses = self._fit_joint(key_joint, params, args, kwargs, lr,
                                                   num_particles, num_joint_steps, progress_bar)
        members = jnp.asarray(self._active())
        weights = jnp.zeros_like(weights).at[members].set(params[f"{self.prefix}_weights"])
        expert_losses = tuple(losses.get(k, jnp.zeros((0,), weights.dtype))
                              for k in range(len(self.experts)))
        return params, FitResult(expert_losses, weights, 1.0 / (weights**2).sum(), joint_losses)

    def _initial_params(self, rng_key: Array, args: tuple, kwargs: dict) -> dict:
        """Run the guide once (setting up the prototype) and collect its constrained params.

        The latent site is substituted with the init location, so no expert is sampled here
        (eager flowjax sampling compiles op by op: ~half of this call's cost otherwise).
        """
        name = latent_site_name(self)
        at_init = lambda site: self._init_latent if site["name"] == name else None  # noqa: E731
        guide = handlers.substitute(handlers.seed(self, rng_key), substitute_fn=at_init)
        guide_trace = handlers.trace(guide).get_trace(*args, **kwargs)
        return {name: site["value"] for name, site in guide_trace.items()
                if site["type"] == "param"}

    def _fit_experts(self, rng_key: Array, params: dict, args: tuple, kwargs: dict, *,
                     num_steps: int, lr: float, num_particles: int,
                     progress_bar: bool) -> tuple[dict[int, Array], list[int]]:
        """Stage 1: every parametric expert by its own ELBO; writes the trained leaves back.

        Returns the per-expert losses and the indices of the experts that trained without a
        non-finite loss (the proposal of the later stages).
        """
        parametric = [k for k, name in enumerate(self.experts) if name != "rbig"]
        key_spread, rng_key = jax.random.split(rng_key)
        offsets = _spread_offsets(key_spread, len(parametric), self._init_latent,
                                  self._init_spread)
        losses, healthy = {}, []
        for k, key, offset in zip(parametric, jax.random.split(rng_key, len(parametric)), offsets,
                                  strict=True):
            expert = self._expert_from_leaves(k, params[self._param_name(k)])
            expert = eqx.tree_at(lambda e: e.bijection.loc, expert, self._init_latent + offset)
            trained, losses[k] = train_expert(
                key, expert, _expert_elbo_loss, self, params, args, kwargs, num_particles,
                num_steps=num_steps, lr=lr, label=f"expert {k} ({self.experts[k]})",
                progress_bar=progress_bar, optimizer=_expert_adam(lr),
            )
            params[self._param_name(k)] = jax.tree.leaves(partition_trainable(trained)[0])
            if bool(jnp.isfinite(losses[k][-1])):
                healthy.append(k)
        if not healthy:
            raise FloatingPointError(
                f"every parametric expert's stage-1 loss turned non-finite (lr={lr}); lower lr "
                "or init_scale, or check that the model's log density is finite near init_loc"
            )
        return losses, healthy

    def _fit_rbig(self, rng_key: Array, proposal: list[int], params: dict, args: tuple,
                  kwargs: dict, num_draws: int, progress_bar: bool) -> None:
        """Stage 1b: each RBIG on importance-resampled draws of the healthy parametric experts.

        The layer count is chosen on ``num_draws // 2`` fresh importance draws: layers are added
        until the self-normalized held-out log-likelihood has not improved by ``tol`` for
        ``patience`` layers, and the best prefix is kept (the training likelihood keeps rising
        on resampled duplicates).
        """
        slots = [k for k, name in enumerate(self.experts) if name == "rbig"]
        if not slots:
            return
        experts = tuple(self._expert_from_leaves(k, params[self._param_name(k)])
                        for k in proposal)
        key_draw, key_held, key_resample, *keys_fit = jax.random.split(rng_key, 3 + len(slots))
        x, log_w = _importance_draws(key_draw, experts, num_draws, self, params, args, kwargs)
        held, log_w_held = _importance_draws(key_held, experts, max(num_draws // 2, 2), self,
                                             params, args, kwargs)
        if bool(jnp.isnan(log_w).any() | jnp.isnan(log_w_held).any()):
            raise FloatingPointError("stage 1b: the model's log density is NaN at draws of the "
                                     "trained experts; check the model or lower lr")
        weights = jax.nn.softmax(log_w)
        ess = float(1.0 / (weights**2).sum())
        if ess < 0.01 * len(log_w):
            warnings.warn(f"stage 1b: importance weights are degenerate (ESS {ess:.1f} of "
                          f"{len(log_w)} draws); RBIG is fit to few distinct points",
                          RuntimeWarning, stacklevel=3)
        resampled = x[_systematic_resample(key_resample, weights, num_draws)]
        if not bool((resampled != resampled[0]).any(0).all()):  # a coordinate with one value
            warnings.warn(_RBIG_DEGENERATE, RuntimeWarning, stacklevel=3)
            return
        options = self.expert_kwargs.get("rbig", {})
        for k, key in zip(slots, keys_fit, strict=True):
            self._rbig[k] = _fit_rbig_held_out(key, resampled, held, jax.nn.softmax(log_w_held),
                                               progress_bar=progress_bar, **options)

    def _fit_weights(self, rng_key: Array, proposal: list[int], params: dict, args: tuple,
                     kwargs: dict, num_steps: int, batch_size: int, beta: float,
                     weight_update: str, progress_bar: bool) -> Array:
        """Stage 2: weights of every expert (ELBO-optimal, or the EMA on importance batches)."""
        num = len(self._active())
        params[f"{self.prefix}_weights"] = jnp.full((num,), 1.0 / num,
                                                    jnp.result_type(self._init_latent))
        experts = tuple(self.get_posterior(params).experts)
        # An expert whose stage-1 loss went non-finite stopped at its last finite parameters:
        # finite, but untrained and possibly wild in the tails. It gets weight 0.
        trained = jnp.asarray([k in proposal or self.experts[k] == "rbig" for k in self._active()])
        if weight_update == "elbo":
            log_target, log_q, usable = _expert_draw_scores(rng_key, experts, self, params, args,
                                                            kwargs, batch_size)
            usable = usable & trained
            if not bool(usable.any()):
                raise FloatingPointError(
                    "stage 2: every expert has a non-finite draw, own log-density or log p at "
                    "its draws; lower lr or check the model's log density"
                )
            rows = jnp.flatnonzero(usable)
            pi = _elbo_optimal_weights(log_target[rows], log_q[rows][..., rows])
            return jnp.zeros(num, pi.dtype).at[rows].set(pi)
        index = tuple(self._active().index(k) for k in proposal)
        per_expert = -(-batch_size // len(index))
        state = ema_weights_init(len(experts), dtype=jnp.result_type(self._init_latent))
        bar = tqdm(jax.random.split(rng_key, num_steps), desc="stage 2 (weights)",
                   disable=not progress_bar)
        for key in bar:
            state, info, ess = _weights_step(key, state, experts, index, self, params, args,
                                             kwargs, per_expert, beta, weight_update)
            if not bool(jnp.isfinite(state.weights).all()):
                raise FloatingPointError(
                    "stage 2: the weights turned NaN (every expert's log-density or the "
                    "importance weights were non-finite on a batch); check the model and lower lr"
                )
            bar.set_postfix(n_eff=f"{float(info.n_eff):.2f}", ess=f"{float(ess):.0f}")
        weights = jnp.where(trained, state.weights, 0.0)
        return weights / weights.sum()

    def _keep_members(self, params: dict, weights: Array) -> None:
        """Experts with weight exactly 0 (non-finite density) leave the mixture; ``pi`` is
        renormalized over the rest, so ``log pi`` stays finite for ``RBMixture_ELBO``."""
        active = self._active()
        dead = [k for k, w in zip(active, weights, strict=True) if float(w) == 0.0]
        for k in dead:
            self._dropped.add(k)
            self._rbig.pop(k, None)
            params.pop(self._param_name(k), None)
        if dead:
            warnings.warn(f"experts {[f'{k} ({self.experts[k]})' for k in dead]} have weight 0 "
                          "(non-finite draws or log-density) and leave the mixture",
                          RuntimeWarning, stacklevel=3)
        kept = weights[jnp.asarray([i for i, k in enumerate(active) if k not in dead])]
        params[f"{self.prefix}_weights"] = kept / kept.sum()

    def _fit_joint(self, rng_key: Array, params: dict, args: tuple, kwargs: dict, lr: float,
                   num_particles: int, num_steps: int, progress_bar: bool) -> tuple[dict, Array]:
        """Stage 3: ``RBMixture_ELBO`` on every parameter through ``SVI``: Adam(``lr``) for the
        weights (their unconstrained coordinates), ``lr / 10`` for the experts' affine maps,
        ``lr / 100`` for their flows (as stage 1's ratio, and the Pyro twin's)."""
        weights_name = f"{self.prefix}_weights"
        num_affine = len(jax.tree.leaves(partition_trainable(Affine(self._init_latent))[0]))

        def labels(tree: dict) -> dict:  # the affine map's leaves are each expert's last ones
            return {name: "weights" if name == weights_name else
                    ["flow"] * (len(leaves) - num_affine) + ["affine"] * num_affine
                    for name, leaves in tree.items()}

        optimizer = optax.multi_transform(
            {"weights": optax.adam(lr), "affine": optax.adam(lr / 10),
             "flow": optax.adam(lr / 100)}, labels)
        svi = SVI(self.model, self, optimizer, RBMixture_ELBO(num_particles=num_particles))
        result = svi.run(rng_key, num_steps, *args, progress_bar=progress_bar,
                         init_params=params, **kwargs)
        bad = ~jnp.isfinite(result.losses)
        if bool(bad.any()):
            raise FloatingPointError(f"stage 3: the RB mixture ELBO turned non-finite at step "
                                     f"{int(jnp.argmax(bad))}; lower lr or skip stage 3")
        return result.params, result.losses


@functools.lru_cache(maxsize=16)
def _expert_adam(lr: float) -> optax.GradientTransformation:
    """Stage-1 Adam of an expert: its affine map at ``lr``, the flow's conditioners at ``lr/10``.

    Adam moves every weight by about ``lr`` per step, so a zero-initialized output layer of
    width ``h`` moves the flow's shifts and log-scales by ``O(h * lr)`` per step: at equal step
    sizes the shape outruns the location and scale it is relative to (the Pyro twin's rule).
    """

    def labels(params: Transformed) -> Transformed:
        flow = jax.tree.map(lambda _: "flow", params)
        affine = jax.tree.map(lambda _: "affine", params.bijection)
        return eqx.tree_at(lambda tree: tree.bijection, flow, affine)

    return optax.multi_transform({"affine": optax.adam(lr), "flow": optax.adam(lr / 10)}, labels)


@eqx.filter_jit
def _expert_draw_scores(key: Array, experts: tuple, guide: AutoFlowMixture, params: dict,  # noqa: ANN202
                        args: tuple, kwargs: dict, batch_size: int):
    """``batch_size`` draws of every expert: ``log p`` ``(K, B)``, ``log q_j(x_ki)`` ``(K, B, K)``
    and which experts are usable (finite draws, own log-density and ``log p``) ``(K,)``."""
    key_x, key_p = jax.random.split(key)
    keys = jax.random.split(typed_key(key_x), len(experts))
    x = jnp.stack([e.sample(k, (batch_size,)) for e, k in zip(experts, keys, strict=True)])
    finite_x = jnp.isfinite(x).all(-1)
    safe = jnp.where(finite_x[..., None], x, 0.0)
    log_q = jnp.stack([e.log_prob(safe) for e in experts], -1)
    log_p = unconstrained_log_joint(guide.model, guide, safe.reshape(-1, x.shape[-1]), params,
                                    args, kwargs, rng_key=key_p).reshape(x.shape[:2])
    own = jnp.diagonal(log_q, axis1=0, axis2=2).T
    usable = (finite_x & jnp.isfinite(own) & jnp.isfinite(log_p)).all(-1)
    return log_p, log_q, usable


@functools.partial(jax.jit, static_argnames=("num_iters",))
def _elbo_optimal_weights(log_target: Array, log_q: Array, num_iters: int = 500,
                          step: float = 0.05) -> Array:
    r"""Mixture weights maximizing the ELBO estimated on fixed draws of each expert.

    .. math:: \hat L(\pi) = \sum_k \pi_k \frac1B \sum_i \Big[\log p(x_{ki})
              - \log \sum_j \pi_j q_j(x_{ki})\Big], \qquad x_{ki} \sim q_k

    Concave in ``pi``, with every single expert feasible, so the maximum is at least each
    expert's own ELBO estimate. Adam on ``log pi`` (softmax), ``num_iters`` steps of ``step``.

    Shapes:
        ``log_target``: ``(K, B)``; ``log_q``: ``(K, B, K)`` with ``log_q[k, i, j] =
        log q_j(x_ki)``. Returns ``pi`` ``(K,)``.
    """
    optimizer = optax.adam(step)

    def loss(logits: Array) -> Array:
        log_pi = jax.nn.log_softmax(logits)
        log_mix = jax.nn.logsumexp(log_pi + log_q, -1)
        return -(jnp.exp(log_pi) * (log_target - log_mix).mean(-1)).sum()

    def body(_, carry):  # noqa: ANN001, ANN202
        logits, state = carry
        updates, state = optimizer.update(jax.grad(loss)(logits), state)
        return optax.apply_updates(logits, updates), state

    logits = jnp.zeros(log_q.shape[-1], log_q.dtype)
    logits, _ = jax.lax.fori_loop(0, num_iters, body, (logits, optimizer.init(logits)))
    return jax.nn.softmax(logits)




def _spread_offsets(rng_key: Array, num: int, loc: Array, spread: float) -> Array:
    """Initial offsets of ``num`` experts from the init location: random, centered, RMS ``spread``.

    Every expert trains alone by reverse KL, which is mode-seeking: from one common start they
    all find the same mode(s), so the mixture has nothing to combine and RBIG's importance
    proposal misses the other modes (same rule and measurements as the Pyro twin).

    Shapes:
        ``loc``: ``(D,)`` (sets the dtype); returns ``(num, D)`` with mean 0 over the experts
        (zeros if ``num == 1`` or ``spread == 0``).
    """
    if num < 2 or spread == 0:
        return jnp.zeros((num, loc.shape[-1]), loc.dtype)
    offsets = jax.random.normal(rng_key, (num, loc.shape[-1]), loc.dtype)
    offsets = offsets - offsets.mean(0)
    return offsets * (spread / jnp.sqrt((offsets**2).sum(-1).mean()))


def _check_fit_args(num_steps, num_particles, num_rbig_draws, num_weight_steps,  # noqa: ANN001
                    weight_batch_size, beta, weight_update, num_joint_steps) -> None:  # noqa: ANN001
    for name, value, low in [("num_steps", num_steps, 1), ("num_particles", num_particles, 1),
                             ("num_rbig_draws", num_rbig_draws, 2),
                             ("num_weight_steps", num_weight_steps, 1),
                             ("weight_batch_size", weight_batch_size, 1),
                             ("num_joint_steps", num_joint_steps, 0)]:
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1); got {beta}")
    if weight_update not in ("elbo", "ema", "responsibility"):
        raise ValueError(
            f"weight_update must be 'elbo', 'ema' or 'responsibility'; got {weight_update!r}"
        )


def _expert_elbo_loss(params, static, key: Array, guide: AutoFlowMixture, guide_params: dict,  # noqa: ANN001
                      args: tuple, kwargs: dict, num_particles: int) -> Array:
    """Minus expert ``k``'s own reparameterized ELBO ``E_{q_k}[log p - log q_k]``."""
    key_q, key_p = jax.random.split(typed_key(key))
    x, log_q = eqx.combine(params, static).sample_and_log_prob(key_q, (num_particles,))
    log_p = unconstrained_log_joint(guide.model, guide, x, guide_params, args, kwargs,
                                    rng_key=key_p)
    return -jnp.mean(log_p - log_q)


def _proposal_draws(key: Array, experts: tuple, index: tuple[int, ...], per_expert: int,
                    guide: AutoFlowMixture, params: dict, args: tuple,
                    kwargs: dict) -> tuple[Array, Array, Array, Array]:
    """A stratified draw of the uniform mixture of the proposal experts, and ``log p/q_mix``.

    The proposal is ``experts[i]`` for ``i`` in ``index``; each draws ``per_expert`` points.
    A proposal expert whose draws or own log-density are non-finite leaves the proposal for
    this batch: its rows get log-weight ``-inf`` (they are not proposal draws) and ``q_mix``
    is the uniform mixture of the others.

    Shapes:
        Returns ``x (P * per_expert, D)``, ``log q_k(x) (K, P * per_expert)`` for every expert,
        log-weights ``(P * per_expert,)``, the rows' proposal mask and the proposal experts'
        health ``(P,)``.
    """
    key_x, key_p = jax.random.split(key)
    keys = jax.random.split(typed_key(key_x), len(index))
    x = jnp.concatenate([experts[i].sample(k, (per_expert,))
                         for i, k in zip(index, keys, strict=True)])
    log_qk = jnp.stack([e.log_prob(x) for e in experts])  # (K, B)
    log_qp = log_qk[jnp.asarray(index)]  # (P, B)
    owner = jnp.repeat(jnp.arange(len(index)), per_expert)
    own = log_qp[owner, jnp.arange(x.shape[0])]
    row_ok = jnp.isfinite(x).all(-1) & jnp.isfinite(own)
    healthy = jax.ops.segment_min(row_ok.astype(jnp.int32), owner, len(index)) > 0
    in_proposal = healthy[owner]
    safe_x = jnp.where(in_proposal[:, None], x, 0.0)  # the model never sees an excluded row
    masked = jnp.where(healthy[:, None], log_qp, -jnp.inf)
    log_q_mix = jax.nn.logsumexp(masked, 0) - jnp.log(healthy.sum())
    log_p = unconstrained_log_joint(guide.model, guide, safe_x, params, args, kwargs,
                                    rng_key=key_p)
    log_w = jnp.where(in_proposal, log_p - log_q_mix, -jnp.inf)
    return x, log_qk, log_w, in_proposal, healthy


@eqx.filter_jit
def _importance_chunk(key: Array, experts: tuple, per_expert: int, guide: AutoFlowMixture,  # noqa: ANN202
                      params: dict, args: tuple, kwargs: dict):
    index = tuple(range(len(experts)))
    x, _, log_w, _, _ = _proposal_draws(key, experts, index, per_expert, guide, params, args,
                                        kwargs)
    return x, log_w


def _importance_draws(rng_key: Array, experts: tuple, num_draws: int, guide: AutoFlowMixture,
                      params: dict, args: tuple, kwargs: dict) -> tuple[Array, Array]:
    """``num_draws`` (rounded up) draws of the experts' uniform mixture and ``log p/q`` in
    jitted chunks of about ``_LOG_P_CHUNK`` model evaluations."""
    per_chunk = max(1, min(num_draws, _LOG_P_CHUNK) // len(experts))
    num_chunks = -(-num_draws // (per_chunk * len(experts)))
    pieces = [_importance_chunk(key, experts, per_chunk, guide, params, args, kwargs)
              for key in jax.random.split(rng_key, num_chunks)]
    return (jnp.concatenate([p[0] for p in pieces]), jnp.concatenate([p[1] for p in pieces]))


def _systematic_resample(rng_key: Array, weights: Array, num: int) -> Array:
    """Indices of ``num`` systematic-resampling draws from normalized ``weights``."""
    u = (jax.random.uniform(rng_key, (), weights.dtype) + jnp.arange(num, dtype=weights.dtype))
    cdf = jnp.cumsum(weights)
    return jnp.minimum(jnp.searchsorted(cdf, u / num * cdf[-1]), len(weights) - 1)


_RBIG_DEGENERATE = ("stage 1b: the importance-resampled draws repeat one value in some "
                    "coordinate (degenerate weights p/q), so RBIG cannot be fit; it leaves the "
                    "mixture (more stage-1 steps or num_rbig_draws help)")


def _fit_rbig_held_out(rng_key: Array, train: Array, held: Array, held_weights: Array, *,
                       max_layers: int = 50, tol: float = 1e-3, patience: int = 3,
                       rotation: str = "random", num_knots: int = 100,
                       bandwidth_factor: float = 1.0, progress_bar: bool = True) -> RBIG:
    """RBIG layers on ``train`` while the weighted log-likelihood of ``held`` improves.

    Keeps the best prefix once ``patience`` layers in a row gained less than ``tol`` nats.
    """
    if max_layers < 1 or patience < 1:
        raise ValueError(f"max_layers and patience must be >= 1; got {max_layers}, {patience}")
    state = rbig_init(train, num_knots=num_knots, bandwidth_factor=bandwidth_factor)
    z, log_det = held, jnp.zeros(held.shape[0], held.dtype)
    best, best_score, stalled = 0, -math.inf, 0
    bar = tqdm(jax.random.split(rng_key, max_layers), desc="stage 1b (RBIG)",
               disable=not progress_bar)
    for num_layers, key in enumerate(bar, 1):
        state, _ = rbig_step(key, state, rotation=rotation)
        z, log_det, score = _held_out_layer(z, log_det, held_weights, *state.layers[-1])
        score = float(score)
        bar.set_postfix(held_out=f"{score:.4f}")
        if score > best_score + tol:
            best, best_score, stalled = num_layers, score, 0
        else:
            stalled += 1
            if stalled >= patience:
                break
    if best == 0:
        raise FloatingPointError("stage 1b: RBIG's held-out log-likelihood is not finite; "
                                 "check the importance draws (model log density, lr)")
    return RBIG.from_state(state._replace(layers=state.layers[:best]))


@jax.jit
def _held_out_layer(z: Array, log_det: Array, weights: Array, centers: Array, bandwidth: Array,
                    rotation: Array) -> tuple[Array, Array, Array]:
    """Map held-out points through one more RBIG layer; their weighted mean log-likelihood."""
    u, layer_log_det = jax.vmap(marginal_gaussianize, (0, None, None))(z, centers, bandwidth)
    z, log_det = u @ rotation, log_det + layer_log_det.sum(-1)
    log_base = -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
    return z, log_det, (weights * (log_base + log_det)).sum()


@eqx.filter_jit
def _weights_step(key: Array, state, experts: tuple, index: tuple[int, ...],  # noqa: ANN001, ANN202
                  guide: AutoFlowMixture, params: dict, args: tuple, kwargs: dict,
                  per_expert: int, beta: float, weight_update: str):
    """One stage-2 update on a proposal batch weighted by ``p/q_mix`` (self-normalized).

    Rows outside the proposal (draws of an unhealthy expert) have weight 0; their
    log-likelihoods are replaced by 0 so they cannot mark a healthy expert non-finite (they
    carry no weight either way). A proposal expert whose draws or own log-density were
    non-finite on the batch cannot be sampled from, so its weight is set to exactly 0, as
    ``ema_weights_step`` does for a NaN log-density.
    """
    _, log_qk, log_w, in_proposal, healthy = _proposal_draws(key, experts, index, per_expert,
                                                             guide, params, args, kwargs)
    sample_weights = jax.nn.softmax(log_w)
    log_lik = jnp.where(in_proposal[None, :], log_qk, 0.0)
    state, info = ema_weights_step(state, log_lik, beta=beta, weight_update=weight_update,
                                   sample_weights=sample_weights)
    broken = jnp.zeros(len(experts), bool).at[jnp.asarray(index)].set(~healthy)
    weights = jnp.where(broken, 0.0, state.weights)
    weights = weights / weights.sum()
    info = info._replace(n_eff=1.0 / (weights**2).sum())
    return state._replace(weights=weights), info, 1.0 / (sample_weights**2).sum()
