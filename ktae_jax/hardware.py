"""Accelerator targets by their usual names, as abstract devices this machine can compile for.

`target("v5p-128")` or `target("h100x8")` -> a `Target`: its abstract devices (no hardware is
touched; XLA only needs their description), and the memory per device a run may use.

  TPU  `v4-N`, `v5p-N` (N TensorCores, 2 per chip: v5p-128 is 64 chips), `v5e-N`, `v6e-N`
       (N chips; `v5litepod-N` is gcloud's name for v5e-N); topologies from libtpu
       (`jax.experimental.topologies.get_topology_desc`). Usable memory: the HBM XLA itself
       allows per chip, read from its own out-of-memory message on a probe compile.
  GPU  `h100xN`, `h200xN`, `a100xN` (N = 1, 2, 4, 8, or 8 per host on several hosts); devices
       from the CUDA plugin and the GPU descriptions shipped in `gpu_targets/`. Usable memory:
       the share JAX's GPU client gives XLA, `XLA_PYTHON_CLIENT_MEM_FRACTION` (0.75 unless set),
       of the device's memory; the rest is the CUDA context, cuBLAS / cuDNN / NCCL workspaces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

GPU_DESCRIPTIONS = {"h100": "h100_sxm.txtpb", "h200": "h200_sxm.txtpb", "a100": "a100_sxm_80.txtpb"}
GPU_MEM_FRACTION_DEFAULT = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION on GPU
TPU_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}  # what the N of `vX-N` counts
VALID_NAMES = ("v4-N and v5p-N (N TensorCores: 8, 16, 32, ..., 4096), v5e-N and v6e-N (N chips: 4, 8, ..., 256; "
               "v5litepod-N = v5e-N), h100xN, h200xN, a100xN (N GPUs: 1, 2, 4, 8, or a multiple of 8 = 8 per host)")


class TargetError(ValueError):
    """An unknown target, a missing compiler plugin, or a plan that does not match the target."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given, e.g. "v5p-128"
    platform: str  # "tpu" or "gpu"
    devices: tuple  # abstract devices, in the order a real run's jax.devices() lists them
    usable_bytes: int  # memory per device XLA may use
    memory_note: str  # where usable_bytes comes from
    description: str  # e.g. "TPU v5p 4x4x4 (64 chips)"


def _tpu_shape(generation: str, chips: int) -> tuple[int, ...] | None:
    """Cloud TPU's slice shapes: 3-D tori for v4 / v5p (2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...),
    2-D for v5e / v6e (2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16)."""
    if chips < 4 or chips & (chips - 1):
        return None
    if generation in ("v5e", "v6e"):
        if chips > 256:
            return None
        shape = [2, 2]
    else:
        shape = [2, 2, 1]
    while np.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == smallest)  # the last of the smallest grows
        shape[last] *= 2
    return tuple(shape)


def _require(module: str, extra: str, name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TargetError(f"target {name} needs {module.split('.')[-1]}, which is not installed: "
                          f"pip install 'ktae-jax[{extra}]'")


def target(name: str) -> Target:
    """The `Target` for a usual name; an unknown name raises listing the valid ones."""
    tpu = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    gpu = re.fullmatch(r"(h100|h200|a100)x(\d+)", name)
    if tpu:
        generation = "v5e" if tpu.group(1) == "v5litepod" else tpu.group(1)
        count = int(tpu.group(2))
        chips, rest = divmod(count, TPU_CORES_PER_CHIP[generation])
        shape = None if rest else _tpu_shape(generation, chips)
        if shape is not None:
            return _tpu_target(name, generation, shape)
    if gpu:
        count = int(gpu.group(2))
        if count in (1, 2, 4) or (count and count % 8 == 0):
            return _gpu_target(name, gpu.group(1), count)
    raise TargetError(f"unknown target {name!r}; valid: {VALID_NAMES}")


# ---------------------------------------------------------------------- TPU
def _tpu_target(name: str, generation: str, shape: tuple[int, ...]) -> Target:
    _require("libtpu", "tpu", name)
    from jax.experimental import topologies

    # Several processes may compile for TPU at once (tests, launch checks): allow it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    layout = "x".join(map(str, shape))
    extra = {"chip_config_name": "megacore"} if generation == "v4" else {}  # one device per v4 chip
    try:
        with _tpu_vm_environment():
            topology = topologies.get_topology_desc(topology_name=f"{generation}:{layout}", platform="tpu", **extra)
    except Exception as err:  # noqa: BLE001  (libtpu's own refusal, e.g. a shape it does not know)
        raise TargetError(f"target {name}: libtpu cannot describe {generation}:{layout}: {err}") from None
    devices = tuple(topology.devices)
    usable = _tpu_hbm_bytes(devices[0])
    return Target(name, "tpu", devices, usable, "HBM per chip as XLA's TPU compiler allows it",
                  f"TPU {generation} {layout} ({len(devices)} chips)")


@contextlib.contextmanager
def _tpu_vm_environment():
    """Silence libtpu's start-up warnings about a missing TPU VM while it loads, and no longer: left
    in the environment, TPU_WORKER_HOSTNAMES would make this process look like a TPU pod host
    (`distributed.initialize` starts jax.distributed there)."""
    added = {k: v for k, v in (("TPU_ACCELERATOR_TYPE", "v5p-8"), ("TPU_WORKER_HOSTNAMES", "localhost"))
             if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


_HBM = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_hbm_message(message: str) -> tuple[int | None, int | None]:
    """(required, available) bytes from XLA's TPU out-of-memory message, where it states them."""
    available = _HBM.search(message)
    required = re.search(r"(?:required for [^(]*|Used )\(?([\d.]+)([KMGT]?)\)?", message)
    to_bytes = lambda m: round(float(m.group(1)) * _UNITS[m.group(2)]) if m else None  # noqa: E731
    return to_bytes(required), to_bytes(available)


_HBM_BY_KIND: dict[str, int] = {}


def _tpu_hbm_bytes(device) -> int:
    """The HBM per chip XLA allows, once per device kind. A program whose one argument cannot fit:
    the compiler refuses it (in about a second), naming the HBM it allows."""
    if device.device_kind not in _HBM_BY_KIND:
        _HBM_BY_KIND[device.device_kind] = _probe_hbm(device)
    return _HBM_BY_KIND[device.device_kind]


def _probe_hbm(device) -> int:
    device_kind = device.device_kind
    mesh = jax.sharding.Mesh(np.array([device]), ("x",))
    huge = jax.ShapeDtypeStruct((2**20, 2**18), jnp.float32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    try:
        jax.jit(lambda x: x[0]).lower(huge).compile()
    except Exception as err:  # noqa: BLE001  (JaxRuntimeError: RESOURCE_EXHAUSTED ...)
        available = parse_hbm_message(str(err))[1]
        if available:
            return available
        raise TargetError(f"cannot read the HBM of {device_kind} from the compiler: {err}") from None
    raise TargetError(f"cannot read the HBM of {device_kind}: a 1 TiB argument compiled")


# ---------------------------------------------------------------------- GPU
def gpu_description(model: str) -> str:
    """The shipped GpuTargetConfigProto text of `model` ("h100", "h200", "a100")."""
    return (pathlib.Path(__file__).parent / "gpu_targets" / GPU_DESCRIPTIONS[model]).read_text()


def gpu_mem_fraction() -> float:
    raw = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
    try:
        fraction = float(raw) if raw else GPU_MEM_FRACTION_DEFAULT
    except ValueError:
        raise TargetError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw!r} is not a number") from None
    if not 0 < fraction <= 1:
        raise TargetError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw!r} must be in (0, 1]")
    return fraction


def _gpu_target(name: str, model: str, count: int) -> Target:
    _require("jax_plugins.xla_cuda12", "cuda", name)
    from jax.experimental import topologies

    text = gpu_description(model)
    hosts, per_host = (count // 8, 8) if count >= 8 else (1, count)
    topology = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}", target_config=text)
    memory = int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))
    fraction = gpu_mem_fraction()
    note = (f"{fraction:.0%} of {memory / 2**30:.1f} GiB (XLA_PYTHON_CLIENT_MEM_FRACTION"
            f"{'' if 'XLA_PYTHON_CLIENT_MEM_FRACTION' in os.environ else ', JAX default'})")
    devices = tuple(topology.devices)
    return Target(name, "gpu", devices, int(memory * fraction), note,
                  f"{count} x {devices[0].device_kind} ({hosts} host{'s' if hosts > 1 else ''})")
