"""mixvi for Pyro (torch): mixture, semi-implicit and flow-mixture guides and their ELBOs.

The public names are the same in ``numpyro_mixvi``. This package never imports JAX.
"""

__all__: list[str] = []
