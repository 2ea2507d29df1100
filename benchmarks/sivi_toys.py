"""AISIVI vs BSIVI vs Gaussian guides on the AISIVI paper's 2-D targets (Pyro).

For ``banana``, ``x_shape`` and ``multimodal`` every guide gets the same budget (steps, particles,
Adam learning rate with step decay ×0.1 at half time, as in the reference configs) and is scored
by

* the ELBO ``E_q[log p - log q]`` on 4000 draws (SIVI: ``log q_hat`` with ``k = 2048`` draws of
  its own proposal; biased high by ``O(1/k)``);
* the forward KL ``E_p[log p - log q]`` on 4000 exact target draws (the reference code's
  metric; SIVI's ``log q_hat`` is biased low, so its KL is biased high);
* the sliced W2 between 4000 guide draws and 4000 exact draws (standardized coordinates);
* seconds per step.

The reference code (tpielok/AISIVI) reaches banana forward KL 0.02-0.09 at ``k = 256`` after
4000 steps at 0.07 s per step on this machine (seed_methods.md 1.10).

Example:
    $ python -m benchmarks.sivi_toys --quick
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

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.optim import ClippedAdam

from benchmarks import report
from mixvi.metrics import monte_carlo_kl, sliced_wasserstein
from pyro_mixvi import SIVI_ELBO, TARGETS, AutoSIVI, target_model

NAME = "sivi_toys"
TARGET_NAMES = ("banana", "x_shape", "multimodal")
GUIDES = ("AISIVI", "BSIVI", "AutoNormal", "AutoMultivariateNormal")
RESULTS = Path(__file__).resolve().parent / "results"


def _make(name: str, model, k: int, num_particles: int):
    if name in ("AISIVI", "BSIVI"):
        proposal = "flow" if name == "AISIVI" else "prior"
        guide = AutoSIVI(model, mixing_dim=2, hidden_dims=(128, 128), proposal=proposal,
                         num_importance_samples=k, init_scale=0.5,
                         init_mixing_fraction=0.5)
        return guide, SIVI_ELBO(num_particles=num_particles, vectorize_particles=True)
    guide_class = AutoNormal if name == "AutoNormal" else AutoMultivariateNormal
    return guide_class(model), Trace_ELBO(num_particles=num_particles, vectorize_particles=True)


def _log_q(guide, x: torch.Tensor, k_eval: int) -> torch.Tensor:
    """``log q(x)`` on the unconstrained latent (the target lives in R^2: no Jacobian)."""
    posterior = guide.get_posterior()
    if isinstance(guide, AutoSIVI):
        posterior.num_importance_samples = k_eval
        posterior.chunk_size = 256
    return torch.cat([posterior.log_prob(chunk) for chunk in x.split(500)])


def _guide_draws(guide, num: int) -> torch.Tensor:
    if isinstance(guide, AutoNormal):
        with pyro.plate("draws", num):
            return guide()["x"]
    return guide.get_posterior().sample((num,))


def _guide_log_q(guide, x, k_eval):
    if isinstance(guide, AutoNormal):
        loc, scale = guide.locs.x, guide.scales.x
        return torch.distributions.Normal(loc, scale).log_prob(x).sum(-1)
    return _log_q(guide, x, k_eval)


def one_run(target_name: str, guide_name: str, *, num_steps: int, k: int, seed: int,
            num_particles: int = 128,
            lr: float = 1e-2, num_eval: int = 4000, k_eval: int = 2048) -> dict[str, Any]:
    """Fit one guide to one target and score it; see the module docstring."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    target = TARGETS[target_name]()
    model = target_model(target)
    guide, elbo = _make(guide_name, model, k, num_particles)
    optim = ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / num_steps), "clip_norm": 100.0})
    svi = SVI(model, guide, optim, elbo)
    start, cpu_start = time.perf_counter(), time.process_time()
    losses = []
    for step in range(num_steps):
        loss = svi.step()
        if not math.isfinite(loss):
            raise FloatingPointError(f"{guide_name} on {target_name}: loss {loss} at step {step}")
        losses.append(loss)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    with torch.no_grad():
        q_draws = _guide_draws(guide, num_eval)
        p_draws = target.sample((num_eval,))
        elbo_terms = target.log_prob(q_draws) - _guide_log_q(guide, q_draws, k_eval)
        fkl, fkl_se = monte_carlo_kl(
            target.log_prob(p_draws).numpy(), _guide_log_q(guide, p_draws, k_eval).numpy()
        )
    return {
        "target": target_name,
        "guide": guide_name,
        "seed": seed,
        "k": k,
        "num_steps": num_steps,
        "elbo": float(elbo_terms.mean()),
        "elbo_se": float(elbo_terms.std() / math.sqrt(num_eval)),
        "forward_kl": fkl,
        "forward_kl_se": fkl_se,
        "sliced_w2": sliced_wasserstein(q_draws.numpy(), p_draws.numpy(), seed=seed),
        "seconds_per_step": seconds / num_steps,
        "cpu_seconds_per_step": cpu_seconds / num_steps,
        "num_particles": num_particles,
        "final_loss": float(np.mean(losses[-max(num_steps // 10, 1):])),
    }


def run(*, quick: bool = False, seeds: Sequence[int] = (0,), output_dir: str | os.PathLike |
        None = None, targets: Sequence[str] = TARGET_NAMES, guides: Sequence[str] = GUIDES,
        num_steps: int | None = None, k: int = 256, num_particles: int = 128) -> dict[str, Any]:
    """Every guide on every target; writes ``sivi_toys.json`` and ``sivi_toys.md``."""
    num_steps = num_steps or (300 if quick else 4000)
    torch.set_num_threads(1)
    rows = [one_run(t, g, num_steps=num_steps, k=k, seed=s, num_particles=num_particles)
            for t in targets for g in guides for s in seeds]
    out = Path(output_dir) if output_dir else RESULTS / ("quick" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    meta = report.metadata(
        f"python -m benchmarks.sivi_toys{' --quick' if quick else ''} --targets {' '.join(targets)}"
        f" --guides {' '.join(guides)} --steps {num_steps} --k {k} --particles {num_particles}"
        f" --seeds {' '.join(map(str, seeds))}"
    )  # the arguments that produced the numbers, not just the module
    result = {"meta": meta, "rows": rows}
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2))
    lines = [report.metadata_markdown(meta), "",
             f"Equal budget: {num_steps} steps, {num_particles} particles, Adam 1e-2 decayed to "
             f"1e-3 (ClippedAdam, clip 100); "
             f"SIVI k = {k}; evaluation k = 2048.", "",
             "Wall seconds are inflated by other jobs sharing the 2 cores; CPU s/step is this "
             "process's CPU time.", "",
             "| target | guide | seed | ELBO | forward KL | sliced W2 | s/step | CPU s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['guide']} | {r['seed']} | {report.fmt(r['elbo'])} "
                     f"± {report.fmt(r['elbo_se'], 2)} | {report.fmt(r['forward_kl'])} "
                     f"± {report.fmt(r['forward_kl_se'], 2)} | {report.fmt(r['sliced_w2'])} | "
                     f"{report.fmt(r['seconds_per_step'])} | "
                     f"{report.fmt(r['cpu_seconds_per_step'])} |")
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--targets", nargs="*", default=list(TARGET_NAMES))
    parser.add_argument("--guides", nargs="*", default=list(GUIDES))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--particles", type=int, default=128)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    result = run(quick=args.quick, targets=args.targets, guides=args.guides,
                 num_steps=args.steps, seeds=args.seeds, num_particles=args.particles, k=args.k,
                 output_dir=args.output_dir)
    print(json.dumps(result["rows"], indent=1))
