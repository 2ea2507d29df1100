"""Multimodal VAEs with joint normalizing flows (JNF, JNFShared) and their baselines; floor 2."""

from mixvi.multimodal_data import MultimodalData, make_circles_squares, make_paired_digits

from .baselines import MoEVAE, PoEVAE
from .jnf import JNF, JNFShared
from .poe import gaussian_product_of_experts, product_of_experts_log_prob

__all__ = [
    "JNF",
    "JNFShared",
    "MoEVAE",
    "MultimodalData",
    "PoEVAE",
    "gaussian_product_of_experts",
    "make_circles_squares",
    "make_paired_digits",
    "product_of_experts_log_prob",
]
