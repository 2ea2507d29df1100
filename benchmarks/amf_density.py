"""AMF-VI density-estimation table (Pyro or NumPyro backend): each flow expert and their mixture.

The paper's setting (notes §2.4-2.5): per target, fit MAF, RealNVP and RBIG by maximum
likelihood to ``n_train`` draws, fit the global weights by the EMA on fresh batches, and score on
2000 fresh test draws: NLL (nats per point; the oracle is the target's entropy), KL(p||q) by KDE
on a 100x100 grid, W2 by exact optimal transport between equal-size samples
(``scipy.optimize.linear_sum_assignment``), and MMD (RBF, sigma = 1, square root of the unbiased
MMD^2 clamped at 0). Mean ± sd over seeds; time per stage beside the reference's 184 s / 21 s.

Pyro trains each expert with an eager Adam loop; NumPyro runs ``FlowMixture.fit``'s stage 1
(jitted Adam chunks, compilation included in the stage-1 time) with a one-step stage 2, then
times ``fit_weights`` on fresh target draws as stage 2 (compilation included).

Run: ``python -m benchmarks.amf_density [--quick] [--backend numpyro]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.optimize import linear_sum_assignment

from benchmarks.report import with_overrides
from mixvi.metrics import mmd

PAPER_TARGETS = (
    "amf_banana", "amf_x_shape", "bimodal_shared", "multimodal_5", "two_moons", "rings",
)
EXPERT_NAMES = ("maf", "realnvp", "rbig")
RESULTS = Path(__file__).resolve().parent / "results"


def kde_kl(test: np.ndarray, model: np.ndarray) -> float:
    """KL(p||q) between Gaussian KDEs (model KDE at the target KDE's bandwidth) on a grid."""
    p_kde = stats.gaussian_kde(test.T)
    q_kde = stats.gaussian_kde(model.T, bw_method=p_kde.factor)
    both = np.vstack([test, model])
    lo, hi = both.min(0), both.max(0)
    lo, hi = lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)
    xs, ys = np.linspace(lo[0], hi[0], 100), np.linspace(lo[1], hi[1], 100)
    grid = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2).T
    p, q = np.maximum(p_kde(grid), 1e-10), np.maximum(q_kde(grid), 1e-10)
    cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
    return float(np.sum(p * np.log(p / q)) * cell)


def w2_exact(x: np.ndarray, y: np.ndarray) -> float:
    """W2 between equal-size empirical measures: optimal assignment on squared distances."""
    cost = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def _score(log_q: np.ndarray, draws: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """The four metrics from the model's ``log q`` at the test points and its own draws."""
    t, draws = np.asarray(test, np.float64), np.asarray(draws, np.float64)
    return {
        "nll": float(-np.mean(log_q)),
        "kl": kde_kl(t, draws),
        "w2": w2_exact(t[: len(draws)], draws),
        "mmd": math.sqrt(max(mmd(t, draws, bandwidth=1.0), 0.0)),
    }


def _row(seed: int, weights: np.ndarray, stage1: float, stage2: float, oracle: float) -> dict:
    weights = np.asarray(weights, np.float64)
    return {"seed": seed, "stage1_s": stage1, "stage2_s": stage2, "weights": weights.tolist(),
            "n_eff": float(1.0 / np.sum(weights**2)),
            "n_eff_entropy": float(np.exp(-np.sum(weights * np.log(np.maximum(weights, 1e-30))))),
            "oracle_nll": oracle}


def _pyro_run(name: str, seed: int, cfg: dict) -> dict:
    import torch

    from pyro_mixvi import MAF, RBIG, TARGETS, FlowMixture, RealNVP, fit_weights

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    target = TARGETS[name]()
    train = target.sample((cfg["n_train"],)).float()
    test = target.sample((cfg["n_test"],)).float()
    sampler = lambda n: target.sample((n,)).float()
    t0 = time.perf_counter()
    experts = [
        MAF(2, num_transforms=cfg["layers"], hidden_dims=(64, 64)),
        RealNVP(2, num_transforms=cfg["layers"], hidden_dims=(128, 128)),
    ]
    for expert in experts:
        opt = torch.optim.Adam(expert.parameters(), lr=cfg["lr"])
        for _ in range(cfg["steps"]):
            idx = torch.randint(len(train), (cfg["batch"],), generator=gen)
            loss = -expert().log_prob(train[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        expert.requires_grad_(False)
    experts.append(RBIG.fit(train, generator=gen, progress_bar=False))
    stage1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    weights = fit_weights(experts, lambda: sampler(cfg["n_train"]), num_steps=cfg["ema_steps"],
                          progress_bar=False)
    stage2 = time.perf_counter() - t0
    mixture = FlowMixture(experts, weights)
    row = _row(seed, weights.numpy(), stage1, stage2, float(target.entropy()))
    models = [*zip(EXPERT_NAMES, (e() for e in experts), strict=True), ("mixture", mixture)]
    for label, dist in models:
        with torch.no_grad():
            log_q, draws = dist.log_prob(test).numpy(), dist.sample((cfg["n_metric"],)).numpy()
        row[label] = _score(log_q, draws, test.numpy())
    return row


def _numpyro_run(name: str, seed: int, cfg: dict) -> dict:
    import equinox as eqx
    import jax

    from numpyro_mixvi import TARGETS, FlowMixture, fit_weights

    key_train, key_test, key_fit, key_weights, key_score = jax.random.split(jax.random.key(seed), 5)
    target = TARGETS[name]()
    train = target.sample(key_train, (cfg["n_train"],))
    test = target.sample(key_test, (cfg["n_test"],))
    options = {"maf": {"num_transforms": cfg["layers"], "hidden_dims": (64, 64)},
               "realnvp": {"num_transforms": cfg["layers"], "hidden_dims": (128, 128)},
               "rbig": {}}
    t0 = time.perf_counter()
    stage1 = FlowMixture.fit(key_fit, train, experts=EXPERT_NAMES, num_steps=cfg["steps"],
                             batch_size=cfg["batch"], lr=cfg["lr"], num_weight_steps=1,
                             weight_batch_size=2, expert_kwargs=options, progress_bar=False)
    jax.block_until_ready(stage1.weights)
    stage1_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    weights = fit_weights(key_weights, stage1.experts,
                          lambda key: target.sample(key, (cfg["n_train"],)),
                          num_steps=cfg["ema_steps"], progress_bar=False)
    weights = jax.block_until_ready(weights)
    stage2_s = time.perf_counter() - t0
    mixture = FlowMixture(stage1.experts, weights)
    row = _row(seed, np.asarray(weights), stage1_s, stage2_s, float(target.entropy()))
    log_prob = eqx.filter_jit(lambda dist, x: dist.log_prob(x))
    sample = eqx.filter_jit(lambda dist, key: dist.sample(key, (cfg["n_metric"],)))
    models = [*zip(EXPERT_NAMES, stage1.experts, strict=True), ("mixture", mixture)]
    for (label, dist), key in zip(models, jax.random.split(key_score, len(models)), strict=True):
        row[label] = _score(np.asarray(log_prob(dist, test)), np.asarray(sample(dist, key)),
                            np.asarray(test))
    return row


def _summary(rows: list[dict]) -> dict:
    out = {"oracle_nll": rows[0]["oracle_nll"]}
    for model in (*EXPERT_NAMES, "mixture"):
        out[model] = {m: (float(np.mean([r[model][m] for r in rows])),
                          float(np.std([r[model][m] for r in rows])))
                      for m in ("nll", "kl", "w2", "mmd")}
    for key in ("n_eff", "n_eff_entropy", "stage1_s", "stage2_s"):
        out[key] = (float(np.mean([r[key] for r in rows])), float(np.std([r[key] for r in rows])))
    out["weights"] = np.mean([r["weights"] for r in rows], 0).tolist()
    return out


def _markdown(summary: dict, cfg: dict, backend: str) -> str:
    label = {"pyro": "Pyro", "numpyro": "NumPyro"}[backend]
    lines = [f"# AMF-VI density table ({label}), config {cfg}", "",
             "| target | oracle NLL | model | NLL | KL | W2 | MMD |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        for model in (*EXPERT_NAMES, "mixture"):
            cells = " | ".join(f"{s[model][m][0]:.3f} ± {s[model][m][1]:.3f}"
                               for m in ("nll", "kl", "w2", "mmd"))
            lines.append(f"| {name} | {s['oracle_nll']:.3f} | {model} | {cells} |")
    lines += ["", "| target | π (MAF, RealNVP, RBIG) | N_eff=1/Σπ² | exp(H(π)) | stage 1 s "
              "| stage 2 s |", "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        w = ", ".join(f"{v:.2f}" for v in s["weights"])
        lines.append(f"| {name} | {w} | {s['n_eff'][0]:.2f} ± {s['n_eff'][1]:.2f} | "
                     f"{s['n_eff_entropy'][0]:.2f} | {s['stage1_s'][0]:.1f} | "
                     f"{s['stage2_s'][0]:.1f} |")
    lines.append("\nReference code on this machine: stage 1 ≈ 184 s, stage 2 ≈ 21 s per target.")
    return "\n".join(lines) + "\n"


def run(*, quick: bool = False, seeds=(0, 1, 2), output_dir=None, targets=PAPER_TARGETS,
        backend: str = "pyro", **overrides) -> dict:
    """Compute the table; write ``amf_density.json``/``.md`` (Pyro) or
    ``amf_density_numpyro.json``/``.md`` under ``output_dir``.

    ``overrides`` replace entries of the configuration (``steps``, ``layers``, ``lr``,
    ``ema_steps``, ``n_metric``, ...) after ``quick`` is applied.
    """
    if backend not in ("pyro", "numpyro"):
        raise ValueError(f"backend must be 'pyro' or 'numpyro'; got {backend!r}")
    one_run = _pyro_run if backend == "pyro" else _numpyro_run
    cfg = {"n_train": 1000, "n_test": 2000, "n_metric": 2000, "layers": 8, "steps": 1500,
           "batch": 500, "lr": 1e-3, "ema_steps": 100}
    if quick:
        cfg.update(steps=150, layers=4, ema_steps=20, n_metric=500)
        seeds = seeds[:1]
    with_overrides(cfg, overrides)
    summary = {}
    for name in targets:
        rows = [one_run(name, seed, cfg) for seed in seeds]
        summary[name] = _summary(rows)
        print(name, json.dumps({k: summary[name][k] for k in ("n_eff", "stage1_s")}), flush=True)
    out = Path(output_dir) if output_dir is not None else RESULTS / ("quick" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    stem = "amf_density" if backend == "pyro" else f"amf_density_{backend}"
    (out / f"{stem}.json").write_text(json.dumps(
        {"backend": backend, "config": cfg, "seeds": list(seeds), "targets": summary}, indent=1))
    (out / f"{stem}.md").write_text(_markdown(summary, cfg, backend))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", choices=["pyro", "numpyro"], default="pyro")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="Adam steps per expert (default 1500)")
    parser.add_argument("--layers", type=int, help="flow layers (default 8)")
    parser.add_argument("--lr", type=float, help="Adam step size (default 1e-3)")
    parser.add_argument("--ema-steps", type=int, help="stage-2 EMA steps (default 100)")
    parser.add_argument("--n-metric", type=int, help="draws per metric (default 2000)")
    args = parser.parse_args()
    if args.backend == "pyro":
        import torch

        torch.set_num_threads(1)
    overrides = {key: value for key, value in {
        "steps": args.steps, "layers": args.layers, "lr": args.lr, "ema_steps": args.ema_steps,
        "n_metric": args.n_metric}.items() if value is not None}
    run(quick=args.quick, backend=args.backend, seeds=tuple(args.seeds), **overrides)
