# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench lock clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

# Every install takes the exact versions of requirements.lock (a constraints file); a dependency
# changed in pyproject.toml without regenerating the lock stops here with the command to run.
LOCK := requirements.lock
INSTALL = $(PY) tools/lock.py check && $(VENV)/bin/pip install --quiet --constraint $(LOCK)

# The package and its runtime dependencies (the demo needs nothing more).
$(RUNTIME): pyproject.toml $(LOCK) | $(VENV)/bin/python
	$(INSTALL) -e .
	@touch $@

# Plus the test extra (pytest, hypothesis, torch==2.13.0 CPU for the parity tests, libtpu and the CUDA
# compiler for the compile-only tests, ...).
$(TESTDEPS): pyproject.toml $(LOCK) $(RUNTIME)
	$(INSTALL) -e '.[test]'
	@touch $@

setup: $(TESTDEPS)

# The demo's default is the CPU; after `make test` the venv also holds the TPU/CUDA compilers, which
# JAX would otherwise try (and loudly fail) to start. JAX_PLATFORMS=... overrides.
demo: $(RUNTIME)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(VENV)/bin/python -m ktae_jax.demo

# JAX_PLATFORMS=cpu: libtpu and the CUDA plugin (for the compile-only tests) stay unloaded at start.
# Two pytest-xdist workers (TEST_WORKERS=1: one process), each running whole test files, so a file's
# shared fixtures are built once: most tests compile or wait on subprocesses one core at a time. The
# files go out costliest first, in conftest.py's order (--no-loadscope-reorder), so both finish together.
TEST_WORKERS ?= 2
test: $(TESTDEPS)
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

bench: $(TESTDEPS)
	$(VENV)/bin/python benchmarks/bench_ktae.py

# Regenerate requirements.lock after changing a dependency (pip-tools in a venv of its own).
lock:
	test -x .venv-lock/bin/pip-compile || { $(PY) -m venv .venv-lock && .venv-lock/bin/pip install --quiet pip-tools; }
	.venv-lock/bin/python tools/lock.py write

clean:
	rm -rf $(VENV) .venv-lock
