"""NumPyro backend tests on the CPU; float32 by default and float64 through the ``x64`` fixture."""

import pytest

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")


@pytest.fixture(params=[False, True], ids=["float32", "float64"])
def x64(request):
    """Run the test with ``jax_enable_x64`` off and on; the library must follow the setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", request.param)
    yield request.param
    jax.config.update("jax_enable_x64", previous)
