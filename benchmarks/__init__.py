"""mixvi's benchmarks: accuracy against gold standards and speed against the built-in guides.

Command line: ``python -m benchmarks SUBCOMMAND [options]`` (see :mod:`benchmarks.cli`).
Python API:

- :func:`evaluate` fits one guide on one model at a :class:`Budget` and scores it against
  reference draws (standardized mean error, sd ratio, sliced W2, Pareto-k̂, log-evidence,
  wall-clock, peak memory);
- :data:`GUIDES` / :func:`register_guide` and :data:`MODELS` / :func:`register_model` are the
  registries the benchmarks iterate over (a guide with its ELBO; a model keyed by posterior name);
- each benchmark module (``posteriordb``, ``waveform``, ``timing``) and each seed reproduction
  exposes ``run(*, quick=False, seeds=..., output_dir=...) -> dict``.

Only ``benchmarks._pyro`` imports torch and only ``benchmarks._numpyro`` imports JAX; both are
loaded on first use, so importing this package needs neither.

Example:
    >>> from benchmarks import Budget, GUIDES
    >>> Budget(num_steps=500).num_particles
    8
    >>> sorted(GUIDES)
    ['numpyro', 'pyro']
"""

from benchmarks.guides import GUIDES, GuideSpec, register_guide
from benchmarks.harness import Budget, evaluate
from benchmarks.models import MODELS, register_model

__all__ = [
    "GUIDES",
    "MODELS",
    "Budget",
    "GuideSpec",
    "evaluate",
    "register_guide",
    "register_model",
]
