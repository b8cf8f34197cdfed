"""The decoder's key/value cache: `[L, B, KV, S, D]` per call, or the decode engine's grouped blocks.

Letters as in `transformer.py`; Gr groups (batch devices) of Wg slots each in the engine's blocks.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ktae_jax.models.config import ModelConfig

Array = jax.Array
# The decode engine's cache: [L, Gr, Wg, KV, S_i, D] blocks that split the cache slots (the first
# holds the prompt and the first response tokens; the rest is made only when a row needs it).
Blocks = tuple[Array, ...]
Constrain = Callable[[Array], Array]  # pins an activation whose first axis is (batch-major) rows to the batch sharding


def unconstrained(x: Array) -> Array:
    return x


def write_new(cache: Array | Blocks, new: Array, first_slot, layer: Array | None = None) -> Array | Blocks:
    """`new` keys/values [B, KV, T, D] written into `cache` ([B, KV, S, D], or [L, B, KV, S, D] at
    `layer`) from slot `first_slot`: one slot for all rows, or one per row ([B], with T = 1).
    The decode engine's cache: its blocks [L, Gr, Wg, KV, S_i, D] with `new` [L, B, KV, 1, D]
    (every layer at once); each row's slot is written in the block that holds it."""
    lead = () if layer is None else (layer,)
    if isinstance(cache, tuple):
        out, start = [], 0
        for part in cache:
            size = part.shape[-2]
            inside = (first_slot >= start) & (first_slot < start + size)
            out.append(write_new(part, new, jnp.where(inside, first_slot - start, size), layer))  # size: dropped
            start += size
        return tuple(out)
    if cache.ndim == 6:
        return _write_block(cache, new, first_slot)
    new = new.astype(cache.dtype)
    if jnp.ndim(first_slot) == 1:
        return cache.at[(*lead, jnp.arange(new.shape[0]), slice(None), first_slot)].set(new[:, :, 0])
    return jax.lax.dynamic_update_slice(cache, new[None] if lead else new, (*lead, 0, 0, first_slot, 0))


def _write_block(block: Array, new: Array, slot: Array) -> Array:
    """`new` [L, B, KV, 1, D] into one engine block [L, Gr, Wg, KV, S, D] at slot [B] (row r is slot
    r % wg of group r // wg); slots past the block's S are dropped (dead slots, other blocks' rows)."""
    groups, b = block.shape[1], new.shape[1]
    rows = jnp.arange(b // groups)
    new = new[:, :, :, 0].transpose(1, 0, 2, 3).astype(block.dtype)  # [B, L, KV, D]
    if groups == 1:  # one device: a plain scatter (the vmap below made XLA:CPU copy the buffer to another layout)
        return block.at[:, 0, rows, :, slot].set(new, mode="drop")
    write = lambda c, n, s: c.at[:, rows, :, s].set(n, mode="drop")  # noqa: E731
    return jax.vmap(write, in_axes=(1, 0, 0), out_axes=1)(
        block, new.reshape(groups, b // groups, *new.shape[1:]), jnp.reshape(slot, (groups, b // groups)))


class KVCache(NamedTuple):
    """Keys/values of earlier tokens. `index` is the next slot to write: one scalar for all rows, or
    an int32 [B] per row (the decode engine's slots, which serve rows of different lengths; then one
    new token per call). The engine's k/v are `Blocks` of one grouped buffer [L, Gr, Wg, KV, S', D]
    split along S' and kept for a whole call: a call then reads the view of the first B / Gr slots
    of each group and the first S (key_mask's length) cache slots, and writes in place
    (`layer_view`, `write_new`)."""

    k: Array | Blocks  # [L, B, KV, S, D]
    v: Array | Blocks  # [L, B, KV, S, D]
    key_mask: Array  # [B, S] bool: the slot holds a real (non-pad) token
    index: Array  # int32 scalar (a NumPy one while known at trace time), or [B]

    def repeat_rows(self, k: int, constrain: Constrain = unconstrained) -> "KVCache":
        """Each row k times, as rows i*k .. i*k+k-1: one prompt's prefill shared by k continuations."""
        rep = lambda x: constrain(jnp.repeat(x, k, axis=0))  # noqa: E731
        per_layer = lambda x: jax.vmap(rep)(x)  # noqa: E731  (rows are axis 1 of [L, B, ...])
        return KVCache(per_layer(self.k), per_layer(self.v), rep(self.key_mask), self.index)


class LayerBlocks(NamedTuple):
    """Layer `layer` of the decode engine's blocks, not sliced: its decode attention takes each
    row's keys from them (`attention.engine_decode_attention`)."""

    k: Blocks
    v: Blocks
    layer: Array  # int32 scalar


def layer_view(cache: Array | Blocks, layer: Array, rows: int, slots: int) -> Array | tuple[Array, ...]:
    """Layer `layer` of a stacked cache as [B, KV, S, D]; of the engine's blocks, the view of their
    first B / Gr slots per group and first S cache slots, in parts [B, KV, S_i, D] (one per block
    it reaches: attention joins them in its scores, so the keys are not copied into one array)."""
    if not isinstance(cache, tuple):
        return jax.lax.dynamic_index_in_dim(cache, layer, 0, keepdims=False)
    parts, start = [], 0
    for block in cache:
        if start >= slots:
            break
        groups, _, kv, size, d = block.shape[1:]
        part = jax.lax.dynamic_index_in_dim(block, layer, 0, keepdims=False)[:, :rows // groups, :, :slots - start]
        parts.append(part.reshape(rows, kv, min(size, slots - start), d))
        start += size
    return tuple(parts)


def init_cache(config: ModelConfig, batch: int, length: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
    """An empty cache of `length` slots for `batch` rows."""
    shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
    zeros = jnp.zeros(shape, dtype)
    # The index is a NumPy scalar: it stays known at trace time through the prefill, which the
    # pallas kernel needs (its causal mask is static).
    return KVCache(zeros, zeros, jnp.zeros((batch, length), bool), np.zeros((), np.int32))
