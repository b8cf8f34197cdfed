"""Every sharding decision of ktae_jax: the device mesh and the logical-to-physical axis rules.

Modules only name the logical axes of their arrays (`("vocab", "embed")`, stored on each
`nnx.Param` as the `logical_axes` metadata); this file maps those names onto the mesh axes
`data` (batch replicas), `fsdp` (batch + parameter sharding) and `tensor` (model parallelism).
A mesh axis that does not divide an array dimension is dropped for that array (it is
replicated along it), so tiny test models still run on 8 devices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES_KEY = "logical_axes"  # NNX variable metadata holding the logical names
BATCH_AXES = ("data", "fsdp")  # the mesh axes of "batch": rows split over their product

# Logical axis -> mesh axis (or tuple of axes, or None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "length": None,
    "layers": None,  # the stacked layers' leading axis (models.transformer scans over it)
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # batch replicas; -1 = the devices left over by fsdp and tensor
    fsdp: int = 1  # fully sharded data parallel: batch and parameters split
    tensor: int = 1  # tensor parallel: heads, MLP width and vocabulary split

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) sizes for `num_devices`; a bad product raises naming the field."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{name}={size}: must be a positive size or -1")
        free = [name for name, size in sizes.items() if size == -1]
        if len(free) > 1:
            raise ValueError(f"mesh.{free[1]}=-1: only one mesh axis may be -1")
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh.{free[0]}=-1: the other axes' product {fixed} does not divide {num_devices} devices"
                )
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            bad = next((n for n, s in sizes.items() if s != 1), "data")
            raise ValueError(
                f"mesh.{bad}: data*fsdp*tensor = {fixed} but there are {num_devices} devices"
            )
        return sizes["data"], sizes["fsdp"], sizes["tensor"]

    def batch_devices(self, num_devices: int) -> int:
        """How many ways a batch is split over `num_devices` (as `batch_devices` of the mesh made)."""
        sizes = dict(zip(MESH_AXES, self.shape(num_devices)))
        return math.prod(sizes[a] for a in BATCH_AXES)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    return Mesh(
        np.asarray(devices).reshape(shape),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def logical_to_spec(
    logical_names: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry `logical_names`.

    With `shape`, mesh axes that do not divide their dimension are dropped; a mesh axis is never
    used twice (a later dimension asking for it is replicated).
    """
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(logical_names):
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no mesh rule in ktae_jax.mesh.RULES")
        target = RULES.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept: list[str] = []
        for axis in axes:
            size = mesh.shape[axis]
            if axis in used or size == 1:
                continue
            if shape is not None and shape[dim] % (size * math.prod(mesh.shape[a] for a in kept)):
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def logical_sharding(
    logical_names: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None
) -> NamedSharding:
    """NamedSharding on `mesh` for an array with these logical axis names (see logical_to_spec)."""
    return NamedSharding(mesh, logical_to_spec(logical_names, mesh, shape))


def batch_devices(mesh: Mesh | None) -> int:
    """How many ways a batch is split on `mesh` (the product of the mesh axes of "batch"; 1 without a mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of a `[B, ...]` array: B over ('data', 'fsdp'), the rest replicated."""
    ndim = len(shape) if shape is not None else 1
    return logical_sharding(("batch",) + (None,) * (ndim - 1), mesh, shape)


def constrain_batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Inside jit: pin a `[B, ...]` array to the batch sharding (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.shape))


def gathered_over_fsdp(variable: nnx.Variable, mesh: Mesh | None) -> jax.Array:
    """Inside jit: a parameter's value laid out by its logical axes but whole along `fsdp`: FSDP's
    just-in-time gather of a weight (the others XLA gathers on its own when the activations around
    them are pinned to the batch sharding; see `models.response_logprobs`)."""
    value = variable[...]
    if mesh is None:
        return value
    return jax.lax.with_sharding_constraint(value, _without_fsdp(variable_sharding(variable, mesh)))


def _without_fsdp(sharding: NamedSharding) -> NamedSharding:
    drop = lambda axes: (tuple(a for a in axes if a != "fsdp") or None) if isinstance(axes, tuple) else (  # noqa: E731
        None if axes == "fsdp" else axes)
    return NamedSharding(sharding.mesh, PartitionSpec(*map(drop, sharding.spec)))


def decode_shardings(state: Any, mesh: Mesh) -> Any:
    """The sampler's copy of the parameters: each variable whole along `fsdp` (split by `tensor`
    only, replicated over the batch axes), so that a decode step reads local weights instead of
    gathering the FSDP-sharded ones at every token."""
    return jax.tree.map(
        lambda v: v.replace(_without_fsdp(variable_sharding(v, mesh))) if isinstance(v, nnx.Variable) else v,
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """The NamedSharding of one variable from its `logical_axes` metadata (replicated without)."""
    value = variable.get_value()
    names = variable.get_metadata().get(LOGICAL_AXES_KEY)
    if names is None:
        names = (None,) * len(value.shape)
    if len(names) != len(value.shape):
        raise ValueError(f"logical axes {names} do not match the variable's shape {value.shape}")
    return logical_sharding(names, mesh, value.shape)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A tree like `state` (an nnx.State, abstract or concrete) with a NamedSharding per variable."""
    return jax.tree.map(
        lambda v: v.replace(variable_sharding(v, mesh)) if isinstance(v, nnx.Variable) else v,
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Places every variable of `model` on `mesh` by its logical axes, in place; returns the model."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
    return model


def place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds whole -> a global array laid out by `sharding`.

    Each process fills only its own devices' slices, so this works on one host and on many.
    """
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_batch(mesh: Mesh, *arrays: Any) -> list[jax.Array]:
    """Host arrays (the same on every process) -> global arrays split by rows over the batch devices."""
    return [place(x, batch_sharding(mesh, x.shape)) for x in map(np.asarray, arrays)]


def to_host(tree: Any) -> Any:
    """Device arrays -> NumPy, gathering the shards of other processes when there are several."""
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
