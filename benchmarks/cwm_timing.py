"""AutoCWM step time for K = 4, 8, 16 relative to the framework's flow guide (AutoIAFNormal).

Same model (a synthetic Bayesian logistic regression, 400 rows), same number of ELBO particles
per step, one process per backend, guides timed one after another. AutoCWM with
``RBMixture_ELBO(num_particles=N)`` evaluates the model at ``N * K`` points per step (one
vectorized call), so the table also gives the time per model evaluation. Pyro steps run eagerly;
NumPyro steps are the jitted ``SVI.update`` (compilation excluded by warm-up steps).

With ``--flow-layers L`` the table adds ``AutoCWM(..., flow_layers=L)`` at each K: its
components carry RealNVP flows (Pyro: a Python loop over the K flow modules; NumPyro: the K
flows stacked and ``vmap``-ed), so the rows show what the flows cost per K.

Example:
    $ python -m benchmarks.cwm_timing --quick
    $ python -m benchmarks.cwm_timing --quick --flow-layers 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks import report

NAME = "cwm_timing"
COMPONENTS = (4, 8, 16)


def synthetic_blr(dim: int, num_rows: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal ``X (num_rows, dim)``; labels from ``w ~ N(0, 1/dim)``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_rows, dim))
    w = rng.normal(size=dim) / np.sqrt(dim)
    return x, (rng.random(num_rows) < 1 / (1 + np.exp(-x @ w))).astype(float)


def _pyro_times(dim: int, num_particles: int, num_steps: int,
                flow_layers: int = 0) -> dict[str, float]:
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoIAFNormal

    from pyro_mixvi import AutoCWM, RBMixture_ELBO

    x, y = (torch.as_tensor(a, dtype=torch.float32) for a in synthetic_blr(dim))

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        with pyro.plate("data", x.shape[0]):  # w: (..., 1, D) under particle plates
            pyro.sample("y", dist.Bernoulli(logits=(w * x).sum(-1)), obs=y)

    setups = {"AutoIAFNormal": (lambda: AutoIAFNormal(model),
                                Trace_ELBO(num_particles=num_particles, vectorize_particles=True))}
    for k in COMPONENTS:
        setups[f"AutoCWM K={k}"] = (lambda k=k: AutoCWM(model, num_components=k),
                                    RBMixture_ELBO(num_particles=num_particles))
    for k in COMPONENTS if flow_layers else ():
        setups[f"AutoCWM+flows K={k}"] = (
            lambda k=k: AutoCWM(model, num_components=k, flow_layers=flow_layers),
            RBMixture_ELBO(num_particles=num_particles))
    times = {}
    for name, (make_guide, elbo) in setups.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        svi = SVI(model, make_guide(), pyro.optim.Adam({"lr": 1e-3}), elbo)
        for _ in range(5):
            svi.step(x, y)
        steps = []
        for _ in range(num_steps):
            start = time.perf_counter()
            svi.step(x, y)
            steps.append(time.perf_counter() - start)
        times[name] = statistics.median(steps)
    return times


def _numpyro_times(dim: int, num_particles: int, num_steps: int,
                   flow_layers: int = 0) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoIAFNormal

    from numpyro_mixvi import AutoCWM, RBMixture_ELBO

    x, y = (jnp.asarray(a, jnp.float32) for a in synthetic_blr(dim))

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)

    setups = {"AutoIAFNormal": (lambda: AutoIAFNormal(model),
                                Trace_ELBO(num_particles=num_particles))}
    for k in COMPONENTS:
        setups[f"AutoCWM K={k}"] = (lambda k=k: AutoCWM(model, num_components=k),
                                    RBMixture_ELBO(num_particles=num_particles))
    for k in COMPONENTS if flow_layers else ():
        setups[f"AutoCWM+flows K={k}"] = (
            lambda k=k: AutoCWM(model, num_components=k, flow_layers=flow_layers),
            RBMixture_ELBO(num_particles=num_particles))
    times = {}
    for name, (make_guide, elbo) in setups.items():
        svi = SVI(model, make_guide(), optax.adam(1e-3), elbo)
        state = svi.init(jax.random.key(0), x, y)
        update = jax.jit(svi.update)
        for _ in range(5):
            state, loss = update(state, x, y)
        jax.block_until_ready(loss)
        steps = []
        for _ in range(num_steps):
            start = time.perf_counter()
            state, loss = update(state, x, y)
            jax.block_until_ready(loss)
            steps.append(time.perf_counter() - start)
        times[name] = statistics.median(steps)
    return times


def run(*, quick: bool = False, seeds=(0,), output_dir=None, backend: str = "pyro",  # noqa: ANN001
        dim: int = 22, num_particles: int = 8, flow_layers: int = 0) -> dict:
    """Median step time of each guide and its ratio to AutoIAFNormal, for one backend.

    Returns:
        ``{"rows": [{"guide", "seconds_per_step", "ratio_to_iaf", "model_evals_per_step"}],
        "backend", "dim", "num_particles", "metadata"}``.
    """
    num_steps = 20 if quick else 200
    timer = _pyro_times if backend == "pyro" else _numpyro_times
    times = timer(dim, num_particles, num_steps, flow_layers)
    base = times["AutoIAFNormal"]
    rows = []
    for name, seconds in times.items():
        k = int(name.split("=")[1]) if "=" in name else 1
        rows.append({"guide": name, "seconds_per_step": seconds, "ratio_to_iaf": seconds / base,
                     "model_evals_per_step": num_particles * k})
    command = (f"python -m benchmarks.cwm_timing --backend {backend}{' --quick' * quick}"
               f"{f' --flow-layers {flow_layers}' if flow_layers else ''}")
    results = {"rows": rows, "backend": backend, "dim": dim, "num_particles": num_particles,
               "flow_layers": flow_layers,
               "num_timed_steps": num_steps, "seeds": list(seeds),
               "metadata": report.metadata(command)}
    table = report.markdown_table(
        ["guide", "ms / step", "ratio to AutoIAFNormal", "model evaluations / step"],
        [[r["guide"], f"{1e3 * r['seconds_per_step']:.2f}", f"{r['ratio_to_iaf']:.2f}",
          r["model_evals_per_step"]] for r in rows],
    )
    markdown = (f"## AutoCWM step time ({backend}, D = {dim}, {num_particles} particles)\n\n"
                f"{report.metadata_markdown(results['metadata'])}\n{table}")
    out = Path(output_dir) if output_dir is not None else (
        report.QUICK_RESULTS_DIR if quick else report.RESULTS_DIR)
    report.write_results(f"{NAME}_{backend}", results, out, markdown)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 timed steps instead of 200")
    parser.add_argument("--backend", choices=["pyro", "numpyro"], default="pyro")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--flow-layers", type=int, default=0,
                        help="also time AutoCWM with RealNVP flow components of this depth")
    arguments = parser.parse_args()
    result = run(quick=arguments.quick, backend=arguments.backend,
                 output_dir=arguments.output_dir, flow_layers=arguments.flow_layers)
    for row in result["rows"]:
        print(row)
