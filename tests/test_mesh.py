"""Mesh construction and the logical-to-physical sharding rules, on 8 simulated CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ktae_jax.mesh import (
    MeshConfig, batch_devices, batch_sharding, gathered_over_fsdp, logical_sharding, logical_to_spec, make_mesh,
    place_batch, shard_model,
    state_shardings,
)


def test_mesh_config_shapes_and_errors():
    assert MeshConfig().shape(8) == (8, 1, 1)
    assert MeshConfig(fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig(data=1, fsdp=-1, tensor=4).shape(8) == (1, 2, 4)
    with pytest.raises(ValueError, match="mesh.tensor=-1: the other axes' product 3"):
        MeshConfig(data=3, tensor=-1).shape(8)
    with pytest.raises(ValueError, match=r"mesh\.data: data\*fsdp\*tensor = 4"):
        MeshConfig(data=4).shape(8)
    with pytest.raises(ValueError, match="mesh.fsdp=0"):
        MeshConfig(fsdp=0).shape(8)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).shape(8)


def test_make_mesh_axes_are_auto():
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("axes, expected", [({}, 8), ({"fsdp": 2}, 8), ({"fsdp": 2, "tensor": 2}, 4),
                                            ({"data": 1, "tensor": 8}, 1), ({"data": 2, "fsdp": 1, "tensor": 4}, 2)])
def test_batch_devices_are_the_ways_a_batch_is_split(axes, expected):
    cfg = MeshConfig(**axes)
    mesh = make_mesh(cfg)
    assert batch_devices(mesh) == cfg.batch_devices(8) == expected
    assert batch_devices(None) == 1
    (x,) = place_batch(mesh, np.arange(16 * 3).reshape(16, 3))  # rows split that many ways, nothing else
    assert len({idx[0].start for idx in x.sharding.devices_indices_map(x.shape).values()}) == expected
    np.testing.assert_array_equal(np.asarray(x), np.arange(16 * 3).reshape(16, 3))


def test_rules_divisibility_and_no_axis_reuse():
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=2))
    assert logical_to_spec(("vocab", "embed"), mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("batch", None), mesh) == P(("data", "fsdp"), None)
    # 6 rows do not split 4 ways: keep only the axes that divide (data), replicate the rest.
    assert logical_to_spec(("batch", None), mesh, shape=(6, 3)) == P("data", None)
    assert logical_to_spec(("heads", "kv_heads"), mesh) == P("tensor", None)  # tensor used once
    assert logical_to_spec(("mlp",), mesh, shape=(3,)) == P(None)
    with pytest.raises(KeyError, match="logical axis 'nope'"):
        logical_to_spec(("nope",), mesh)
    assert batch_sharding(mesh, (8, 5)).spec == P(("data", "fsdp"), None)
    assert logical_sharding(("embed", "mlp"), mesh).spec == P("fsdp", "tensor")


class _Tiny(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.arange(48.0).reshape(8, 6), logical_axes=("embed", "mlp"))
        self.b = nnx.Param(jnp.ones(5), logical_axes=("mlp",))  # 5 is not divisible by tensor=2
        self.s = nnx.Param(jnp.ones(3))  # no logical axes: replicated


def test_shard_model_places_params_by_logical_axes():
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=2))
    model = shard_model(_Tiny(), mesh)
    assert model.w[...].sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in model.w[...].addressable_shards} == {(4, 3)}
    assert model.b[...].sharding.spec == P(None)
    assert model.s[...].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(model.w[...]), np.arange(48.0).reshape(8, 6))
    shardings = state_shardings(nnx.state(model), mesh)
    assert shardings["w"].get_value().spec == P("fsdp", "tensor")


def test_gathered_over_fsdp_undoes_only_the_fsdp_split():
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=2))
    model = shard_model(_Tiny(), mesh)
    graphdef, state = nnx.split(model)

    @jax.jit
    def gathered(state):
        return gathered_over_fsdp(nnx.merge(graphdef, state).w, mesh) * 1.0

    out = gathered(state)
    assert out.sharding.spec in (P(None, "tensor"), P(None, "tensor", None))  # the tensor split stays
    assert {s.data.shape for s in out.addressable_shards} == {(8, 3)}
    np.testing.assert_array_equal(np.asarray(out), np.arange(48.0).reshape(8, 6))
    assert gathered_over_fsdp(model.w, None) is model.w[...]  # no mesh: the value as it is
