"""Attention with TPU's splash-attention Pallas kernel, in `models.attention`'s contract.

The kernel takes one row at a time (vmapped here over rows), grouped-query heads as they are, a
static causal mask and per-token segment ids. The causal offset is the slot of the first query,
which must be known at trace time: it is for the prefill (0) and the shared-prompt response pass
(the prompt width), whose caches carry a NumPy index (`init_cache`).

Left padding via segment ids: real tokens are segment 1, padding segment 0, so real queries see
only real keys and a padding query sees padding keys (at least its own slot: never an empty row).
Sequence lengths are padded to the kernel's block (128) with segment 2, which nothing real sees,
and the head dimension to a multiple of 128 with zeros (same scores, same outputs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ktae_jax.models.attention import Mask

_LANES = 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, t: int, s: int, offset: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = lambda n: min(512, n)  # noqa: E731  (n is a multiple of 128)
    bq, bkv = block(t), block(s)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = sa.MultiHeadMask([sa.CausalMask((t, s), offset=offset) for _ in range(heads)])
    # Built outside any trace: the kernel holds the mask's block tables as arrays and is reused by
    # later traces (a tracer kept in the cache would leak).
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, *, interpret: bool = False,
           scale: float | None = None) -> jax.Array:
    """q [B, KV, G, T, D], k/v [B, KV, S, D] -> [B, KV, G, T, D] (see the module docstring)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, kv, g, t, d = q.shape
    try:
        offset = int(mask.first_slot)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError("model.attention=pallas needs the first query's cache slot at trace time "
                         "(a cache from init_cache, not one passed into jit); use blockwise") from None
    s_used = offset + t  # slots past the new tokens are not written yet: leave them out
    tp, dp = _round_up(t, _LANES), _round_up(d, _LANES)
    sp = _round_up(s_used + tp - t, _LANES)  # each padding query (segment 2) has a padding key to see
    key_mask = mask.key_mask[:, :s_used]
    q_seg = jax.lax.dynamic_slice_in_dim(key_mask, offset, t, axis=1).astype(jnp.int32)
    q_seg = jnp.pad(q_seg, ((0, 0), (0, tp - t)), constant_values=2)
    kv_seg = jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, sp - s_used)), constant_values=2)
    if mask.window is not None:  # `attention.resolve` keeps windowed layers away; a direct call must not slip
        raise ValueError("the splash kernel's mask is static: no sliding-window layers")
    scale = d**-0.5 if scale is None else scale  # the kernel does not scale; zero-padding D must not change it
    qh = jnp.pad((q * scale).astype(q.dtype).reshape(b, kv * g, t, d), ((0, 0), (0, 0), (0, tp - t), (0, dp - d)))
    pad_kv = lambda x: jnp.pad(  # noqa: E731
        x[:, :, :s_used].astype(q.dtype), ((0, 0), (0, 0), (0, sp - s_used), (0, dp - d)))
    kernel = _kernel(kv * g, tp, sp, offset, interpret)
    out = jax.vmap(lambda q1, k1, v1, qs, ks: kernel(q1, k1, v1, segment_ids=SegmentIds(qs, ks)))(
        qh, pad_kv(k), pad_kv(v), q_seg, kv_seg)
    return out[:, :, :t, :d].reshape(b, kv, g, t, d).astype(q.dtype)



def splash_on_mesh(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, mesh=None, *,
                   scale: float | None = None) -> jax.Array:
    """`splash` on a device mesh: a Mosaic kernel is not partitioned by XLA, so each device runs it
    on its own rows (batch split) and key/value heads (tensor split) under `shard_map`."""
    if mesh is None or mesh.size == 1:
        return splash(q, k, v, mask, scale=scale)
    from jax.sharding import PartitionSpec as P

    from ktae_jax.mesh import logical_to_spec

    spec = logical_to_spec(("batch", "kv_heads"), mesh, q.shape[:2])
    rows, heads = spec[0], spec[1]
    first_slot = int(mask.first_slot) if not isinstance(mask.first_slot, jax.core.Tracer) else mask.first_slot

    def local(q, k, v, key_mask):
        return splash(q, k, v, Mask(key_mask, first_slot, window=mask.window), scale=scale)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(rows, heads), P(rows, heads), P(rows, heads), P(rows)),
                         out_specs=P(rows, heads), check_vma=False)(q, k, v, mask.key_mask)
