"""Multi-host: two processes on 127.0.0.1 (2 CPU devices each, gloo collectives, `jax.distributed`)
train one step and match a single process with 4 devices."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest
from _train_helpers import make_workspace, read_metrics, tiny_overrides
from _xla import xla_flags

TESTS = pathlib.Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(checkpoint, data, run_dir, *extra):
    overrides = tiny_overrides(checkpoint, data, run_dir, **{"run.max_steps": 1, "mesh.data": -1,
                                                             "algo.micro_batch_per_device": 2})
    return [sys.executable, "-m", "ktae_jax.cli.train", *extra, *overrides]


def _env(devices: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(TESTS), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": xla_flags(devices)}


def test_two_processes_match_one_process_with_four_devices(tmp_path):
    checkpoint, data = make_workspace(tmp_path)
    port = _free_port()
    workers = [subprocess.Popen(_command(checkpoint, data, tmp_path / "multi", "--coordinator", f"127.0.0.1:{port}",
                                         "--num-processes", "2", "--process-id", str(i)),
                                env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    single = subprocess.run(_command(checkpoint, data, tmp_path / "single"), env=_env(4), capture_output=True,
                            text=True, timeout=900)
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    assert single.returncode == 0, single.stdout + single.stderr
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output
    # Only process 0 writes metrics; both wrote the checkpoint together.
    multi, one = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    assert len(multi) == 1 and len(one) == 1
    assert (tmp_path / "multi" / "checkpoints" / "1").is_dir()
    assert multi[0]["reward/mean"] == one[0]["reward/mean"]
    for key in ("loss/total", "loss/pg", "loss/kl", "optim/grad_norm"):
        assert multi[0][key] == pytest.approx(one[0][key], rel=1e-4, abs=1e-6), key
