"""Flow experts with one interface (MAF, RealNVP, RBIG); floor 1.

``MAF`` and ``RealNVP`` are thin factories over maintained flow libraries and accept a context
(conditional flows); ``RBIG`` is fit from samples.
"""

from .maf import MAF
from .rbig import RBIG, RBIGState, RBIGTransform, rbig_init, rbig_step
from .realnvp import RealNVP

__all__ = ["MAF", "RBIG", "RBIGState", "RBIGTransform", "RealNVP", "rbig_init", "rbig_step"]
