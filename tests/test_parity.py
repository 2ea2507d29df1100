"""The two backends expose the same public names and keyword arguments."""

import inspect

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

import numpyro_mixvi  # noqa: E402
import pyro_mixvi  # noqa: E402

# Arguments that only one host has (Pyro's create_plates, NumPyro's prefix and rng keys).
HOST_ONLY = {"create_plates", "prefix", "rng_key", "generator", "self", "args", "kwargs"}


def test_same_public_names():
    assert sorted(pyro_mixvi.__all__) == sorted(numpyro_mixvi.__all__)


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
