"""`ktae-train --compile-only`: targets by name, the tiny config compiled for a TPU slice and a GPU
host (XLA's own figures checked against hand-computed sizes), the refusal of a 7B plan without
sharding, and the errors (mesh / target mismatch, unknown name, missing plugin)."""

import json
import math
import pathlib

import pytest

from ktae_jax import aot, hardware
from ktae_jax.cli.train import main as train_main
from ktae_jax.config import load_config
from ktae_jax.plan import model_config_for

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "configs/tiny.yaml"
GiB = 2**30


@pytest.fixture
def cli(capsys):
    """`ktae-train ARGS` in this process: (exit code, stdout, stderr)."""
    def run(*args: str) -> tuple[int, str, str]:
        code = train_main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


@pytest.mark.parametrize("name, devices, shape", [
    ("v5p-128", 64, "4x4x4"), ("v4-64", 32, "2x4x4"), ("v4-8", 4, "2x2x1"), ("v5p-256", 128, "4x4x8"),
    ("v5e-32", 32, "4x8"), ("v5litepod-16", 16, "4x4"), ("v6e-8", 8, "2x4"),
])
def test_tpu_names_count_chips_as_cloud_tpu_does(name, devices, shape):
    target = hardware.target(name)
    assert len(target.devices) == devices and shape in target.description and target.platform == "tpu"
    # XLA's TPU compiler states its HBM per chip: v5p 95.74G, v4 30.75G, v5e 15.75G, v6e 31.25G.
    hbm = {"v5p": 95.74, "v4": 30.75, "v5e": 15.75, "v5litepod": 15.75, "v6e": 31.25}[name.split("-")[0]]
    assert target.usable_bytes == pytest.approx(hbm * GiB, rel=1e-4)


@pytest.mark.parametrize("name, devices, hosts, memory", [
    ("h100x8", 8, 1, 84942979072), ("h100x32", 32, 4, 84942979072), ("h200x8", 8, 1, 150177054720),
    ("a100x8", 8, 1, 85321580544), ("h100x2", 2, 1, 84942979072),
])
def test_gpu_names_and_the_usable_fraction(name, devices, hosts, memory, monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    target = hardware.target(name)
    assert len(target.devices) == devices and target.platform == "gpu"
    assert len({d.process_index for d in target.devices}) == hosts
    assert target.usable_bytes == int(memory * 0.75)  # JAX's default share of a GPU
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
    assert hardware.target(name).usable_bytes == int(memory * 0.9)


@pytest.mark.parametrize("name", ["v5p-12", "v5e-3", "h100x3", "h100x12", "tpu", "v7-8", "h100"])
def test_unknown_targets_list_the_valid_ones(name):
    with pytest.raises(hardware.TargetError, match=r"unknown target .*valid: v4-N.*h100xN"):
        hardware.target(name)


@pytest.mark.parametrize("name, extra", [("v5e-4", "tpu"), ("h100x8", "cuda")])
def test_a_missing_compiler_plugin_names_the_extra(name, extra, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod in ("libtpu", "jax_plugins.xla_cuda12") else real(mod, *a))
    with pytest.raises(hardware.TargetError, match=rf"pip install 'ktae-jax\[{extra}\]'"):
        hardware.target(name)


def test_the_hbm_message_parses():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(1.50T) exceeds available HBM (95.74G).")
    assert hardware.parse_hbm_message(message) == (round(1.5 * 2**40), round(95.74 * GiB))


def _tiny_state_bytes(devices: int) -> tuple[int, int]:
    """By hand: (parameters, AdamW state + step + key) per device, replicated (mesh data only)."""
    n = model_config_for("tiny")[0].num_params
    return 4 * n, 4 * n * 3 + 4 * 2 + 4 + 8  # f32 params + mu + nu; Adam's and the schedule's counts; step; key


def _check_tiny(report: dict, devices: int, usable: int, padded: bool) -> None:
    """`padded`: the TPU lays arrays out in (8, 128) tiles, a little more than their bytes."""
    assert report["devices"] == devices and report["usable_bytes"] == usable and report["fits"] is True
    assert set(report["programs"]) == {"update", "logprobs", "sampler"}
    for p in report["programs"].values():
        assert p["fits"] is True and p["compiled"] is True and p["compile_s"] > 0
        assert isinstance(p["peak_bytes"], int) and p["peak_bytes"] >= p["argument_bytes"] > 0
        assert p["temp_bytes"] >= 0 and p["total_bytes"] == p["peak_bytes"] + p["resident_bytes"]
    assert report["programs"]["update"]["temp_bytes"] > 0  # activations and gradients
    def same(xla: int, by_hand: int) -> bool:
        return by_hand <= xla <= 1.05 * by_hand if padded else xla == by_hand

    # XLA's argument sizes match the shapes by hand: the tiny config's 16 x 8 = 128 rows of
    # 24 + 48 tokens, split over the data axis.
    params, state = _tiny_state_bytes(devices)
    rows = 128 // devices
    # tokens and attention mask; response mask and advantages (on-policy with kl_coef 0, the update
    # reads neither old nor reference log-probs, and jit drops unused arguments)
    batch = rows * ((24 + 48) * 4 * 2 + 48 * 4 * 2)
    assert same(report["programs"]["update"]["argument_bytes"], state + batch)
    assert same(report["programs"]["logprobs"]["argument_bytes"], params + rows * (24 + 48) * 4 * 2)
    prompts = 16 // devices  # the sampler: every prompt in one call, ids + mask, and a key
    assert same(report["programs"]["sampler"]["argument_bytes"], params + prompts * 24 * 4 * 2 + 8)
    # The update gives its state back in place (donated): outputs alias the state's buffers.
    assert report["programs"]["update"]["alias_bytes"] >= params


def test_tiny_config_compiles_for_a_gpu_host_through_the_cli(cli, monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    code, out, err = cli("--config", str(TINY), "--compile-only", "--target", "h100x8", "--json")
    assert code == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert set(report) == {"target", "devices", "usable_bytes", "fits", "programs"}
    _check_tiny(report, 8, int(84942979072 * 0.75), padded=False)
    assert report["target"] == "h100x8"
    assert "verdict: fits on h100x8" in out


def test_tiny_config_compiles_for_a_tpu_slice():
    # Layers unrolled: XLA's FLOP count takes a loop's body once, so a scanned stack counts one layer.
    cfg = load_config([TINY], ["model.scan_layers=false"])
    report = aot.compile_only(cfg, "v5e-4")
    _check_tiny(report, 4, round(15.75 * GiB), padded=True)
    # The TPU backend counts FLOPs: the update does at least the forward pass's 2 x parameters per
    # token of the step's rows on this device (here: prompts once per group, every response token).
    n = model_config_for("tiny")[0].num_params
    tokens = (16 * 24 + 128 * 48) / 4
    assert report["programs"]["update"]["flops"] > 2 * n * tokens
    text = aot.format_report(report)
    assert "update" in text and "verdict: fits on v5e-4" in text


def test_7b_without_sharding_is_refused_on_8_h100(cli, monkeypatch):
    """DAPO+KTAE 7B with no FSDP: every device would hold the whole 7.6B parameters and both AdamW
    moments in float32, 12 bytes x 7.6B = 85 GiB, more than an H100's usable 59 GiB before any
    activation. That is decided exactly from the arguments' shapes, without compiling (seconds)."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    code, out, err = cli("--config", str(REPO / "configs/paper/dapo_ktae_7b.yaml"), "--config",
                         str(REPO / "configs/mesh/gpu_1x8.yaml"), "mesh.data=8", "mesh.fsdp=1", "--compile-only",
                         "--target", "h100x8", "--json")
    assert code == 1, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["fits"] is False
    update = report["programs"]["update"]
    n = model_config_for("qwen2.5-math-7b")[0].num_params
    assert update["fits"] is False and update["argument_bytes"] >= 12 * n > report["usable_bytes"]
    assert "exceed the usable 59.33 GiB" in update["reason"] and "DOES NOT FIT" in out


def test_a_mesh_that_does_not_match_the_target_names_both(cli):
    code, _, err = cli("--config", str(TINY), "mesh.data=2", "mesh.fsdp=2", "--compile-only", "--target", "h100x8")
    assert code == 2 and "mesh (data=2 x fsdp=2 x tensor=1) needs 4 devices, but target h100x8 has 8" in err
    code, _, err = cli("--config", str(TINY), "mesh.fsdp=3", "--compile-only", "--target", "v5p-128")
    assert code == 2 and "needs a multiple of 3 devices, but target v5p-128 has 64" in err
    code, _, err = cli("--config", str(TINY), "--compile-only", "--target", "h100x9")
    assert code == 2 and "unknown target 'h100x9'" in err
    code, _, err = cli("--config", str(TINY), "--target", "h100x8")
    assert code == 2 and "--compile-only" in err


def test_per_device_bytes_counts_shards():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from ktae_jax.mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    x = jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
    y = jax.ShapeDtypeStruct((3,), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    assert aot.per_device_bytes([x, y]) == 2 * 6 * 4 + 3 * 2 == math.prod((8 // 4, 6)) * 4 + 6


def test_compile_failures_are_a_verdict_only_when_memory_runs_out():
    """A TPU compile that runs out of HBM is a refusal with the compiler's figures; any other
    compile error is an error (one line), not a verdict."""
    def lower_raising(message):
        def lower(*args):
            raise RuntimeError(message)
        return lower

    oom = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(120.00G) exceeds available HBM (95.74G).\nmore detail")
    result = aot.compile_program(lower_raising(oom), (), resident=0, usable=round(95.74 * GiB))
    assert result["fits"] is False and result["peak_bytes"] == 120 * GiB
    assert result["reason"].startswith("the compiler ran out of memory: RESOURCE_EXHAUSTED")
    with pytest.raises(aot.CompileError, match="RuntimeError: Mosaic kernels cannot be automatically partitioned$"):
        aot.compile_program(lower_raising("Mosaic kernels cannot be automatically partitioned\ntrace..."), (),
                            resident=0, usable=GiB)


def test_a_tpu_target_leaves_no_pod_environment_behind(monkeypatch):
    # libtpu's start-up variables stay out of the process: left in, TPU_WORKER_HOSTNAMES made every later
    # ktae-train in this process start jax.distributed as if on a TPU pod host.
    import os

    from ktae_jax import distributed, hardware

    for key in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(key, raising=False)
    hardware.target("v5e-4")
    assert "TPU_WORKER_HOSTNAMES" not in os.environ and "TPU_ACCELERATOR_TYPE" not in os.environ
    assert not distributed._auto_detected()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert not distributed._auto_detected()  # one TPU VM host: nothing to coordinate
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert distributed._auto_detected()
