"""Test set-up: 8 simulated CPU devices, offline Hugging Face, the shared data folder."""

import os
import pathlib

# Must happen before jax is imported anywhere: tests run sharded code on 8 simulated devices.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """`../shared/` beside the repository; its absence is an error, not a skip."""
    if not SHARED.is_dir():
        raise FileNotFoundError(f"expected the shared test data at {SHARED}")
    return SHARED
