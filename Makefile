# Two commands for a new machine with nothing but Python: `make demo` and `make test`.
# Each creates its virtual environments when missing and installs what it needs.

PYTHON ?= python3.11
TORCH_VERSION ?= 2.13.0
# Python 3.12 runs the torch-free leg (newest JAX, NumPyro and ArviZ 1.x).
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV := .venv
VENV312 := .venv312
PYTEST_ARGS ?= -n 2
# One thread per test worker: the suite runs two workers on two cores.
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1
export XLA_FLAGS := --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1
export JAX_PLATFORMS := cpu
# JAX's persistent compilation cache: tests, tutorials and benchmarks compile the same programs
# from fresh closures many times. Measured on tests/numpyro/test_conformance.py: CPU time 3 min 14 s
# without, 2 min 51 s with an empty cache, 1 min 05 s on a rerun.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES ?= 0

.PHONY: all venv venv312 demo test test-311 test-312 test-slow lint benchmarks docs docs-quick clean

all: test

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip setuptools wheel
	# The CPU build of torch first, so nothing later pulls a multi-GB GPU build.
	$(VENV)/bin/python -m pip install "torch==$(TORCH_VERSION)"
	$(VENV)/bin/python -m pip install -e ".[all,test]"
	touch $@

$(VENV312)/.installed: setup.cfg pyproject.toml
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install --upgrade pip setuptools wheel
	$(VENV312)/bin/python -m pip install -e ".[numpyro,arviz,test]" "arviz>=1"
	touch $@

venv: $(VENV)/.installed

venv312:
	@if [ -n "$(PYTHON312)" ]; then $(MAKE) $(VENV312)/.installed; \
	else echo "Python 3.12 not found: the NumPyro / ArviZ 1.x leg cannot run (set PYTHON312=...)."; fi

# The NumPyro logistic-regression tutorial at small budgets: NUTS reference, every guide compared,
# ArviZ summary, LOO with k-hat; figures saved under demo_output/.
demo: venv
	MIXVI_TUTORIAL_QUICK=1 MIXVI_TUTORIAL_OUTPUT=demo_output $(VENV)/bin/python tutorials/numpyro_logistic_regression.py
	@echo "figures: $$(ls demo_output/*.png | tr '\n' ' ')"

# Python 3.11: Pyro backend, shared numpy code, ArviZ 0.x, and the cross-backend parity checks.
test-311: venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) -m "not slow" tests/common tests/pyro tests/test_parity.py

# Python 3.12, no torch: NumPyro backend and ArviZ 1.x.
test-312: venv312
	@if [ -n "$(PYTHON312)" ]; then \
		$(VENV312)/bin/python -m pytest $(PYTEST_ARGS) -m "not slow" tests/common tests/numpyro; \
	else echo "SKIPPED the Python 3.12 leg: no python3.12 on this machine; NumPyro runs in the 3.11 leg only."; \
		$(VENV)/bin/python -m pytest $(PYTEST_ARGS) -m "not slow" tests/numpyro; fi

test: test-311 test-312

test-slow: venv venv312
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) -m slow tests/common tests/pyro
	$(VENV312)/bin/python -m pytest $(PYTEST_ARGS) -m slow tests/common tests/numpyro

lint: venv
	$(VENV)/bin/ruff check .

# Docs: each tutorial (tutorials/<backend>_*.py, jupytext percent format) is executed into a
# notebook under docs/tutorials/ (re-run when it or the package changes), then mkdocs builds the
# site with warnings as errors. `make docs-quick` executes the tutorials at small budgets (CI).
DOCS_TUTORIALS := $(wildcard tutorials/*.py)
DOCS_NOTEBOOKS := $(patsubst tutorials/%.py,docs/tutorials/%.ipynb,$(DOCS_TUTORIALS))
PACKAGE_SOURCES := $(shell find mixvi pyro_mixvi numpyro_mixvi -name '*.py' 2>/dev/null)
export NO_MKDOCS_2_WARNING := 1

$(VENV)/.docs-installed: $(VENV)/.installed setup.cfg
	$(VENV)/bin/python -m pip install -e ".[all,docs]"
	touch $@

docs/tutorials/%.ipynb: tutorials/%.py $(PACKAGE_SOURCES) | $(VENV)/.docs-installed
	@mkdir -p docs/tutorials
	PYTHONPATH=$(CURDIR) MPLBACKEND=module://matplotlib_inline.backend_inline $(VENV)/bin/python -m jupytext \
		--to ipynb --set-kernel python3 --execute --output $@ $<

docs: $(DOCS_NOTEBOOKS) | $(VENV)/.docs-installed
	$(VENV)/bin/mkdocs build --strict

docs-quick: | $(VENV)/.docs-installed
	rm -f $(DOCS_NOTEBOOKS)
	$(MAKE) docs MIXVI_TUTORIAL_QUICK=1
	rm -f $(DOCS_NOTEBOOKS)

benchmarks: venv
	$(VENV)/bin/python -m benchmarks --help

clean:
	rm -rf $(VENV) $(VENV312) *.egg-info .pytest_cache site docs/tutorials/*.ipynb .cache/jax
