"""AMF-VI from a model (Pyro or NumPyro): AutoFlowMixture against each of its experts alone.

Per AMF target (the paper's six 2-D targets, as models whose posterior is the target):

- ``mixture``: ``AutoFlowMixture.fit`` (stage 1: MAF and RealNVP, each alone by its own ELBO
  for ``steps`` steps from its own spread start, ``init_spread``; RBIG fit to
  importance-resampled draws; stage 2: EMA weights);
- ``mixture+stage3``: then ``joint_steps`` steps of ``RBMixture_ELBO`` on every parameter, with
  the step sizes of ``fit``'s stage 3, through an ordinary ``SVI`` loop (the public face);
- ``maf`` and ``realnvp``: the same expert trained **alone** (``AutoFlowMixture(model,
  experts=(name,))``, from the init location) for ``2 * steps + joint_steps`` steps, the
  mixture's total number of gradient steps: the expert alone gets the whole budget;
- ``rbig``: the mixture's own RBIG. RBIG has no fit from a model on its own (it is fit to
  draws, and the only draws are the parametric experts' importance-resampled ones), so the
  strongest RBIG available is the one fit to the mixture's proposal.

Scores on ``n_metric`` draws of each density: ELBO ``E_q[log p - log q]`` (nats; ``log Z = 0``
for these normalized targets, so ``-ELBO = KL(q || p)``) with its Monte Carlo standard error;
sliced W2 (:func:`mixvi.metrics.sliced_wasserstein`, 256 directions, standardized by the exact
draws) to ``n_metric`` exact target draws (two exact samples of 8000 give 0.02-0.04: the floor);
NLL of the exact draws (``-E_p[log q]``; the target's entropy is the oracle). Time per stage is
reported beside the reference code's (from samples: stage 1 ≈ 184 s, stage 2 ≈ 21 s per target
on this machine).

Run: ``python -m benchmarks.amf_model [--quick] [--backend numpyro] [--seeds 0 1]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.report import with_overrides
from mixvi.metrics import sliced_wasserstein

PAPER_TARGETS = (
    "amf_banana", "amf_x_shape", "bimodal_shared", "multimodal_5", "two_moons", "rings",
)
EXPERT_NAMES = ("maf", "realnvp", "rbig")
PARAMETRIC = ("maf", "realnvp")
MODELS = (*EXPERT_NAMES, "mixture", "mixture+stage3")
RESULTS = Path(__file__).resolve().parent / "results"


def _score(log_p: np.ndarray, log_q: np.ndarray, draws: np.ndarray, exact: np.ndarray,
           nll: float) -> dict[str, float]:
    terms = np.asarray(log_p, np.float64) - np.asarray(log_q, np.float64)
    return {"elbo": float(terms.mean()), "elbo_se": float(terms.std() / math.sqrt(len(terms))),
            "sw2": sliced_wasserstein(np.asarray(draws, np.float64), exact), "nll": nll}


def _budget_alone(cfg: dict) -> int:
    """Gradient steps of an expert trained alone: the mixture's stage-1 steps plus stage 3."""
    return len(PARAMETRIC) * cfg["steps"] + cfg["joint_steps"]


def stage3_args(param_name: str, lr: float) -> dict:
    """Pyro Adam options as in ``fit``'s stage 3: weights lr, affine lr/10, flows lr/100."""
    if param_name.endswith(".weights"):
        return {"lr": lr}
    if param_name.endswith((".loc", ".log_scale")):
        return {"lr": lr / 10}
    return {"lr": lr / 100}


def _pyro_run(name: str, seed: int, cfg: dict) -> dict:
    import pyro
    import torch
    from pyro.infer import SVI

    from pyro_mixvi import TARGETS, AutoFlowMixture, RBMixture_ELBO, target_model

    flows = {"num_transforms": cfg["layers"]}
    fit_kwargs = {"lr": cfg["lr"], "num_particles": cfg["particles"],
                  "num_rbig_draws": cfg["rbig_draws"], "progress_bar": False}
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    target = TARGETS[name]()
    model = target_model(target)
    exact = target.sample((cfg["n_metric"],))
    exact_np = exact.double().numpy()

    def score(dist) -> dict:  # noqa: ANN001
        with torch.no_grad():
            draws = dist.sample((cfg["n_metric"],))
            nll = float(-dist.log_prob(exact).mean())
            return _score(target.log_prob(draws).numpy(), dist.log_prob(draws).numpy(),
                          draws.numpy(), exact_np, nll)

    row = {"seed": seed, "oracle_nll": float(target.entropy())}
    for label in PARAMETRIC:
        pyro.clear_param_store()
        alone = AutoFlowMixture(model, experts=(label,), expert_kwargs={label: flows})
        t0 = time.perf_counter()
        alone.fit(num_steps=_budget_alone(cfg), num_weight_steps=1, weight_batch_size=2,
                  **fit_kwargs)
        row[f"{label}_s"] = time.perf_counter() - t0
        row[label] = score(alone.expert_modules[0]())
    pyro.clear_param_store()
    guide = AutoFlowMixture(model, experts=EXPERT_NAMES, init_spread=cfg["spread"],
                            expert_kwargs={"maf": flows, "realnvp": flows})
    t0 = time.perf_counter()
    result = guide.fit(num_steps=cfg["steps"], num_weight_steps=cfg["ema_steps"],
                       weight_batch_size=cfg["weight_batch"], **fit_kwargs)
    row.update(fit_s=time.perf_counter() - t0, weights=result.weights.tolist(),
               n_eff=float(result.n_eff),
               rbig_layers=int(guide.expert_modules[2].centers.shape[0]))
    row["rbig"] = score(guide.expert_modules[2]())
    row["mixture"] = score(guide.get_posterior())
    svi = SVI(model, guide, pyro.optim.Adam(lambda name: stage3_args(name, cfg["lr"])),
              RBMixture_ELBO(num_particles=cfg["particles"]))
    t0 = time.perf_counter()
    joint = [svi.step() for _ in range(cfg["joint_steps"])]
    row["stage3_s"] = time.perf_counter() - t0
    if not all(math.isfinite(v) for v in joint):
        raise FloatingPointError(f"{name}: non-finite stage-3 loss")
    row["mixture+stage3"] = score(guide.get_posterior())
    row["weights_stage3"] = guide.get_posterior().weights.detach().tolist()
    return row


def _numpyro_run(name: str, seed: int, cfg: dict) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax
    from numpyro.infer import SVI

    from numpyro_mixvi import TARGETS, AutoFlowMixture, RBMixture_ELBO, target_model

    flows = {"num_transforms": cfg["layers"]}
    fit_kwargs = {"lr": cfg["lr"], "num_particles": cfg["particles"],
                  "num_rbig_draws": cfg["rbig_draws"], "progress_bar": False}
    key_exact, key_fit, key_joint, key_score, *keys_alone = jax.random.split(
        jax.random.key(seed), 4 + len(PARAMETRIC))
    target = TARGETS[name]()
    model = target_model(target)
    exact = target.sample(key_exact, (cfg["n_metric"],))
    exact_np = np.asarray(exact, np.float64)
    log_prob = eqx.filter_jit(lambda dist, x: dist.log_prob(x))
    sample = eqx.filter_jit(lambda dist, key: dist.sample(key, (cfg["n_metric"],)))
    score_keys = iter(jax.random.split(key_score, 8))

    def score(dist) -> dict:  # noqa: ANN001
        draws = sample(dist, next(score_keys))
        nll = float(-log_prob(dist, exact).mean())
        return _score(np.asarray(target.log_prob(draws)), np.asarray(log_prob(dist, draws)),
                      np.asarray(draws), exact_np, nll)

    row = {"seed": seed, "oracle_nll": float(target.entropy())}
    for label, key in zip(PARAMETRIC, keys_alone, strict=True):
        alone = AutoFlowMixture(model, experts=(label,), expert_kwargs={label: flows})
        t0 = time.perf_counter()
        params, _ = alone.fit(key, num_steps=_budget_alone(cfg), num_weight_steps=1,
                              weight_batch_size=2, **fit_kwargs)
        row[f"{label}_s"] = time.perf_counter() - t0
        row[label] = score(alone.get_posterior(params).experts[0])
    guide = AutoFlowMixture(model, experts=EXPERT_NAMES, init_spread=cfg["spread"],
                            expert_kwargs={"maf": flows, "realnvp": flows})
    t0 = time.perf_counter()
    params, result = guide.fit(key_fit, num_steps=cfg["steps"],
                               num_weight_steps=cfg["ema_steps"],
                               weight_batch_size=cfg["weight_batch"], **fit_kwargs)
    jax.block_until_ready(result.weights)
    row.update(fit_s=time.perf_counter() - t0, weights=np.asarray(result.weights).tolist(),
               n_eff=float(result.n_eff))
    posterior = guide.get_posterior(params)
    row["rbig"] = score(posterior.experts[EXPERT_NAMES.index("rbig")])
    row["mixture"] = score(posterior)
    weights_name, lr = f"{guide.prefix}_weights", cfg["lr"]

    def labels(tree: dict) -> dict:  # an expert's last two leaves are its affine map's
        return {k: "weights" if k == weights_name else ["flow"] * (len(v) - 2) + ["affine"] * 2
                for k, v in tree.items()}

    optimizer = optax.multi_transform(  # fit's stage 3: weights lr, affine lr/10, flows lr/100
        {"weights": optax.adam(lr), "affine": optax.adam(lr / 10),
         "flow": optax.adam(lr / 100)}, labels)
    svi = SVI(model, guide, optimizer, RBMixture_ELBO(num_particles=cfg["particles"]))
    t0 = time.perf_counter()
    joint = svi.run(key_joint, cfg["joint_steps"], progress_bar=False, init_params=params)
    jax.block_until_ready(joint.losses)
    row["stage3_s"] = time.perf_counter() - t0
    if not bool(jnp.isfinite(joint.losses).all()):
        raise FloatingPointError(f"{name}: non-finite stage-3 loss")
    row["mixture+stage3"] = score(guide.get_posterior(joint.params))
    row["weights_stage3"] = np.asarray(joint.params[weights_name]).tolist()
    return row


def _summary(rows: list[dict]) -> dict:
    out = {"oracle_nll": rows[0]["oracle_nll"]}
    for model in MODELS:
        out[model] = {m: (float(np.mean([r[model][m] for r in rows])),
                          float(np.std([r[model][m] for r in rows])))
                      for m in ("elbo", "sw2", "nll")}
        out[model]["elbo_se"] = float(np.mean([r[model]["elbo_se"] for r in rows]))
    for key in ("n_eff", "fit_s", "stage3_s", *(f"{e}_s" for e in PARAMETRIC)):
        out[key] = (float(np.mean([r[key] for r in rows])), float(np.std([r[key] for r in rows])))
    for key in ("weights", "weights_stage3"):
        out[key] = np.mean([r[key] for r in rows], 0).tolist()
    for model in ("mixture", "mixture+stage3"):
        for label, rivals in (("every_expert", EXPERT_NAMES), ("experts_alone", PARAMETRIC),
                              ("rbig", ("rbig",))):
            out[f"{model}_beats_{label}"] = {
                "elbo": all(out[model]["elbo"][0] > out[e]["elbo"][0] for e in rivals),
                "sw2": all(out[model]["sw2"][0] < out[e]["sw2"][0] for e in rivals),
            }
    out["stage3_elbo_gain"] = out["mixture+stage3"]["elbo"][0] - out["mixture"]["elbo"][0]
    return out


def _markdown(summary: dict, cfg: dict, seeds, backend: str) -> str:  # noqa: ANN001
    label = {"pyro": "Pyro", "numpyro": "NumPyro"}[backend]
    lines = [f"# AutoFlowMixture from a model ({label}), seeds {list(seeds)}, config {cfg}", "",
             "ELBO = E_q[log p - log q] (higher is better; 0 is exact), ± sd over seeds "
             "[mean MC standard error]; sliced W2 to exact draws (lower is better); NLL of exact "
             f"draws (oracle = entropy). maf, realnvp: each trained alone for {_budget_alone(cfg)}"
             " steps (the mixture's stage 1 + stage 3); rbig: the mixture's own (fit to its "
             "importance-resampled draws).", "",
             "| target | oracle NLL | model | ELBO | sliced W2 | NLL |",
             "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        for model in MODELS:
            m = s[model]
            lines.append(
                f"| {name} | {s['oracle_nll']:.3f} | {model} | {m['elbo'][0]:.3f} ± "
                f"{m['elbo'][1]:.3f} [{m['elbo_se']:.3f}] | {m['sw2'][0]:.3f} ± {m['sw2'][1]:.3f}"
                f" | {m['nll'][0]:.3f} ± {m['nll'][1]:.3f} |")
    lines += ["", "Beats (ELBO / sliced W2; comparison of seed means, without a noise margin): "
              "'alone' = MAF and RealNVP trained alone, 'RBIG' = the mixture's own RBIG.", "",
              "| target | π after stage 2 (MAF, RealNVP, RBIG) | N_eff | π after stage 3 | "
              "stages 1-2 beat alone; RBIG | after stage 3: alone; RBIG | stage-3 ELBO gain | "
              "fit s | stage 3 s | maf, realnvp alone s |",
              "|---|---|---|---|---|---|---|---|---|---|"]

    def flags(s: dict, model: str) -> str:  # noqa: ANN001
        alone, rbig = s[f"{model}_beats_experts_alone"], s[f"{model}_beats_rbig"]
        return f"{alone['elbo']} / {alone['sw2']}; {rbig['elbo']} / {rbig['sw2']}"

    for name, s in summary.items():
        w = ", ".join(f"{v:.2f}" for v in s["weights"])
        w3 = ", ".join(f"{v:.2f}" for v in s["weights_stage3"])
        lines.append(f"| {name} | {w} | {s['n_eff'][0]:.2f} | {w3} | {flags(s, 'mixture')} | "
                     f"{flags(s, 'mixture+stage3')} | {s['stage3_elbo_gain']:+.3f} | "
                     f"{s['fit_s'][0]:.0f} | {s['stage3_s'][0]:.0f} | "
                     f"{s['maf_s'][0]:.0f}, {s['realnvp_s'][0]:.0f} |")
    lines.append("\nReference code (from samples, not from a model) on this machine: stage 1 ≈ "
                 "184 s, stage 2 ≈ 21 s per target.")
    return "\n".join(lines) + "\n"


def run(*, quick: bool = False, seeds=(0, 1), output_dir=None, targets=PAPER_TARGETS,
        backend: str = "pyro", **overrides) -> dict:
    """Compute the table; write ``amf_model.json``/``.md`` (Pyro) or
    ``amf_model_numpyro.json``/``.md`` under ``output_dir``.

    ``overrides`` replace entries of the configuration (``steps``, ``layers``, ``lr``,
    ``particles``, ``rbig_draws``, ``ema_steps``, ``weight_batch``, ``joint_steps``,
    ``n_metric``, ``spread``) after ``quick`` is applied.
    """
    if backend not in ("pyro", "numpyro"):
        raise ValueError(f"backend must be 'pyro' or 'numpyro'; got {backend!r}")
    one_run = _pyro_run if backend == "pyro" else _numpyro_run
    cfg = {"steps": 400, "layers": 3, "lr": 1e-2, "particles": 8, "rbig_draws": 2048,
           "ema_steps": 50, "weight_batch": 512, "joint_steps": 100, "n_metric": 4000,
           "spread": 1.0}  # the slow test's budget; 800 steps x 5 layers took 4 min per target
    if quick:
        cfg.update(steps=60, layers=2, rbig_draws=1024, ema_steps=10, weight_batch=256,
                   joint_steps=10, n_metric=300)
        seeds, targets = seeds[:1], targets[:2]
    with_overrides(cfg, overrides)
    summary = {}
    for name in targets:
        rows = [one_run(name, seed, cfg) for seed in seeds]
        summary[name] = _summary(rows)
        print(name, json.dumps({k: summary[name][k] for k in (
            "mixture_beats_experts_alone", "mixture+stage3_beats_experts_alone",
            "mixture+stage3_beats_rbig",
            "stage3_elbo_gain", "fit_s")}), flush=True)
    out = Path(output_dir) if output_dir is not None else RESULTS / ("quick" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    stem = "amf_model" if backend == "pyro" else f"amf_model_{backend}"
    (out / f"{stem}.json").write_text(json.dumps(
        {"backend": backend, "config": cfg, "seeds": list(seeds), "targets": summary}, indent=1))
    (out / f"{stem}.md").write_text(_markdown(summary, cfg, seeds, backend))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", choices=["pyro", "numpyro"], default="pyro")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--targets", nargs="+", default=list(PAPER_TARGETS))
    parser.add_argument("--steps", type=int, help="stage-1 Adam steps per expert (default 400)")
    parser.add_argument("--joint-steps", type=int, help="stage-3 steps (default 100)")
    parser.add_argument("--output-dir", help="where to write amf_model.json/.md")
    args = parser.parse_args()
    if args.backend == "pyro":
        import torch

        torch.set_num_threads(1)
    overrides = {key: value for key, value in {
        "steps": args.steps, "joint_steps": args.joint_steps}.items() if value is not None}
    run(quick=args.quick, backend=args.backend, seeds=tuple(args.seeds),
        targets=tuple(args.targets), output_dir=args.output_dir, **overrides)
