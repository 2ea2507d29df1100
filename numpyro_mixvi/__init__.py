"""mixvi for NumPyro (JAX): mixture, semi-implicit and flow-mixture guides and their ELBOs.

The public names are the same in ``pyro_mixvi``. This package never imports torch.
"""

from numpyro_mixvi.arviz import to_arviz
from numpyro_mixvi.diagnostics import log_evidence, log_importance_weights, psis_diagnostic
from numpyro_mixvi.distributions.cwm import ClassifierWeightedMixture
from numpyro_mixvi.distributions.flow_mixture import FlowMixture, fit_weights
from numpyro_mixvi.elbos.rb_mixture import RBMixture_ELBO
from numpyro_mixvi.elbos.sivi import SIVI_ELBO
from numpyro_mixvi.flows import MAF, RBIG, RealNVP
from numpyro_mixvi.guides.cwm import AutoCWM
from numpyro_mixvi.guides.flow_mixture import AutoFlowMixture
from numpyro_mixvi.guides.sivi import AutoSIVI
from numpyro_mixvi.multimodal import (
    JNF,
    JNFShared,
    MoEVAE,
    PoEVAE,
    make_circles_squares,
    make_paired_digits,
)
from numpyro_mixvi.posteriordb import POSTERIORDB_MODELS, register_posteriordb_model
from numpyro_mixvi.targets import CONJUGATE_MODELS, TARGETS, GaussianMixture, target_model

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
