"""Test set-up: 8 simulated CPU devices, offline Hugging Face, the shared data folder."""

import atexit
import os
import pathlib
import shutil
import tempfile

# Must happen before jax is imported anywhere: tests run sharded code on 8 simulated devices, with
# XLA:CPU's quicker-compiling emitters (`_xla.py`).
from _xla import xla_flags

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
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


# The costliest files first (CPU seconds of each file in a full run, Dec 2), so that `make test`'s
# two workers, each taking the next whole file when free, finish close together: xdist's default
# order (most tests first) left the one-test demo and multi-host files for the end, and one worker
# idle for minutes. Files not named here follow, in their usual order.
COSTLIEST_FIRST = ("test_sample.py", "test_train.py", "test_demo.py", "test_step.py", "test_aot.py",
                   "test_ktae.py", "test_attention.py", "test_rundir.py", "test_models.py", "test_multihost.py",
                   "test_lora.py", "test_tiny.py", "test_advantages.py", "test_gemma.py", "test_evaluate.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
