"""mixvi for NumPyro (JAX): mixture, semi-implicit and flow-mixture guides and their ELBOs.

The public names are the same in ``pyro_mixvi``. This package never imports torch.
"""

__all__: list[str] = []
