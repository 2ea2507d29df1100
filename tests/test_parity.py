"""The two backends expose the same public names and keyword arguments."""

import inspect

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

import numpyro_mixvi  # noqa: E402
import pyro_mixvi  # noqa: E402

# Arguments that only one host has (Pyro's create_plates, NumPyro's prefix and rng keys).
HOST_ONLY = {"create_plates", "prefix", "rng_key", "params", "generator", "self", "args", "kwargs"}


# Names one backend exports before the other has them, each with the reason. A name listed here
# that both backends export, or a one-sided name not listed, fails the test: the list can only
# shrink honestly, and it must be empty for a release.
PENDING: dict[str, str] = {
}


def test_same_public_names():
    one_sided = set(pyro_mixvi.__all__) ^ set(numpyro_mixvi.__all__)
    assert one_sided == set(PENDING), f"one-sided names: {sorted(one_sided)}; listed: {PENDING}"


@pytest.mark.parametrize("name", sorted(set(pyro_mixvi.__all__) & set(numpyro_mixvi.__all__)))
def test_same_keywords(name):
    def keywords(obj):
        target = obj.__init__ if inspect.isclass(obj) else obj
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            return set()
        return {p for p in params if p not in HOST_ONLY}

    assert keywords(getattr(pyro_mixvi, name)) == keywords(getattr(numpyro_mixvi, name))


def test_same_registry_names():
    """Targets and conjugate models are registered under the same names in both backends."""
    from numpyro_mixvi import targets as jax_targets
    from pyro_mixvi import targets as torch_targets

    assert list(torch_targets.TARGETS) == list(jax_targets.TARGETS)
    assert list(torch_targets.CONJUGATE_MODELS) == list(jax_targets.CONJUGATE_MODELS)
    assert sorted(torch_targets.__all__) == sorted(jax_targets.__all__)
