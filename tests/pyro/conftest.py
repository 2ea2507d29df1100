"""Pyro backend tests: clean param store, validation on, seeded; float32 and float64 fixtures."""

import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")


@pytest.fixture(autouse=True)
def _pyro_state():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    default = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default)
    pyro.clear_param_store()


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    """Run the test under each default dtype; the library must follow it, never hard-code one."""
    torch.set_default_dtype(request.param)
    return request.param
