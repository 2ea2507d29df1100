"""AISIVI vs BSIVI on the 100-D conditioned diffusion process (Pyro), at a budget of minutes.

Model (research notes 1.6, from KSIVI/AISIVI): ``u in R^100`` with ``u_i`` the state at
``t = i dt``, ``dt = 0.01``, ``u_0 = 0``, ``beta = 10``;
``u_i | u_{i-1} ~ N(m(u_{i-1}), dt)`` with ``m(u) = u + beta dt (u - u^3) / (1 + u^2)``, and
20 observations ``y_j ~ N(u_{5j}, 0.1^2)``. The data are simulated by Euler-Maruyama with the
drift ``beta u (1 - u^2)`` — **without** the ``1 / (1 + u^2)`` of the model: the mismatch of the
reference code, kept on purpose. (The reference seeds torch with 2022; we seed numpy with 2022,
so the observations are a different draw of the same process.)

Scores: ELBO (4000 draws, ``log q_hat`` with ``k_eval = 256`` draws of each guide's own proposal,
biased high by ``O(1/k)``), the importance-sampled log evidence with the guide as proposal,
the RMSE of the posterior mean to the simulated path, and CPU seconds per step.

Example:
    $ python -m benchmarks.sivi_diffusion --quick
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
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.optim import ClippedAdam

from benchmarks import report
from pyro_mixvi import SIVI_ELBO, AutoSIVI

NAME = "sivi_diffusion"
RESULTS = Path(__file__).resolve().parent / "results"
DT, BETA, SIGMA_OBS, NUM_STEPS_SDE = 0.01, 10.0, 0.1, 100
OBS_INDEX = np.arange(4, NUM_STEPS_SDE, 5)  # u_5, u_10, ..., u_100 (0-based)


def simulate(seed: int = 2022) -> tuple[np.ndarray, np.ndarray]:
    """The path ``u (100,)`` (Euler-Maruyama, data drift) and observations ``y (20,)``."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(NUM_STEPS_SDE)
    path, u = np.empty(NUM_STEPS_SDE), 0.0
    for i in range(NUM_STEPS_SDE):
        u = u + BETA * u * (1 - u**2) * DT + noise[i] * math.sqrt(DT)
        path[i] = u
    y = path[OBS_INDEX] + SIGMA_OBS * rng.standard_normal(len(OBS_INDEX))
    return path, y


def diffusion_model(y: torch.Tensor) -> None:
    """The conditioned diffusion posterior over ``u`` (model drift with ``1 / (1 + u^2)``)."""
    u = pyro.sample("u", dist.ImproperUniform(dist.constraints.real, (), (NUM_STEPS_SDE,)))
    previous = torch.cat([torch.zeros_like(u[..., :1]), u[..., :-1]], -1)
    drift = previous + BETA * DT * (previous - previous**3) / (1 + previous**2)
    pyro.factor("prior", dist.Normal(drift, math.sqrt(DT)).log_prob(u).sum(-1))
    index = torch.as_tensor(OBS_INDEX)
    pyro.sample("y", dist.Normal(u[..., index], SIGMA_OBS).to_event(1), obs=y)


def _log_joint(u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    previous = torch.cat([torch.zeros_like(u[..., :1]), u[..., :-1]], -1)
    drift = previous + BETA * DT * (previous - previous**3) / (1 + previous**2)
    log_prior = dist.Normal(drift, math.sqrt(DT)).log_prob(u).sum(-1)
    return log_prior + dist.Normal(u[..., OBS_INDEX], SIGMA_OBS).log_prob(y).sum(-1)


def one_run(proposal: str, *, num_steps: int, k: int, seed: int, num_particles: int = 32,
            lr: float = 1e-3, k_eval: int = 256, num_eval: int = 1000) -> dict[str, Any]:
    """Fit AutoSIVI with ``proposal`` and score it; see the module docstring."""
    path, y_np = simulate()
    y = torch.as_tensor(y_np, dtype=torch.get_default_dtype())
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoSIVI(diffusion_model, proposal=proposal, num_importance_samples=k,
                     init_loc_fn=pyro.infer.autoguide.init_to_value(
                         values={"u": torch.zeros(NUM_STEPS_SDE)}))
    elbo = SIVI_ELBO(num_particles=num_particles, vectorize_particles=True)
    svi = SVI(diffusion_model, guide,
              ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / num_steps), "clip_norm": 100.0}), elbo)
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(num_steps):
        loss = svi.step(y)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{proposal}: loss {loss} at step {step}")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    with torch.no_grad():
        posterior = guide.get_posterior(y)
        posterior.num_importance_samples = k_eval
        u = posterior.sample((num_eval,))
        log_q = torch.cat([posterior.log_prob(chunk) for chunk in u.split(250)])
        log_w = (_log_joint(u, y) - log_q).double()
    return {
        "guide": "AISIVI" if proposal == "flow" else "BSIVI",
        "seed": seed, "k": k, "num_steps": num_steps, "num_particles": num_particles,
        "elbo": float(log_w.mean()), "elbo_se": float(log_w.std() / math.sqrt(num_eval)),
        "log_evidence": float(torch.logsumexp(log_w, 0) - math.log(num_eval)),
        "path_rmse": float(np.sqrt(np.mean((u.mean(0).numpy() - path) ** 2))),
        "mean_sd": float(u.std(0).mean()),
        "seconds_per_step": wall / num_steps, "cpu_seconds_per_step": cpu / num_steps,
    }  # fmt: skip


def run(*, quick: bool = False, seeds: Sequence[int] = (0,),
        output_dir: str | os.PathLike | None = None, num_steps: int | None = None,
        k: int = 128) -> dict[str, Any]:
    """AISIVI and BSIVI at the same budget; writes ``sivi_diffusion.json``/``.md``."""
    torch.set_num_threads(1)
    num_steps = num_steps or (100 if quick else 1500)
    rows = [one_run(p, num_steps=num_steps, k=k, seed=s) for p in ("flow", "prior") for s in seeds]
    out = Path(output_dir) if output_dir else RESULTS / ("quick" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    meta = report.metadata(
        f"python -m benchmarks.sivi_diffusion{' --quick' if quick else ''} --steps {num_steps}"
        f" --k {k} --seeds {' '.join(map(str, seeds))}"
    )  # the arguments that produced the numbers, not just the module
    result = {"meta": meta, "rows": rows}
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2))
    lines = [report.metadata_markdown(meta), "",
             f"100-D conditioned diffusion, {num_steps} steps, 32 particles, k = {k}, "
             "mixing_dim = 100, Adam 1e-3 decayed to 1e-4.", "",
             "| guide | seed | ELBO | log Z (IS) | path RMSE | mean sd | s/step | CPU s/step |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['guide']} | {r['seed']} | {report.fmt(r['elbo'], 5)} ± "
                     f"{report.fmt(r['elbo_se'], 2)} | {report.fmt(r['log_evidence'], 5)} | "
                     f"{report.fmt(r['path_rmse'])} | {report.fmt(r['mean_sd'])} | "
                     f"{report.fmt(r['seconds_per_step'])} | "
                     f"{report.fmt(r['cpu_seconds_per_step'])} |")
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    result = run(quick=args.quick, num_steps=args.steps, k=args.k, seeds=args.seeds,
                 output_dir=args.output_dir)
    print(json.dumps(result["rows"], indent=1))
