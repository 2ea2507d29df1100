"""mixvi test suite (a package, so tests/pyro does not shadow the pyro package)."""
