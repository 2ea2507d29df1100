"""Backend-free parts of mixvi: gold-standard data, accuracy metrics and the ArviZ conversion.

The guides live in the backend packages: ``pyro_mixvi`` (torch + Pyro) and ``numpyro_mixvi``
(JAX + NumPyro). This package depends on numpy only, so both backends share one copy of the
metrics and of the code that turns numpy draws into ArviZ data.
"""

from mixvi.bench_data import (
    bench_data_dir,
    list_posteriordb,
    load_euler_image,
    load_posteriordb,
    load_waveform,
)
from mixvi.metrics import (
    compare_to_reference,
    flatten_draws,
    mmd,
    monte_carlo_kl,
    sd_ratio,
    sliced_wasserstein,
    standardized_mean_error,
)
from mixvi.psis import LogEvidence, log_evidence_from_weights, pareto_khat

__all__ = [
    "LogEvidence",
    "bench_data_dir",
    "compare_to_reference",
    "flatten_draws",
    "list_posteriordb",
    "load_euler_image",
    "load_posteriordb",
    "load_waveform",
    "log_evidence_from_weights",
    "mmd",
    "pareto_khat",
    "monte_carlo_kl",
    "sd_ratio",
    "sliced_wasserstein",
    "standardized_mean_error",
]
