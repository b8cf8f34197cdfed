# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

# The package and its runtime dependencies (the demo needs nothing more).
$(RUNTIME): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e .
	@touch $@

# Plus the test extra (pytest, hypothesis, torch==2.13.0 CPU for the parity tests, libtpu and the CUDA
# compiler for the compile-only tests, ...).
$(TESTDEPS): pyproject.toml $(RUNTIME)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	@touch $@

setup: $(TESTDEPS)

demo: $(RUNTIME)
	$(VENV)/bin/python -m ktae_jax.demo

# JAX_PLATFORMS=cpu: libtpu and the CUDA plugin (for the compile-only tests) stay unloaded at start.
test: $(TESTDEPS)
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest -q tests

bench: $(TESTDEPS)
	$(VENV)/bin/python benchmarks/bench_ktae.py

clean:
	rm -rf $(VENV)
