"""Test set-up: 8 simulated CPU devices, offline Hugging Face, the shared data folder."""

import atexit
import os
import pathlib
import shutil
import tempfile

# Must happen before jax is imported anywhere: tests run sharded code on 8 simulated devices.
# XLA:CPU's cheaper code generation (no backend optimisation passes): the tests' tiny programs run
# for milliseconds but compile for seconds, and compiling is most of the suite's CPU (-31% CPU on
# test_ktae + test_attention). HLO, shardings and memory plans are unchanged; only the machine code
# is less optimised, so results may differ in the last bits, which no test relies on (tolerances;
# the exact-zero guarantees of advantages.py are explicit `where`s, not rounding luck).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One XLA compilation cache for the session, shared with the CLI subprocesses the tests start (they
# inherit the environment): the tests build many trainers, samplers and models of the same tiny
# shapes, each tracing its own jitted closures, and compiling is most of their cost on this CPU. An
# identical program (same HLO, options, devices and jax version: the cache key) is compiled once
# and loaded afterwards; the executable is the same, so results are too. A fresh directory per
# session: nothing carries over between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="ktae-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """`../shared/` beside the repository; its absence is an error, not a skip."""
    if not SHARED.is_dir():
        raise FileNotFoundError(f"expected the shared test data at {SHARED}")
    return SHARED


@pytest.fixture
def no_compilation_cache():
    """For a test that reads what XLA's compiler prints: every program is compiled here, none loaded
    from the session's cache (a program an earlier test compiled would otherwise say nothing)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()


def pytest_collection_modifyitems(config, items):
    """test_demo.py first: it is the suite's longest file (two training runs, their evaluations and a
    resume), and `make test`'s workers take whole files in collection order (`--dist loadfile`), so
    picked up last it ran alone on one worker for minutes at the end. The rest keeps its order."""
    items.sort(key=lambda item: item.path.name != "test_demo.py")  # stable: files stay contiguous
