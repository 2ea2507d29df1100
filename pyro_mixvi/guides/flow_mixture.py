r"""AutoFlowMixture: a heterogeneous mixture of flow experts (AMF-VI) fit from a model.

.. math:: q(x) = \sum_k \pi_k\, q_k(x), \qquad q_k \in \{\text{MAF}, \text{RealNVP}, \text{RBIG}\}

over the model's flat unconstrained latent ``x`` in R^D. :meth:`AutoFlowMixture.fit` is the
paper's procedure transposed from samples to an unnormalized posterior (``DESIGN.md`` §4,
mode (b)): each parametric expert alone by its own ELBO, RBIG fit to importance-resampled
draws, the weights by the paper's EMA on self-normalized importance-weighted batches, and an
optional joint fine-tuning of experts and weights by the Rao-Blackwellized mixture ELBO.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import pyro
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import Tensor, nn
from torch.distributions import AffineTransform
from tqdm.auto import tqdm
from zuko.distributions import NormalizingFlow
from zuko.transforms import ComposedTransform

from pyro_mixvi.distributions.flow_mixture import (
    EXPERTS,
    FlowMixture,
    ema_weights_init,
    ema_weights_step,
)
from pyro_mixvi.flows import MAF, RBIG, RealNVP, rbig_init, rbig_step
from pyro_mixvi.flows._zuko import zero_last_layers
from pyro_mixvi.flows.rbig import marginal_gaussianize
from pyro_mixvi.guides.base import (
    SampleSummariesOnly,
    model_plate_nesting,
    rb_mixture_particle_elbos,
    unconstrained_log_joint,
)

__all__ = ["AutoFlowMixture", "FitResult", "StandardizedFlow"]

_FLOWS = {"maf": MAF, "realnvp": RealNVP}
_LOG_P_CHUNK = 1024
#: Default ``max_log_scale`` of the parametric experts' layers (soft bound on ``|log-scale|``).
#: zuko's default bound (6.9 per layer) let a RealNVP expert on centered eight schools draw
#: ``log tau = -63`` at stage-1 step 146 (log p = -inf: non-finite loss); with 2 no expert went
#: non-finite on seeds 1-3 at lr 5e-3 and the importance-sampled log Z rose (MAF -37.5/-39.2 ->
#: -33.0/-35.9, seeds 1-2, 400 steps; AutoNormal -36.8). The affine map carries the global scale.
EXPERT_MAX_LOG_SCALE = 2.0  # points per vectorized model run when scoring large batches
_RBIG_OPTIONS = {"max_layers": 50, "tol": 1e-3, "patience": 3, "rotation": "random",
                 "num_knots": 100, "bandwidth_factor": 1.0}


class FitResult(NamedTuple):
    """What :meth:`AutoFlowMixture.fit` did.

    Attributes:
        expert_losses: One 1-D tensor per entry of ``experts`` (in order): the stage-1 loss
            (minus the expert's own ELBO estimate) at each step it trained. Empty for RBIG (fit,
            not trained) and shorter than ``num_steps`` for an expert stopped by a non-finite
            loss.
        weights: Final mixture weights ``pi``, shape ``(K,)`` over all entries of ``experts``;
            0 for an expert that stage 2 switched off.
        n_eff: Effective number of experts ``1 / sum_k pi_k^2``.
        joint_losses: Stage-3 losses (minus the mixture ELBO estimate), one per step; empty
            when ``num_joint_steps == 0``.
    """

    expert_losses: tuple[Tensor, ...]
    weights: Tensor
    n_eff: Tensor
    joint_losses: Tensor


class StandardizedFlow(nn.Module):
    r"""A flow composed with a trainable diagonal affine map: ``x = loc + scale * y``, ``y ~ flow``.

    At initialization the flow is the identity (the last layer of every conditioner network is
    zero, so each layer's shift and log-scale are 0, as in Glow), ``loc`` is the guide's init
    location and ``scale`` its ``init_scale``: an expert starts as exactly
    ``N(init_loc, init_scale^2 I)``, the initialization of ``AutoNormal``, instead of a random
    flow at the origin with unit scale (whose far draws gave eight schools initial losses ~1e4
    and a non-finite MAF loss at lr 5e-3).

    Shapes:
        ``module()`` is a distribution with ``event_shape == (D,)``; ``loc``, ``log_scale``:
        ``(D,)``.

    Args:
        flow: A zuko flow (``flow()`` is a ``NormalizingFlow`` over ``R^D``).
        loc: Initial location ``(D,)``; sets dtype and device.
        scale: Initial scale; positive.
    """

    def __init__(self, flow: nn.Module, loc: Tensor, scale: float) -> None:
        super().__init__()
        self.flow = zero_last_layers(flow.to(loc))
        self.loc = nn.Parameter(loc.detach().clone())
        self.log_scale = nn.Parameter(loc.new_full(loc.shape, math.log(scale)))

    def forward(self) -> NormalizingFlow:
        """``q(x) = flow(y = (x - loc) / scale) / prod(scale)`` (zuko's data-to-base direction)."""
        inner = self.flow()
        standardize = AffineTransform(self.loc, self.log_scale.exp(), event_dim=1).inv
        return NormalizingFlow(ComposedTransform(standardize, inner.transform), inner.base)


def _param_groups(module: StandardizedFlow, lr: float) -> list[dict]:
    """Adam groups of an expert: the affine part at ``lr``, the flow's conditioners at ``lr/10``.

    Adam moves every weight by about ``lr`` per step, so a zero-initialized output layer of
    width ``h`` changes the flow's shifts and log-scales by ``O(h * lr)`` per step (0.3 for
    ``h = 64``, ``lr = 5e-3``): at equal step sizes the shape outruns the location and scale it
    is relative to. On eight schools (400 steps, lr 5e-3) equal steps left MAF at loss 60 and
    sent RealNVP to 1e6; the affine part alone reached 43 (AutoNormal's level).
    """
    return [{"params": [module.loc, module.log_scale], "lr": lr},
            {"params": list(module.flow.parameters()), "lr": lr / 10}]




def _spread_offsets(num: int, loc: Tensor, spread: float) -> Tensor:
    """Initial offsets of ``num`` experts from the init location: random, centered, RMS ``spread``.

    Every expert trains alone by reverse KL, which is mode-seeking: from one common start they
    all find the same mode(s), so the mixture has nothing to combine and RBIG's importance
    proposal misses the other modes. Distinct starts let them settle in different modes (as
    AutoCWM spreads its components). Measured (Pyro, 300 stage-1 steps, 3-layer flows,
    bimodal_shared seed 0): RBIG's ELBO -0.234 -> -0.049 and sliced W2 0.279 -> 0.054, the
    mixture's -0.229 -> -0.031 and 0.388 -> 0.078 with ``spread`` 0 -> 1.

    Shapes:
        ``loc``: ``(D,)`` (sets dtype and device); returns ``(num, D)`` with mean 0 over the
        experts (zeros if ``num == 1`` or ``spread == 0``).
    """
    if num < 2 or spread == 0:
        return loc.new_zeros(num, loc.shape[-1])
    offsets = torch.randn(num, loc.shape[-1], dtype=loc.dtype, device=loc.device)
    offsets = offsets - offsets.mean(0)
    return offsets * (spread / offsets.square().sum(-1).mean().sqrt())


def _unfitted_rbig(loc: Tensor) -> RBIG:
    """An RBIG with no layers: a placeholder that :meth:`AutoFlowMixture.fit` replaces."""
    d = loc.shape[-1]
    return RBIG(loc.new_zeros(0, d, 1), loc.new_ones(0, d, 1), loc.new_zeros(0, d, d))


class AutoFlowMixture(SampleSummariesOnly, AutoContinuous):
    r"""Mixture of flow experts with global weights over the model's flat unconstrained latent.

    .. math:: q(x) = \sum_k \pi_k\, q_k(x)

    Parametric experts (``"maf"``, ``"realnvp"``; :func:`~pyro_mixvi.MAF`,
    :func:`~pyro_mixvi.RealNVP`) are composed with a trainable diagonal affine map
    (:class:`StandardizedFlow`) that starts as ``N(init_loc, init_scale^2 I)``; :meth:`fit`
    moves expert ``k`` to ``init_loc + offset_k`` before training it alone (offsets random,
    centered, of RMS norm ``init_spread``), so that experts trained by reverse KL can settle in
    different modes. ``"rbig"`` is a :class:`~pyro_mixvi.RBIG` fit
    from importance-resampled draws by :meth:`fit`; it has no trainable parameters.
    **Before** :meth:`fit` has run, the posterior is the uniform mixture of the parametric
    experts only.

    ``get_posterior()`` returns a :class:`~pyro_mixvi.FlowMixture`, a finite mixture in the
    sense of :mod:`pyro_mixvi.guides.base`, so :class:`~pyro_mixvi.RBMixture_ELBO` trains every
    parameter (experts and the weights ``pi``, a parameter on the simplex) in an ordinary SVI
    loop. Stock ELBOs raise ``NotImplementedError`` pointing there (the expert index of a draw
    carries no gradient to ``pi``). ``median``/``quantiles`` raise too (no closed form; use
    ``Predictive``).

    Shapes:
        ``D`` is the unconstrained latent size, fixed at the first call.
        ``get_posterior().log_prob(x)`` maps ``(..., D)`` to ``(...)``.

    Args:
        model: A Pyro model whose latent sites are continuous.
        experts: Expert names, each one of ``"maf"``, ``"realnvp"``, ``"rbig"`` (repeats
            allowed); at least one parametric expert, since RBIG is fit to their draws.
        expert_kwargs: Per-name keyword arguments: for ``"maf"``/``"realnvp"`` the flow
            factory's (``num_transforms``, ``hidden_dims``, ``max_log_scale``, default
            :data:`EXPERT_MAX_LOG_SCALE` here), for ``"rbig"`` any of
            ``max_layers`` (50), ``tol`` (1e-3), ``patience`` (3), ``rotation``
            (``"random"``), ``num_knots`` (100), ``bandwidth_factor`` (1.0) as in
            :meth:`RBIG.fit` (the stopping rule uses held-out draws, see :meth:`fit`).
        init_loc_fn: Per-site initialization, as in ``AutoMultivariateNormal``.
        init_scale: Initial scale of every parametric expert; positive.
        init_spread: Root-mean-square distance from the init location at which :meth:`fit`
            starts each parametric expert's stage-1 training (random, centered offsets;
            :func:`_spread_offsets`); ``>= 0``, 0 starts them all at the init location. In
            unconstrained units. An ordinary SVI loop does not use it.

    Example:
        >>> guide = AutoFlowMixture(model)              # was: AutoNormal(model)
        >>> result = guide.fit(data, num_steps=1000)    # stages 1-2 (3 with num_joint_steps)
        >>> result.weights, result.n_eff
        >>> samples = Predictive(model, guide=guide, num_samples=1000)(data)

    Cost:
        ``log_prob`` evaluates every expert of positive weight; ``RBMixture_ELBO`` and stage 3
        evaluate the model at ``K`` points per particle and ``log_prob`` at ``K^2``. MAF and RBIG
        sample slowly (``D`` sequential passes per MAF layer; a bisection per RBIG layer).

    Raises:
        ValueError: If ``experts`` is empty, names an unknown expert or no parametric one,
            ``expert_kwargs`` names an expert not in ``experts``, ``init_scale <= 0`` or
            ``init_spread < 0``; at the
            first call, if ``"realnvp"`` meets a 1-D latent or the model has a discrete latent
            site (the host's helpful message names it).
        RuntimeError: At the first call, if the model has no latent site.

    References:
        AMF-VI: adaptive heterogeneous mixtures of normalizing flows (2025),
        https://arxiv.org/abs/2510.02056
    """

    def __init__(
        self,
        model: Callable,
        *,
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
            raise ValueError(f"experts must be names in {EXPERTS}; unknown: {unknown}")
        if all(name == "rbig" for name in experts):
            raise ValueError(
                "experts needs a parametric expert ('maf' or 'realnvp'): RBIG is fit to draws "
                f"importance-resampled from them; got {experts}"
            )
        expert_kwargs = dict(expert_kwargs or {})
        stray = sorted(set(expert_kwargs) - set(experts))
        if stray:
            raise ValueError(f"expert_kwargs names experts not in experts={experts}: {stray}")
        unknown = sorted(set(expert_kwargs.get("rbig", {})) - set(_RBIG_OPTIONS))
        if unknown:
            raise ValueError(
                f"expert_kwargs['rbig'] accepts {sorted(_RBIG_OPTIONS)}; unknown: {unknown}"
            )
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0; got {init_scale}")
        if not init_spread >= 0:
            raise ValueError(f"init_spread must be >= 0; got {init_spread}")
        self.experts = experts
        self.expert_kwargs = expert_kwargs
        self._init_scale = float(init_scale)
        self._init_spread = float(init_spread)
        self._user_model = (model,)  # a tuple: a PyroModule model must not become a submodule
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        loc = self._init_loc().detach()
        if self.latent_dim < 2 and "realnvp" in self.experts:
            raise ValueError(
                f"experts: 'realnvp' needs a latent of dimension >= 2 (a coupling needs two "
                f"halves); this model's has {self.latent_dim}. Drop 'realnvp' from experts"
            )
        modules = []
        for name in self.experts:
            if name == "rbig":
                modules.append(_unfitted_rbig(loc))
            else:
                options = {"max_log_scale": EXPERT_MAX_LOG_SCALE,
                           **self.expert_kwargs.get(name, {})}
                flow = _FLOWS[name](self.latent_dim, **options)
                modules.append(StandardizedFlow(flow, loc, self._init_scale))
        self.expert_modules = nn.ModuleList(modules)
        mask = torch.tensor([name != "rbig" for name in self.experts], device=loc.device)
        self.register_buffer("expert_mask", mask)
        self.weights = PyroParam(
            loc.new_full((int(mask.sum()),), 1.0 / int(mask.sum())), constraints.simplex
        )

    def get_posterior(self, *args, **kwargs) -> FlowMixture:
        """The mixture of the experts in the mixture (``expert_mask``) with weights ``pi``."""
        members = [m for m, on in zip(self.expert_modules, self.expert_mask, strict=True) if on]
        return FlowMixture(members, self.weights)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # A fitted guide has RBIG layers and possibly fewer weights than a fresh one: give the
        # fresh guide's RBIG buffers and weights the saved shapes before the values are copied.
        if getattr(self, "prototype_trace", None) is not None:
            for k, name in enumerate(self.experts):
                key = f"{prefix}expert_modules.{k}.centers"
                if name == "rbig" and key in state_dict:
                    module = self.expert_modules[k]
                    for buffer in ("centers", "bandwidths", "rotations"):
                        saved = state_dict[f"{prefix}expert_modules.{k}.{buffer}"]
                        module.register_buffer(buffer, torch.empty_like(saved))
            mask = state_dict.get(f"{prefix}expert_mask")
            if mask is not None and int(mask.sum()) != self.weights.shape[-1]:
                n = int(mask.sum())
                self.weights = PyroParam(self.weights.new_full((n,), 1.0 / n).detach(),
                                         constraints.simplex)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fit(
        self,
        *args,
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
        **kwargs,
    ) -> FitResult:
        r"""The AMF-VI procedure from the model's unnormalized posterior ``p(x)``.

        1. Each parametric expert alone, from its own start ``init_loc + offset_k`` (see
           ``init_spread``): Adam(``lr``) on its own reparameterized ELBO
           ``E_{q_k}[log p(x) - log q_k(x)]`` (``num_particles`` draws, ``num_steps`` steps).
           ``log p`` is the model's log joint in the unconstrained space
           (:func:`~pyro_mixvi.guides.base.unconstrained_log_joint`: plates, factors,
           constrained sites and subsample scaling as in ``RBMixture_ELBO``). A non-finite loss
           stops that expert with a ``RuntimeWarning`` and it leaves the mixture (weight 0 in
           stage 2: its last finite parameters are untrained).
        2. RBIG (if in ``experts``): ``num_rbig_draws`` draws from the uniform mixture ``q`` of
           the trained parametric experts, importance weights ``p/q``, systematic resampling,
           then RBIG layers on the resampled points, as many as raise the importance-weighted
           log-likelihood of ``num_rbig_draws // 2`` fresh draws (resampled points repeat, so
           the training likelihood would keep rising). Resampling only reuses the proposal's
           draws, so RBIG cannot put mass where no parametric expert does: it sharpens their
           union towards ``p``, it does not find new modes.
        3. Weights. ``weight_update="elbo"`` (default): ``weight_batch_size`` draws of every
           expert (RBIG included), then ``pi`` maximizes the mixture ELBO estimated on them,
           ``sum_k pi_k mean_i [log p(x_ki) - log sum_j pi_j q_j(x_ki)]`` (concave in ``pi``;
           :func:`_elbo_optimal_weights`), so the mixture's ELBO is at least each expert's up
           to Monte Carlo error and an expert whose draws or density are non-finite, or whose
           draws have ``log p = -inf``, gets weight 0 and leaves the mixture. This replaces the
           paper's rule in the model setting: mode-seeking experts trained by reverse KL have
           a huge cross-entropy ``CE(p, q_k)`` whenever they miss a mode, so the EMA below
           gives them ~0 weight even when together they are the better mixture (two_moons,
           Pyro, 400 stage-1 steps: EMA weights (0.00, 0.00, 1.00), mixture ELBO -1.23; ELBO
           weights (0.52, 0.48, 0.00), ELBO -0.46). ``num_weight_steps`` and ``beta`` are then
           unused.
           ``"ema"``/``"responsibility"``: ``num_weight_steps`` steps of
           :func:`ema_weights_step` (``beta``, ``weight_update``), each on
           ``weight_batch_size`` fresh draws from the uniform mixture of the trained
           parametric experts (RBIG is scored on them but not sampled: its
           sampling inverts every layer by bisection, seconds per batch, and its support lies
           inside theirs) with self-normalized importance weights ``p / q_mix`` as
           ``sample_weights`` (the "fresh data" of the paper is the posterior, reached by
           importance sampling). With ``"ema"`` the weights move to
           ``pi_k ∝ exp(-CE(p, q_k))`` (cross-entropy of the posterior under expert ``k``), not
           to the ELBO-optimal weights; stage 3 moves them to the latter. An expert whose
           log-density is NaN on a batch gets weight exactly 0 and leaves the mixture.
        4. If ``num_joint_steps > 0``: Adam on every parameter by the Rao-Blackwellized
           mixture ELBO (what ``RBMixture_ELBO`` computes, ``num_particles`` draws per expert),
           with step ``lr / 10`` for the experts and ``lr`` for ``log pi``. The experts only
           fine-tune (a full step undoes part of stage 1), while the weights must move by O(1)
           in log space: stage 2 aims them at ``exp(-CE(p, q_k))``, which favours
           mass-covering experts, and the ELBO-optimal weights can be far from that.

        Args:
            *args: The model's positional arguments.
            num_steps: Stage-1 Adam steps per parametric expert; at least 1.
            lr: Stage-1 Adam learning rate (stage 3: ``lr / 10`` for the experts, ``lr``
                for the weights); positive.
            num_particles: Draws per ELBO estimate (stages 1 and 3); at least 1.
            num_rbig_draws: Importance-resampled draws RBIG is fit to.
            num_weight_steps: Stage-2 EMA steps; at least 1. Each costs ``weight_batch_size``
                model evaluations; at ``beta = 0.9`` fifty steps leave ``0.9**50 < 0.01`` of the
                uniform start (the from-samples ``FlowMixture.fit`` keeps the paper's 200).
            weight_batch_size: Proposal draws per stage-2 step.
            beta: EMA factor in ``[0, 1)``.
            weight_update: ``"elbo"`` (ELBO-optimal weights, see 3.), ``"ema"`` (the paper)
                or ``"responsibility"`` (see :func:`ema_weights_step`).
            num_joint_steps: Stage-3 steps; 0 skips stage 3.
            progress_bar: Show a tqdm bar per stage.
            **kwargs: The model's keyword arguments.

        Returns:
            A :class:`FitResult`. The guide holds the fitted mixture afterwards.

        Raises:
            ValueError: For an argument out of range (the message names it).
            FloatingPointError: If every parametric expert's loss turns non-finite (lower
                ``lr``), if ``log p`` is NaN at a draw, if no draw has finite importance
                weight, or if a stage-3 loss is non-finite.

        Example:
            >>> guide = AutoFlowMixture(model, experts=("maf", "realnvp", "rbig"))
            >>> result = guide.fit(data, num_steps=500, num_joint_steps=100)
            >>> result.weights, result.n_eff, result.expert_losses[0][-1]
        """
        _check_fit_args(num_steps=num_steps, lr=lr, num_particles=num_particles,
                        num_rbig_draws=num_rbig_draws, num_weight_steps=num_weight_steps,
                        weight_batch_size=weight_batch_size, beta=beta,
                        weight_update=weight_update, num_joint_steps=num_joint_steps)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        model = self._user_model[0]
        nesting = model_plate_nesting(model, args, kwargs)

        def log_p(x: Tensor) -> Tensor:
            return torch.cat([
                unconstrained_log_joint(model, self, chunk, args, kwargs,
                                        max_plate_nesting=nesting)
                for chunk in x.split(_LOG_P_CHUNK)
            ])

        losses, healthy = self._fit_experts(log_p, num_steps, lr, num_particles, progress_bar)
        self._fit_rbig(log_p, healthy, num_rbig_draws, progress_bar)
        weights = self._fit_weights(log_p, healthy, num_weight_steps, weight_batch_size, beta,
                                    weight_update, progress_bar)
        joint = self._fit_joint(model, args, kwargs, nesting, num_joint_steps, lr,
                                num_particles, progress_bar)
        final = weights.new_zeros(len(self.experts))
        final[self.expert_mask] = self.weights.detach()
        return FitResult(tuple(losses), final, 1.0 / final.square().sum(), joint)

    def _fit_experts(self, log_p, num_steps, lr, num_particles, progress_bar):  # noqa: ANN001, ANN202
        """Stage 1: every parametric expert alone by its own ELBO, from its own start (the
        init location plus its spread offset); returns losses, health."""
        parametric = [k for k, name in enumerate(self.experts) if name != "rbig"]
        loc = self._init_loc().detach()
        with torch.no_grad():
            for k, offset in zip(parametric, _spread_offsets(len(parametric), loc,
                                                             self._init_spread), strict=True):
                self.expert_modules[k].loc.copy_(loc + offset)
        losses, healthy = [], []
        for k, name in enumerate(self.experts):
            if name == "rbig":
                losses.append(self.weights.new_zeros(0).detach())
                healthy.append(False)  # set by stage 1b once fit
                continue
            module = self.expert_modules[k]
            optimizer = torch.optim.Adam(_param_groups(module, lr))
            history = []
            bar = tqdm(range(num_steps), desc=f"stage 1 ({name} #{k})", disable=not progress_bar)
            for step in bar:
                x, log_q = module().rsample_and_log_prob((num_particles,))
                finite = bool(torch.isfinite(x).all() and torch.isfinite(log_q).all())
                loss = (log_q - log_p(x)).mean() if finite else log_q.new_tensor(math.nan)
                if not torch.isfinite(loss):
                    warnings.warn(
                        f"expert {k} ({name}): non-finite stage-1 loss at step {step}; it stops "
                        "training and leaves the mixture (lower lr if this recurs)",
                        RuntimeWarning, stacklevel=3,
                    )
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                history.append(loss.detach())
                bar.set_postfix(loss=f"{loss.item():.3f}")
            else:
                healthy.append(True)
                losses.append(torch.stack(history))
                continue
            healthy.append(False)
            losses.append(torch.stack(history) if history else self.weights.new_zeros(0).detach())
        if not any(healthy):
            raise FloatingPointError(
                "every parametric expert's stage-1 loss turned non-finite; lower lr (now the "
                "same for all experts) or check the model's log density at the init location"
            )
        return losses, healthy

    def _proposal(self, members: Sequence[int]) -> FlowMixture:
        experts = [self.expert_modules[k] for k in members]
        return FlowMixture(experts, self.weights.new_ones(len(experts)).detach())

    @torch.no_grad()
    def _importance_draws(self, log_p, members: Sequence[int], num: int):  # noqa: ANN001, ANN202
        """``num`` draws from the uniform mixture of ``members``; self-normalized log-weights."""
        proposal = self._proposal(members)
        x = proposal.sample((num,))
        log_target = log_p(x)
        if torch.isnan(log_target).any():
            raise FloatingPointError(
                "log p(x) is NaN at a draw of the experts; the model's log density must be "
                "finite or -inf on the unconstrained space"
            )
        log_w = log_target - proposal.log_prob(x)
        if not torch.isfinite(log_w).any() or torch.isnan(log_w).any():
            raise FloatingPointError(
                "no draw of the experts has a finite importance weight p/q; stage 1 did not "
                "reach the posterior (raise num_steps or lower lr)"
            )
        return x, log_w - torch.logsumexp(log_w, 0)

    def _fit_rbig(self, log_p, healthy: list[bool], num_draws: int, progress_bar: bool) -> None:  # noqa: ANN001
        """Stage 1b: RBIG fit to systematic-resampled importance draws of the trained experts."""
        members = [k for k, ok in enumerate(healthy) if ok]
        options = {**_RBIG_OPTIONS, **self.expert_kwargs.get("rbig", {})}
        for k, name in enumerate(self.experts):
            if name != "rbig":
                continue
            x, log_w = self._importance_draws(log_p, members, num_draws)
            resampled = x[_systematic_resample(log_w, num_draws)]
            if not bool((resampled != resampled[0]).any(0).all()):  # a coordinate with one value
                warnings.warn(_RBIG_DEGENERATE, RuntimeWarning, stacklevel=3)
                continue
            held, held_log_w = self._importance_draws(log_p, members, max(num_draws // 2, 2))
            rbig = _fit_rbig_held_out(resampled, held, held_log_w, options, progress_bar)
            self.expert_modules[k] = rbig
            with torch.no_grad():
                healthy[k] = bool(torch.isfinite(rbig().log_prob(resampled)).all())
            if not healthy[k]:
                warnings.warn(f"expert {k} (rbig): non-finite log-density at its training "
                              "draws; it leaves the mixture", RuntimeWarning, stacklevel=3)

    def _fit_weights(self, log_p, healthy, num_steps, batch_size, beta, weight_update,  # noqa: ANN001
                     progress_bar) -> Tensor:  # noqa: ANN001
        """Stage 2: weights over every expert (ELBO-optimal, or the EMA on importance batches)."""
        members = [k for k, ok in enumerate(healthy) if ok and self.experts[k] != "rbig"]
        # An expert whose stage-1 loss went non-finite stopped at its last finite parameters:
        # finite, but untrained and possibly wild in the tails. It gets weight 0.
        fitted = [k for k, ok in enumerate(healthy) if ok]
        if weight_update == "elbo":
            return self._fit_elbo_weights(log_p, fitted, batch_size, progress_bar)
        # A diverged expert's log-density is NaN, which ema_weights_step turns into weight 0;
        # argument validation would raise on its NaN base point first, so it is off here.
        with pyro.validation_enabled(False):
            dists = [self.expert_modules[k]() for k in fitted]
        state = ema_weights_init(len(fitted), like=self.weights.detach())
        bar = tqdm(range(num_steps), desc="stage 2 (weights)", disable=not progress_bar)
        for _ in bar:
            x, log_w = self._importance_draws(log_p, members, batch_size)
            with torch.no_grad(), pyro.validation_enabled(False):
                log_lik = torch.stack([d.log_prob(x) for d in dists])
            state, info = ema_weights_step(state, log_lik, beta=beta, weight_update=weight_update,
                                           sample_weights=log_w.exp())
            bar.set_postfix(n_eff=f"{info.n_eff.item():.2f}")
        weights = state.weights.new_zeros(len(self.experts))
        weights[fitted] = state.weights
        self.expert_mask.copy_(weights > 0)
        self.weights = PyroParam(weights[weights > 0] / weights.sum(), constraints.simplex)
        return weights

    def _fit_elbo_weights(self, log_p, fitted: list[int], batch_size: int,  # noqa: ANN001
                          progress_bar: bool) -> Tensor:
        """Stage 2, ``"elbo"``: ``pi`` maximizing the mixture ELBO on fixed draws of each expert."""
        with torch.no_grad(), pyro.validation_enabled(False):
            dists = [self.expert_modules[k]() for k in fitted]
            bar = tqdm(dists, desc="stage 2 (expert draws)", disable=not progress_bar)
            x = torch.stack([d.sample((batch_size,)) for d in bar])  # (K, B, D)
            finite_x = torch.isfinite(x).all(-1)
            safe = torch.where(finite_x[..., None], x, torch.zeros_like(x))
            log_q = torch.stack([d.log_prob(safe) for d in dists], -1)  # (K, B, K)
            log_target = log_p(safe.reshape(-1, x.shape[-1])).reshape(x.shape[:2])
        own = log_q.diagonal(dim1=0, dim2=2).T  # (K, B): expert k's density at its own draws
        usable = (finite_x & torch.isfinite(own) & torch.isfinite(log_target)).all(-1)
        if not bool(usable.any()):
            raise FloatingPointError(
                "stage 2: every expert has a non-finite draw, own log-density or log p at its "
                "draws; lower lr or check the model's log density"
            )
        weights = log_target.new_zeros(len(self.experts))
        weights[[k for k, ok in zip(fitted, usable.tolist(), strict=True) if ok]] = (
            _elbo_optimal_weights(log_target[usable], log_q[usable][..., usable])
        )
        self.expert_mask.copy_(weights > 0)
        self.weights = PyroParam(weights[weights > 0], constraints.simplex)
        return weights

    def _fit_joint(self, model, args, kwargs, nesting, num_steps, lr, num_particles,  # noqa: ANN001
                   progress_bar) -> Tensor:  # noqa: ANN001
        """Stage 3: every parameter by the Rao-Blackwellized mixture ELBO."""
        history = []
        if num_steps == 0:
            return self.weights.new_zeros(0).detach()
        self(*args, **kwargs)  # register the current parameters with the param store
        named = dict(self.named_parameters())
        groups = [{"params": [named.pop("weights_unconstrained")], "lr": lr}]
        for module in self.expert_modules:
            if isinstance(module, StandardizedFlow):
                groups += [{**g, "lr": g["lr"] / 10} for g in _param_groups(module, lr)]
        optimizer = torch.optim.Adam(groups)
        bar = tqdm(range(num_steps), desc="stage 3 (joint)", disable=not progress_bar)
        for step in bar:
            loss = -rb_mixture_particle_elbos(
                model, self, args, kwargs, num_particles=num_particles, max_plate_nesting=nesting
            ).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"stage 3: non-finite mixture ELBO at step {step}; lower lr or skip it "
                    "(num_joint_steps=0)"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.detach())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        return torch.stack(history)


def _elbo_optimal_weights(log_target: Tensor, log_q: Tensor, num_iters: int = 500,
                          step: float = 0.05) -> Tensor:
    r"""Mixture weights maximizing the ELBO estimated on fixed draws of each expert.

    .. math:: \hat L(\pi) = \sum_k \pi_k \frac1B \sum_i \Big[\log p(x_{ki})
              - \log \sum_j \pi_j q_j(x_{ki})\Big], \qquad x_{ki} \sim q_k

    ``L`` is concave in ``pi`` (``sum_k pi_k E_k[log p]`` is linear and the mixture's entropy
    is concave), and every vertex (a single expert) is feasible, so the maximum is at least
    each expert's own ELBO estimate. Solved by Adam on ``log pi`` (softmax), ``num_iters``
    steps of size ``step`` (K numbers: negligible next to the model evaluations).

    Shapes:
        ``log_target``: ``(K, B)`` log p at expert ``k``'s draws; ``log_q``: ``(K, B, K)``,
        ``log_q[k, i, j] = log q_j(x_ki)``. Returns ``pi`` ``(K,)``.
    """
    logits = log_target.new_zeros(log_q.shape[-1]).requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=step)
    log_target, log_q = log_target.detach(), log_q.detach()
    for _ in range(num_iters):
        log_pi = logits.log_softmax(0)
        log_mix = torch.logsumexp(log_pi + log_q, -1)  # (K, B)
        elbo = (log_pi.exp() * (log_target - log_mix).mean(-1)).sum()
        optimizer.zero_grad()
        (-elbo).backward()
        optimizer.step()
    return logits.detach().softmax(0)


def _fit_rbig_held_out(train: Tensor, held: Tensor, held_log_w: Tensor, options: dict,
                       progress_bar: bool) -> RBIG:
    """RBIG layers on ``train`` while the importance-weighted held-out log-likelihood rises.

    Resampled training points repeat (systematic resampling copies heavy draws), and RBIG's
    training log-likelihood keeps rising on repeats, so the layer count is chosen on fresh
    importance draws instead: ``sum_i w_i log q_L(x_i)`` estimates ``E_p[log q_L]``. Layers are
    added until it has not improved by ``tol`` for ``patience`` layers; the best prefix is kept.
    """
    state = rbig_init(train, num_knots=options["num_knots"],
                      bandwidth_factor=options["bandwidth_factor"])
    weights = held_log_w.exp()
    z, log_det = held.detach(), held.new_zeros(held.shape[0])
    best, best_layers, stalled = -math.inf, 1, 0
    bar = tqdm(range(options["max_layers"]), desc="stage 1b (rbig)", disable=not progress_bar)
    with torch.no_grad():
        for layer in bar:
            state, _ = rbig_step(state, rotation=options["rotation"])
            centers, bandwidth, rotation = state.layers[-1]
            u, ladj = marginal_gaussianize(z, centers, bandwidth)
            z, log_det = u @ rotation, log_det + ladj.sum(-1)
            log_q = -0.5 * z.square().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
            score = float((weights * (log_q + log_det)).sum())
            bar.set_postfix(held_out=f"{score:.4f}")
            if score > best + options["tol"]:
                best, best_layers, stalled = score, layer + 1, 0
            else:
                stalled += 1
            if stalled >= options["patience"]:
                break
    return RBIG.from_state(state._replace(layers=state.layers[:best_layers]))


_RBIG_DEGENERATE = ("stage 1b: the importance-resampled draws repeat one value in some "
                    "coordinate (degenerate weights p/q), so RBIG cannot be fit; it leaves the "
                    "mixture (more stage-1 steps or num_rbig_draws help)")


def _systematic_resample(log_weights: Tensor, num: int) -> Tensor:
    """Indices of ``num`` systematic-resampling draws from normalized ``log_weights``."""
    cdf = torch.cumsum(log_weights.exp(), 0)
    u = (torch.rand((), dtype=cdf.dtype, device=cdf.device)
         + torch.arange(num, dtype=cdf.dtype, device=cdf.device)) / num
    return torch.searchsorted(cdf / cdf[-1], u).clamp(max=len(cdf) - 1)


def _check_fit_args(*, num_steps, lr, num_particles, num_rbig_draws, num_weight_steps,  # noqa: ANN001
                    weight_batch_size, beta, weight_update, num_joint_steps) -> None:  # noqa: ANN001
    for name, value, low in (("num_steps", num_steps, 1), ("num_particles", num_particles, 1),
                             ("num_rbig_draws", num_rbig_draws, 2),
                             ("num_weight_steps", num_weight_steps, 1),
                             ("weight_batch_size", weight_batch_size, 1),
                             ("num_joint_steps", num_joint_steps, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1); got {beta}")
    if weight_update not in ("elbo", "ema", "responsibility"):
        raise ValueError(
            f"weight_update must be 'elbo', 'ema' or 'responsibility'; got {weight_update!r}"
        )
