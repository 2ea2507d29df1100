"""mixvi for Pyro (torch): mixture, semi-implicit and flow-mixture guides and their ELBOs.

The public names are the same in ``numpyro_mixvi``. This package never imports JAX.
"""

from pyro_mixvi.arviz import to_arviz
from pyro_mixvi.diagnostics import log_evidence, log_importance_weights, psis_diagnostic
from pyro_mixvi.distributions.cwm import ClassifierWeightedMixture
from pyro_mixvi.distributions.flow_mixture import FlowMixture, fit_weights
from pyro_mixvi.elbos.rb_mixture import RBMixture_ELBO
from pyro_mixvi.elbos.sivi import SIVI_ELBO
from pyro_mixvi.flows import MAF, RBIG, RealNVP
from pyro_mixvi.guides.cwm import AutoCWM
from pyro_mixvi.guides.flow_mixture import AutoFlowMixture
from pyro_mixvi.guides.sivi import AutoSIVI
from pyro_mixvi.multimodal import (
    JNF,
    JNFShared,
    MoEVAE,
    PoEVAE,
    make_circles_squares,
    make_paired_digits,
)
from pyro_mixvi.posteriordb import POSTERIORDB_MODELS, register_posteriordb_model
from pyro_mixvi.targets import CONJUGATE_MODELS, TARGETS, GaussianMixture, target_model

__all__: list[str] = [
    "AutoCWM",
    "AutoFlowMixture",
    "CONJUGATE_MODELS",
    "ClassifierWeightedMixture",
    "FlowMixture",
    "MAF",
    "POSTERIORDB_MODELS",
    "RBIG",
    "RBMixture_ELBO",
    "RealNVP",
    "TARGETS",
    "AutoSIVI",
    "GaussianMixture",
    "JNF",
    "JNFShared",
    "MoEVAE",
    "PoEVAE",
    "make_circles_squares",
    "log_evidence",
    "log_importance_weights",
    "make_paired_digits",
    "psis_diagnostic",
    "SIVI_ELBO",
    "register_posteriordb_model",
    "fit_weights",
    "target_model",
    "to_arviz",
]
