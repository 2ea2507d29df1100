"""AISIVI and BSIVI on WAVEFORM logistic regression (D = 22) against NUTS, with the baselines.

Both SIVI guides are ``AutoSIVI`` with every constructor argument explicit (:data:`RECIPE_GUIDE`:
``mixing_dim = 22``, hidden ``(128, 128)``, ``init_mixing_fraction = 0.5``), trained by
``SIVI_ELBO`` with ``k`` importance draws and ClippedAdam (:data:`RECIPE_OPTIM`: lr 1e-2 for the
guide, 1e-3 for AISIVI's flow proposal, both decayed exponentially to 1/100); ``AISIVI`` has the
conditional RealNVP proposal, ``BSIVI`` the prior. :func:`run` fits them and ``AutoNormal``,
``AutoMultivariateNormal`` and ``AutoIAFNormal`` (the built-in flow guide) at one
:class:`~benchmarks.harness.Budget` (:data:`BUDGET`: every row's learning rate decays to 1/100)
and scores them as :mod:`benchmarks.waveform` does: max standardized mean error and sd ratios
vs the 10000 NUTS draws, log evidence vs -150.39 (``log q`` with ``k_eval`` draws for SIVI),
fit seconds, peak memory, plus the Monte Carlo floor of the accuracy columns
(:func:`noise_floor`). Results: ``benchmarks/results/sivi_waveform/waveform-<backend>.*``.

:func:`time_to_accuracy` (``--time-to-accuracy``) fits AISIVI and BSIVI (Pyro) with the recipe
and checks every ``eval_every`` steps, on 10000 guide draws, whether they are at NUTS level (max
standardized mean error < 0.1 and every sd ratio in [0.9, 1.1]); it reports the CPU seconds and
steps at which the bar is first met and held at the next checks, and writes
``sivi_waveform_time_to_accuracy.json``/``.md``.

:func:`diagnose` (``--diagnose``) fits AISIVI once and prints, per check, the accuracy and
:func:`proposal_diagnostics` (flow-proposal fit, dead ReLUs, own-draw bias of ``log q``).

Example:
    $ python -m benchmarks.sivi_waveform --quick
    $ python -m benchmarks.sivi_waveform --diagnose --k 128 --proposal-lr 0.01
    $ python -m benchmarks.sivi_waveform --seeds 0 1
    $ python -m benchmarks.sivi_waveform --time-to-accuracy
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import report, waveform
from benchmarks.guides import available_guides, register_guide
from benchmarks.harness import Budget, backend_module, importance_summary
from mixvi.bench_data import WAVEFORM_LOG_EVIDENCE, load_waveform
from mixvi.metrics import compare_to_reference, sd_ratio, standardized_mean_error

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal")
SEEDS = (0, 1)
#: Every row's budget: the recipe's steps, particles and learning-rate decay (to 1/100).
BUDGET = Budget(
    num_steps=8000, num_particles=4, learning_rate=1e-2, num_draws=4000, final_lr_factor=1e-2
)
#: Importance draws of the SIVI score in training (``k``) and of ``log q`` for log Z and k̂.
K, K_EVAL = 1024, 2048
QUICK_BUDGET = Budget(
    num_steps=200, num_particles=4, learning_rate=1e-2, num_draws=500, final_lr_factor=1e-2
)


def register(backend: str, *, k: int = K, k_eval: int = K_EVAL) -> list[str]:
    """Register ``AISIVI`` and ``BSIVI`` with :data:`RECIPE_GUIDE` for ``backend`` (the harness
    trains them with one learning rate: used for NumPyro); returns their names."""
    names = []
    for name, proposal in (("AISIVI", "flow"), ("BSIVI", "prior")):
        register_guide(
            name, backend, f"{backend}_mixvi:AutoSIVI", elbo=f"{backend}_mixvi:SIVI_ELBO",
            elbo_options={"num_importance_samples": k}, proposal=proposal,
            num_importance_samples=k_eval, **RECIPE_GUIDE,
        )  # fmt: skip
        names.append(name)
    return names


def run(
    *,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    output_dir: str | os.PathLike | None = None,
    backend: str = "pyro",
    guides: Sequence[str] | None = None,
    budget: Budget | None = None,
    k: int = K,
    k_eval: int = K_EVAL,
    proposal_lr: float | None = None,
) -> dict[str, Any]:
    """SIVI and baselines on WAVEFORM at one budget; see the module docstring.

    Pyro's AISIVI/BSIVI rows are fitted by :func:`fit_sivi` (the recipe's optimizer, with the
    budget's steps, particles, learning rate and final factor); the other rows, and every row
    under NumPyro, by :func:`benchmarks.harness.evaluate`.
    """
    import numpy as np

    budget = budget or (QUICK_BUDGET if quick else BUDGET)
    seeds = tuple(seeds or ((0,) if quick else SEEDS))
    names = register(backend, k=k, k_eval=k_eval)
    guides = list(guides) if guides else [*names, *BASELINES]
    command = (
        f"python -m benchmarks.sivi_waveform{' --quick' if quick else ''} --backend "
        f"{backend} --guides {' '.join(guides)} --seeds {' '.join(map(str, seeds))} "
        f"--steps {budget.num_steps} --particles {budget.num_particles} --lr "
        f"{budget.learning_rate:g} --final-lr-factor {budget.final_lr_factor:g} --draws "
        f"{budget.num_draws} --k {k}"
    )
    metadata = report.metadata(command)
    wave = load_waveform()
    impl = backend_module(backend)
    specs, skipped = available_guides(backend, guides)
    runs = []
    for spec in specs:
        for seed in seeds:
            if backend == "pyro" and spec.name in names:
                row = _sivi_row(
                    spec.name, wave, budget, seed, k=k, k_eval=k_eval, proposal_lr=proposal_lr
                )
            else:
                row = waveform._one_run(impl, wave, {"w": wave["nuts"]}, spec, budget, seed)
            print(
                json.dumps(
                    {
                        key: value
                        for key, value in row.items()
                        if isinstance(value, (int, float, str))
                    }
                ),
                flush=True,
            )
            runs.append(row)
    results = {
        "benchmark": waveform.NAME, "metadata": metadata, "backend": backend, "quick": quick,
        "budget": budget._asdict(), "seeds": list(seeds), "guides": [s.name for s in specs],
        "skipped": {"guides": skipped}, "reference_log_evidence": WAVEFORM_LOG_EVIDENCE,
        "sivi_recipe": {"guide": RECIPE_GUIDE, "k": k, "k_eval": k_eval,
                        "optim": {**RECIPE_OPTIM, "learning_rate": budget.learning_rate,
                                  "final_lr_factor": budget.final_lr_factor,
                                  **({"proposal_lr": proposal_lr} if proposal_lr else {})}},
        "noise_floor": noise_floor(budget.num_draws, wave["nuts"]),
        "nuts": waveform.predictive(wave["nuts"], wave["X_test"], wave["y_test"]),
        "runs": runs, "summary": report.aggregate(runs, ("guide",), waveform.METRICS),
    }  # fmt: skip
    out = Path(output_dir) if output_dir else RESULTS / ("quick" if quick else "") / "sivi_waveform"
    has_numbers = any(np.isfinite(r["sliced_w2"]["mean"]) for r in results["summary"])
    report.write_results(
        waveform.results_name(backend), results, out,
        waveform.markdown(results, with_plot=has_numbers) + _floor_note(results),
        plot=(lambda path: waveform.plot(results, path)) if has_numbers else None,
    )  # fmt: skip
    return results


def _floor_note(results: dict) -> str:
    floor, recipe = results["noise_floor"], results["sivi_recipe"]
    return (
        f"\nAISIVI/BSIVI: AutoSIVI {recipe['guide']}, SIVI_ELBO k = {recipe['k']} (log q for "
        f"log Z and k̂: k = {recipe['k_eval']}), ClippedAdam {recipe['optim']}. Every row: "
        f"lr decayed exponentially to {results['budget']['final_lr_factor']:g}x. Monte Carlo "
        f"floor of the accuracy columns with {floor['num_draws']} exact draws: max "
        f"standardized mean error median {floor['max_mean_error_median']:.3f} (95%: "
        f"{floor['max_mean_error_p95']:.3f}), max |sd ratio - 1| median "
        f"{floor['max_sd_deviation_median']:.3f} (95%: {floor['max_sd_deviation_p95']:.3f}).\n"
    )


def _sivi_row(
    name: str,
    wave: dict,
    budget: Budget,
    seed: int,
    *,
    k: int,
    k_eval: int,
    proposal_lr: float | None,
) -> dict[str, Any]:
    """One Pyro AISIVI/BSIVI fit by :func:`fit_sivi`, scored as :func:`waveform._one_run` does."""
    import numpy as np

    from benchmarks import _pyro
    from benchmarks.memory import PeakMemory

    row: dict[str, Any] = {"guide": name, "seed": seed}
    optim = {"learning_rate": budget.learning_rate, "final_lr_factor": budget.final_lr_factor}
    if proposal_lr:
        optim["proposal_lr"] = proposal_lr
    with PeakMemory() as peak:
        start = time.perf_counter()
        guide, args, cpu, _ = fit_sivi(
            "flow" if name == "AISIVI" else "prior", num_steps=budget.num_steps,
            num_particles=budget.num_particles, k=k, k_eval=k_eval, seed=seed,
            optim_options=optim,
        )  # fmt: skip
        fit_seconds = time.perf_counter() - start
    fitted = _pyro.Fitted(_pyro.blr_model, guide, args, {}, np.zeros(0))
    draws, log_weights = _pyro.draws_and_log_weights(fitted, budget.num_draws, seed + 1)
    weights = draws["w"].reshape(len(draws["w"]), -1)
    row.update(compare_to_reference({"w": weights}, {"w": wave["nuts"]}, seed=seed))
    row.update(importance_summary(log_weights))
    row.update(
        fit_seconds=fit_seconds,
        fit_cpu_seconds=cpu,
        peak_memory_mb=peak.megabytes,
        log_evidence_error=row["log_evidence"] - WAVEFORM_LOG_EVIDENCE,
        **waveform.predictive(weights, wave["X_test"], wave["y_test"]),
    )
    return row


#: The AutoSIVI recipe every SIVI fit here uses, with each constructor argument explicit (the
#: guide's defaults may change). ``mixing_dim = 22 = D``: an affine ``mu(eps)`` with ``m < D``
#: gives a rank-``m``-plus-diagonal covariance, whose best reverse-KL fit to the NUTS covariance
#: has smallest sd ratio 0.82 at ``m = 10`` and 0.96 at ``m = 15`` (:func:`low_rank_bound`).
RECIPE_GUIDE = {
    "mixing_dim": 22, "hidden_dims": (128, 128), "conditional_scale": False,
    "init_mixing_fraction": 0.5, "num_proposal_transforms": 4,
    "proposal_hidden_dims": (64, 64), "proposal_batch_size": 128, "chunk_size": 128,
    "init_scale": 0.1,
}  # fmt: skip
#: Optimizer of the recipe: ClippedAdam, ``learning_rate`` for the guide, ``proposal_lr`` for the
#: flow proposal, both decayed exponentially to ``final_lr_factor`` of themselves over
#: ``num_steps``. (Before the guide's hidden-layer scaling, commit 1cef00a, the proposal's ReLUs
#: died within 300 steps at 1e-2 and it stayed the prior; since then 1e-2 fits as well as 1e-3.)
RECIPE_OPTIM = {"learning_rate": 1e-2, "proposal_lr": 1e-3, "final_lr_factor": 1e-2,
                "clip_norm": 100.0}  # fmt: skip
#: Command-line flags whose names differ from the optimizer keywords they set.
_FLAGS = {"learning_rate": "lr"}
NUTS_LEVEL = {"max_mean_error": 0.1, "min_sd_ratio": 0.9, "max_sd_ratio": 1.1}


def _sivi_guide(model, proposal: str, k: int, k_eval: int, guide_options: dict):
    from pyro_mixvi import AutoSIVI

    return AutoSIVI(model, proposal=proposal, num_importance_samples=k_eval, **guide_options)


def _optim(
    num_steps: int,
    learning_rate: float,
    proposal_lr: float,
    final_lr_factor: float,
    clip_norm: float,
):
    from pyro.optim import ClippedAdam

    decay = final_lr_factor ** (1.0 / num_steps)

    def per_parameter(module_name: str, param_name: str) -> dict:
        lr = proposal_lr if "proposal_flow" in module_name else learning_rate
        return {"lr": lr, "lrd": decay, "clip_norm": clip_norm}

    return ClippedAdam(per_parameter)


def low_rank_bound(mixing_dim: int, nuts, *, num_steps: int = 6000, seed: int = 0) -> dict:
    """Best Gaussian ``N(m, J J^T + diag(d))``, ``J`` of rank ``mixing_dim``, to the NUTS moments.

    An affine ``mu(eps)`` with ``m = mixing_dim`` noise dimensions and a diagonal ``sigma`` is
    exactly this family, so its reverse KL to ``N(mean, cov)`` of the NUTS draws (minimized by
    Adam) and the sd ratios of the minimizer show what ``mixing_dim`` alone allows.
    Returns ``{"mixing_dim", "kl", "min_sd_ratio", "num_sd_below_0.9"}``.
    """
    import numpy as np
    import torch

    target = torch.as_tensor(np.cov(nuts.T), dtype=torch.float64)
    precision, dim = torch.linalg.inv(target), target.shape[0]
    generator = torch.Generator().manual_seed(seed)
    factor = 0.1 * torch.randn(dim, mixing_dim, generator=generator, dtype=torch.float64)
    factor.requires_grad_(True)
    log_diag = torch.full((dim,), -3.0, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([factor, log_diag], lr=1e-2)
    for _ in range(num_steps):
        cov = factor @ factor.T + torch.diag(log_diag.exp())
        kl = 0.5 * (torch.trace(precision @ cov) - torch.logdet(cov) + torch.logdet(target) - dim)
        optimizer.zero_grad()
        kl.backward()
        optimizer.step()
    ratio = (cov.detach().diag() / target.diag()).sqrt()
    return {"mixing_dim": mixing_dim, "kl": float(kl.detach()), "min_sd_ratio": float(ratio.min()),
            "num_sd_below_0.9": int((ratio < 0.9).sum())}  # fmt: skip


def accuracy(draws, nuts) -> dict[str, float]:
    """Max standardized mean error and sd-ratio range of ``draws (S, 22)`` against NUTS, and
    whether they are at NUTS level (:data:`NUTS_LEVEL`)."""
    error, ratio = standardized_mean_error(draws, nuts), sd_ratio(draws, nuts)
    row = {"max_mean_error": float(error.max()), "worst_mean": int(error.argmax()),
           "min_sd_ratio": float(ratio.min()), "worst_low_sd": int(ratio.argmin()),
           "max_sd_ratio": float(ratio.max()),
           "num_sd_outside": int(((ratio < NUTS_LEVEL["min_sd_ratio"])
                                  | (ratio > NUTS_LEVEL["max_sd_ratio"])).sum())}  # fmt: skip
    row["nuts_level"] = bool(row["max_mean_error"] < NUTS_LEVEL["max_mean_error"]
                             and row["min_sd_ratio"] >= NUTS_LEVEL["min_sd_ratio"]
                             and row["max_sd_ratio"] <= NUTS_LEVEL["max_sd_ratio"])  # fmt: skip
    return row


def noise_floor(num_draws: int, nuts, *, repeats: int = 200, seed: int = 0) -> dict[str, float]:
    """Monte Carlo floor of the two criteria for ``num_draws`` exact posterior draws.

    Scores ``num_draws`` draws against ``len(nuts)`` independent draws (the NUTS draws' bulk ESS
    is 9000-10200 of 10000, so they count as independent), both from the Gaussian with the NUTS
    mean and covariance, ``repeats`` times: median and 95th percentile of the max standardized
    mean error and of the largest ``|sd ratio - 1|`` over the 22 coordinates.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    mean, cov = nuts.mean(0), np.cov(nuts.T)
    errors, deviations = [], []
    for _ in range(repeats):
        draws = rng.multivariate_normal(mean, cov, size=num_draws)
        reference = rng.multivariate_normal(mean, cov, size=len(nuts))
        errors.append(standardized_mean_error(draws, reference).max())
        deviations.append(np.abs(sd_ratio(draws, reference) - 1).max())
    return {"num_draws": num_draws, "max_mean_error_median": float(np.median(errors)),
            "max_mean_error_p95": float(np.quantile(errors, 0.95)),
            "max_sd_deviation_median": float(np.median(deviations)),
            "max_sd_deviation_p95": float(np.quantile(deviations, 0.95))}  # fmt: skip


def fit_sivi(
    proposal: str,
    *,
    num_steps: int,
    num_particles: int = 4,
    k: int = K,
    k_eval: int = K_EVAL,
    seed: int = 0,
    guide_options: dict | None = None,
    optim_options: dict | None = None,
    check_every: int | None = None,
    check=None,
) -> tuple[Any, tuple, float, float]:
    """Fit AutoSIVI (Pyro) with :data:`RECIPE_GUIDE`/:data:`RECIPE_OPTIM` (overridable).

    ``check(guide, args, step, cpu_seconds, wall_seconds, loss)`` runs every ``check_every``
    steps (its time is not counted) and stops the fit by returning True. Returns ``(guide, args,
    cpu_seconds, wall_seconds)`` of training.
    """
    import pyro
    import torch
    from pyro.infer import SVI

    from benchmarks import _pyro
    from pyro_mixvi import SIVI_ELBO

    torch.set_num_threads(1)
    wave = load_waveform()
    args, _ = _pyro.blr_args(wave["X_train"], wave["y_train"])
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = _sivi_guide(
        _pyro.blr_model, proposal, k, k_eval, {**RECIPE_GUIDE, **(guide_options or {})}
    )
    optim = _optim(num_steps, **{**RECIPE_OPTIM, **(optim_options or {})})
    elbo = SIVI_ELBO(
        num_particles=num_particles, num_importance_samples=k, vectorize_particles=True
    )
    svi = SVI(_pyro.blr_model, guide, optim, elbo)
    cpu = wall = 0.0
    for step in range(1, num_steps + 1):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        loss = svi.step(*args)
        cpu += time.process_time() - cpu_start
        wall += time.perf_counter() - wall_start
        if not math.isfinite(loss):
            raise FloatingPointError(f"AutoSIVI on WAVEFORM: loss {loss} at step {step}")
        if check_every and step % check_every == 0 and check(guide, args, step, cpu, wall, loss):
            break
    return guide, args, cpu, wall


def time_to_accuracy(
    *,
    guides: Sequence[str] = ("AISIVI", "BSIVI"),
    num_steps: int = 8000,
    num_particles: int = 4,
    k: int = K,
    eval_every: int = 500,
    num_draws: int = 10000,
    hold: int = 2,
    max_cpu_seconds: float = math.inf,
    seed: int = 0,
    learning_rate: float | None = None,
    proposal_lr: float | None = None,
    final_lr_factor: float | None = None,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """CPU seconds and steps until AISIVI / BSIVI (Pyro) reach NUTS-level accuracy on WAVEFORM.

    Each guide is fitted with the recipe (:data:`RECIPE_GUIDE`, :data:`RECIPE_OPTIM`; the
    learning rate decays over ``num_steps``); every ``eval_every`` steps ``num_draws`` exact guide
    draws are compared with the NUTS draws (evaluation time not counted). The bar (max
    standardized mean error < 0.1, every sd ratio in [0.9, 1.1]) is *reached* at the first check
    that meets it and the ``hold`` checks after it do too; the fit stops ``hold`` checks after
    that, at ``num_steps`` or after ``max_cpu_seconds`` of training.
    """
    wave = load_waveform()
    overrides = {key: value for key, value in (
        ("learning_rate", learning_rate), ("proposal_lr", proposal_lr),
        ("final_lr_factor", final_lr_factor)) if value is not None}  # fmt: skip
    optim = {**RECIPE_OPTIM, **overrides}
    meta = report.metadata(
        "python -m benchmarks.sivi_waveform --time-to-accuracy "
        f"--guides {' '.join(guides)} --steps {num_steps} --particles {num_particles} "
        f"--k {k} --seeds {seed}"
        + "".join(f" --{_FLAGS.get(key, key.replace('_', '-'))} {value:g}"
                  for key, value in overrides.items())
    )
    result = {"meta": meta, "guide_options": RECIPE_GUIDE, "optim": optim, "k": k,
              "num_particles": num_particles, "num_steps": num_steps, "seed": seed,
              "num_draws": num_draws, "hold": hold, "nuts_level": NUTS_LEVEL,
              "noise_floor": noise_floor(num_draws, wave["nuts"]), "guides": {}}  # fmt: skip
    for name in guides:
        checkpoints: list[dict] = []

        def check(guide, args, step, cpu, wall, loss, checkpoints=checkpoints, name=name):
            import torch

            with torch.no_grad():
                draws = guide.get_posterior(*args).sample((num_draws,))
            row = {
                "step": step,
                "cpu_seconds": cpu,
                "wall_seconds": wall,
                "loss": loss,
                **accuracy(draws.double().numpy(), wave["nuts"]),
            }
            checkpoints.append(row)
            print(json.dumps({"guide": name, **row}), flush=True)
            streak = _streak_start(checkpoints, hold)
            return (streak is not None and len(checkpoints) - 1 - streak >= hold) or (
                cpu >= max_cpu_seconds
            )

        fit_sivi(
            "flow" if name == "AISIVI" else "prior",
            num_steps=num_steps,
            num_particles=num_particles,
            k=k,
            seed=seed,
            optim_options=overrides,
            check_every=eval_every,
            check=check,
        )
        start = _streak_start(checkpoints, hold)
        held = start is not None and len(checkpoints) - 1 - start >= hold
        result["guides"][name] = {"reached": checkpoints[start] if held else None,
                                  "checkpoints": checkpoints}  # fmt: skip
    out = Path(output_dir) if output_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "sivi_waveform_time_to_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "sivi_waveform_time_to_accuracy.md").write_text(_tta_markdown(result))
    return result


def proposal_diagnostics(guide, args, *, num_pairs: int = 2000, k: int = 1024) -> dict:
    """Why AISIVI's ``log q`` is biased: how well its flow proposal fits ``q(eps | z)``.

    On ``num_pairs`` joint draws ``(eps, z)``: the proposal's ``-log tau(eps | z)`` against the
    prior's entropy (no information) and against a linear-Gaussian regression of ``eps`` on the
    proposal's context (a floor any decent proposal reaches); the number of ReLUs of each
    coupling network that are off for every pair (dead); and the *own-draw gap*, the mean of
    ``log q_hat`` with the draw's own ``eps`` among the ``k`` importance draws minus without it
    (0 for a perfect proposal; the training score is biased towards the conditional score,
    i.e. towards less mixing, by about that much).
    """
    import torch

    post = guide.get_posterior(*args)
    with torch.no_grad(), guide.score_options(num_importance_samples=k):
        z, eps = post.rsample_with_mixing((num_pairs,))
        post_k = guide.get_posterior(*args)
        with_own, _ = post_k.importance_score(z[:256], eps[:256])
        without, _ = post_k.importance_score(z[:256], None)
        row = {"own_draw_gap": float((with_own - without).mean())}
        if post.proposal is None:
            return row
        generator = guide.generator
        context = (z - generator.loc) / torch.nn.functional.softplus(generator.raw_scale)
        dead = []
        for transform in guide.proposal_flow.transform.transforms:
            hidden = torch.cat([eps[:, transform.mask], context], -1)
            for layer in transform.hyper:
                hidden = layer(hidden)
                if isinstance(layer, torch.nn.ReLU):
                    dead.append(int(((hidden > 0).sum(0) == 0).sum()))
        design = torch.cat([context, torch.ones_like(context[:, :1])], -1).double()
        residual = eps.double() - design @ torch.linalg.lstsq(design, eps.double()).solution
        covariance = residual.T @ residual / num_pairs
        dim = eps.shape[-1]
        row.update(
            proposal_nll=float(-post.proposal(z).log_prob(eps).mean()),
            prior_entropy=0.5 * dim * math.log(2 * math.pi * math.e),
            linear_gaussian_nll=float(0.5 * torch.logdet(2 * math.pi * math.e * covariance)),
            dead_relus=dead,
        )
    return row


def diagnose(
    *,
    num_steps: int = 3000,
    num_particles: int = 8,
    k: int = 128,
    proposal_lr: float | None = None,
    mixing_dim: int | None = None,
    check_every: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """One AISIVI fit with the recipe (overrides as given), printing accuracy on 10000 draws and
    :func:`proposal_diagnostics` every ``check_every`` steps; returns the rows."""
    wave = load_waveform()
    rows: list[dict] = []

    def check(guide, args, step, cpu, wall, loss):
        import torch

        with torch.no_grad():
            draws = guide.get_posterior(*args).sample((10000,)).double().numpy()
        row = {
            "step": step,
            "cpu_seconds": cpu,
            "loss": loss,
            **accuracy(draws, wave["nuts"]),
            **proposal_diagnostics(guide, args),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        return False

    optim = {"proposal_lr": proposal_lr} if proposal_lr else {}
    guide_options = {"mixing_dim": mixing_dim} if mixing_dim else {}
    fit_sivi(
        "flow",
        num_steps=num_steps,
        num_particles=num_particles,
        k=k,
        seed=seed,
        guide_options=guide_options,
        optim_options=optim,
        check_every=check_every,
        check=check,
    )
    return rows


def _streak_start(checkpoints: list[dict], hold: int) -> int | None:
    """Index of the first check from which every later check is at NUTS level (up to ``hold``
    checks after it), or None."""
    for index in range(len(checkpoints)):
        window = checkpoints[index : index + hold + 1]
        if all(r["nuts_level"] for r in window):
            return index
    return None


def _tta_markdown(result: dict) -> str:
    floor, optim = result["noise_floor"], result["optim"]
    lines = [
        report.metadata_markdown(result["meta"]),
        "",
        f"Recipe: AutoSIVI {result['guide_options']}; SIVI_ELBO k = {result['k']}, "
        f"{result['num_particles']} particles; ClippedAdam lr {optim['learning_rate']:g} "
        f"(flow proposal {optim['proposal_lr']:g}), both decayed exponentially to "
        f"{optim['final_lr_factor']:g}x over {result['num_steps']} steps. Every check "
        f"compares {result['num_draws']} guide draws with the 10000 NUTS draws; NUTS level "
        "= max standardized mean error < 0.1 and every sd ratio in [0.9, 1.1], *reached* "
        f"at the first check that meets it and the {result['hold']} checks after it do "
        "too. CPU seconds count training only (this process); wall seconds are inflated "
        "by other jobs on the 2 cores.",
        "",
        f"Monte Carlo floor of a check ({floor['num_draws']} exact draws vs 10000 "
        "independent ones, Gaussian with the NUTS moments): max standardized mean error "
        f"median {floor['max_mean_error_median']:.3f} "
        f"(95%: {floor['max_mean_error_p95']:.3f}), "
        f"max |sd ratio - 1| median {floor['max_sd_deviation_median']:.3f} "
        f"(95%: {floor['max_sd_deviation_p95']:.3f}).",
        "",
    ]
    for name, run in result["guides"].items():
        reached, last = run["reached"], run["checkpoints"][-1]
        verdict = (
            f"reached at step {reached['step']}, {reached['cpu_seconds']:.0f} CPU s "
            f"({reached['wall_seconds']:.0f} wall s)"
            if reached
            else f"not reached in {last['step']} steps ({last['cpu_seconds']:.0f} CPU s)"
        )
        lines += [
            f"### {name}: **{verdict}**",
            "",
            "| step | CPU s | wall s | loss | max std. mean error (coord) | sd ratio min "
            "(coord)–max | # sd outside | NUTS level |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in run["checkpoints"]:
            lines.append(
                f"| {c['step']} | {c['cpu_seconds']:.0f} | {c['wall_seconds']:.0f} | "
                f"{report.fmt(c['loss'], 5)} | {report.fmt(c['max_mean_error'])} "
                f"({c['worst_mean']}) | {report.fmt(c['min_sd_ratio'])} ({c['worst_low_sd']})"
                f"–{report.fmt(c['max_sd_ratio'])} | {c['num_sd_outside']} | "
                f"{'yes' if c['nuts_level'] else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="pyro")
    parser.add_argument("--guides", nargs="*", default=None)
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--particles", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--proposal-lr", type=float, default=None)
    parser.add_argument("--final-lr-factor", type=float, default=None)
    parser.add_argument("--draws", type=int, default=None)
    parser.add_argument("--k", type=int, default=K)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--time-to-accuracy", action="store_true")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--max-cpu-seconds", type=float, default=math.inf)
    parser.add_argument("--diagnose", action="store_true")
    parser.add_argument("--mixing-dim", type=int, default=None)
    args = parser.parse_args()
    if args.diagnose:
        diagnose(
            num_steps=args.steps or 3000,
            num_particles=args.particles or 8,
            k=args.k,
            proposal_lr=args.proposal_lr,
            mixing_dim=args.mixing_dim,
            check_every=args.eval_every,
            seed=(args.seeds or [0])[0],
        )
        raise SystemExit(0)
    if args.time_to_accuracy:
        result = time_to_accuracy(
            guides=args.guides or ("AISIVI", "BSIVI"), num_steps=args.steps or BUDGET.num_steps,
            num_particles=args.particles or BUDGET.num_particles, k=args.k,
            eval_every=args.eval_every, num_draws=args.draws or 10000,
            max_cpu_seconds=args.max_cpu_seconds, seed=(args.seeds or [0])[0],
            learning_rate=args.lr, proposal_lr=args.proposal_lr,
            final_lr_factor=args.final_lr_factor, output_dir=args.output_dir,
        )  # fmt: skip
        print(json.dumps({name: run["reached"] for name, run in result["guides"].items()}))
        raise SystemExit(0)
    base = QUICK_BUDGET if args.quick else BUDGET
    budget = base._replace(**{key: value for key, value in (
        ("num_steps", args.steps), ("num_particles", args.particles),
        ("learning_rate", args.lr), ("final_lr_factor", args.final_lr_factor),
        ("num_draws", args.draws)) if value is not None})  # fmt: skip
    result = run(
        quick=args.quick,
        seeds=args.seeds,
        output_dir=args.output_dir,
        backend=args.backend,
        guides=args.guides,
        budget=budget,
        k=args.k,
        proposal_lr=args.proposal_lr,
    )
    print(json.dumps(result["summary"], indent=1, default=str))
