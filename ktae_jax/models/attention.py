"""Attention over many queries (the update, the log-prob passes, the prefill), four ways, one contract.

`attend(q, k, v, mask, impl)`: q [B, KV, G, T, D] (G query heads per key/value head), k/v
[B, KV, S, D]; query t sits in cache slot `mask.first_slot + t` and sees key slot s when
`mask.key_mask[b, s]` (a real token) and s <= its own slot (causal), and, in a sliding-window
layer (`mask.window`, a per-layer value the layer scan passes in), s > its own slot - window.
Scores are q . k * `scale`, optionally soft-capped (`softcap`: c * tanh(score / c)) before the
mask. Returns [B, KV, G, T, D].

- `xla`: the scores [B, KV, G, T, S] made whole (the fastest for short rows on CPU; kept for the
  backward pass, so O(T*S) memory per layer).
- `blockwise`: pure JAX, keys in blocks with an online softmax, and a hand-written backward that
  recomputes each block's probabilities from the saved row maxima and sums (flash attention's algorithm), so
  neither pass keeps more than [T, block] scores. Any backend.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only; the mask goes in as a
  [B, 1, T, S] boolean built once per forward pass and shared by the layers (the window, if any,
  applied per layer). No soft-capping.
- `pallas`: the TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu`); see `pallas_tpu.py`.
  Its mask is static, so no per-layer window and no soft-capping: `auto` picks blockwise then.

Fully masked query rows (left padding) see a uniform softmax in `xla` and `blockwise` alike (finite
mask value, no NaN); their outputs are never read by real tokens. `decode_attention` is the
one-query step of the sampler, kept apart so that changes to it stay local.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ktae_jax.models.kv_cache import LayerBlocks, layer_view

Array = jax.Array
MASKED = -1e30  # finite, so fully masked rows (left padding) give a uniform softmax, not NaN
IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "pallas")
# On CPU, `auto` keeps the materialised scores up to this many query x key pairs per head: measured
# faster there (benchmarks/bench_attention.py) and small enough not to matter for memory.
CPU_XLA_MAX_PAIRS = 1024 * 1024


class Mask(NamedTuple):
    """Which keys each query sees: real keys (`key_mask` [B, S]) in slots <= the query's own."""

    key_mask: Array  # [B, S] bool
    first_slot: Array | int  # slot of query 0 (or [B], one per row); a NumPy int when known at trace time (the pallas kernel needs it)
    dense: Array | None = None  # allowed(T) without the window, made once per forward pass, outside the layer loop
    window: Array | int | None = None  # this layer's sliding window (int32 scalar); None: no layer has one

    def query_slots(self, t: int) -> Array:
        """[B or 1, T] int32: the cache slot of each query."""
        if jnp.ndim(self.first_slot) == 1:  # a slot per row (the decode engine's)
            return self.first_slot[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        return (jnp.arange(t, dtype=jnp.int32) + self.first_slot)[None]  # (a NumPy scalar on the left would not take a tracer)

    def allowed(self, t: int) -> Array:
        """[B, T, S] bool: may query t see key slot s."""
        slots = jnp.arange(self.key_mask.shape[1], dtype=jnp.int32)[None, None, :]
        query_BxTx1 = self.query_slots(t)[:, :, None]
        if self.dense is not None and self.dense.shape[1] == t:
            base = self.dense
        else:
            base = self.key_mask[:, None, :] & (slots <= query_BxTx1)
        return base if self.window is None else base & (slots > query_BxTx1 - self.window)


@functools.lru_cache(maxsize=1)
def cudnn_version() -> int | None:
    """The cuDNN library's version, None when this machine has none (e.g. compiling for a GPU target
    from a CPU host with only the CUDA plugin: `pip install 'jax[cuda12]'` brings cuDNN)."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        return int(check_cudnn_version())
    except (ImportError, RuntimeError):
        return None


def resolve(impl: str, platform: str, t: int = 0, s: int = 0, dtype=jnp.bfloat16, *, windowed: bool = False,
            softcap: bool = False) -> str:
    """The implementation `auto` stands for on `platform` ('cpu', 'gpu'/'cuda', 'tpu') at [T, S].

    GPU: cuDNN's kernel when it can be used (16-bit activations, cuDNN present, no soft-capping),
    else blockwise. TPU: pallas, or blockwise for sliding-window layers or soft-capping, which its
    static mask cannot express; asked for explicitly, those combinations raise ValueError."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={impl!r}: expected one of {IMPLEMENTATIONS}")
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "cudnn" and not half:
        raise ValueError(f"model.attention=cudnn needs bfloat16/float16 activations (model.compute_dtype), "
                         f"not {jnp.dtype(dtype)}")
    if impl == "cudnn" and cudnn_version() is None:
        raise ValueError("model.attention=cudnn: no cuDNN library on this machine (pip install 'jax[cuda12]')")
    if impl == "cudnn" and softcap:
        raise ValueError("model.attention=cudnn cannot soft-cap attention scores (attn_logit_softcapping); "
                         "use blockwise or xla")
    if impl == "pallas" and (windowed or softcap):
        raise ValueError("model.attention=pallas supports neither sliding-window layers nor attention "
                         "soft-capping (its mask is static); use blockwise")
    if impl != "auto":
        return impl
    if platform == "tpu":
        return "blockwise" if windowed or softcap else "pallas"
    if platform in ("gpu", "cuda"):
        return "cudnn" if half and cudnn_version() is not None and not softcap else "blockwise"
    return "xla" if t * s <= CPU_XLA_MAX_PAIRS else "blockwise"


def attend(q: Array, k: Array, v: Array, mask: Mask, impl: str = "xla", block: int = 512,
           platform: str | None = None, mesh=None, *, scale: float | None = None,
           softcap: float | None = None) -> Array:
    """Causal attention of T queries over S keys; see the module docstring. `scale` None: D ** -0.5."""
    t, s = q.shape[3], k.shape[2]
    impl = resolve(impl, platform or jax.default_backend(), t, s, q.dtype, windowed=mask.window is not None,
                   softcap=softcap is not None)
    if impl == "xla":
        return materialised(q, k, v, mask.allowed(t), scale, softcap)
    if impl == "blockwise":
        query_slot = jnp.arange(t, dtype=jnp.int32) + mask.first_slot
        return blockwise(q, k, v, mask.key_mask, query_slot, block, mask.window, scale, softcap)
    if impl == "cudnn":
        return _cudnn(q, k, v, mask, scale)
    from ktae_jax.models.pallas_tpu import splash_on_mesh

    return splash_on_mesh(q, k, v, mask, mesh, scale=scale)


def _cap(scores: Array, softcap: float | None) -> Array:
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def materialised(q: Array, k: Array, v: Array, allowed_BxTxS: Array, scale: float | None = None,
                 softcap: float | None = None) -> Array:
    """The reference: softmax of the whole [T, S] score matrix per head."""
    dt, d = q.dtype, q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k.astype(dt), preferred_element_type=jnp.float32)
    scores = jnp.where(allowed_BxTxS[:, None, None], _cap(scores * scale, softcap), MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v.astype(dt))


def decode_attention(q: Array, k: Array, v: Array, mask: Mask, scale: float | None = None,
                     softcap: float | None = None) -> Array:
    """One new query per row over every slot of a plain cache (a sliding-window layer's mask
    leaves out the slots before its window). The decode engine's step: `engine_decode_attention`."""
    return materialised(q, k, v, mask.allowed(q.shape[3]), scale, softcap)


def engine_decode_attention(q: Array, k_new: Array, v_new: Array, cache: LayerBlocks, mask: Mask, ragged: bool,
                            block: int = 128, scale: float | None = None, softcap: float | None = None) -> Array:
    """The decode engine's step: one new query per row, q [B, KV, G, 1, D], over the row's cache
    slots before its own (`mask.first_slot` [B], the new token's slot) and its own new key/value
    `k_new`/`v_new` [B, KV, 1, D] (written into the cache after the layer loop, so not read from it).

    The cache's first block (the prompt and the first response tokens, which every row has) is read
    as one batch over the view. The later blocks: `ragged` False, the same (every row reads the whole
    view: the cost follows the longest row); `ragged` True, row by row, each row only up to its own
    slot in `block`-slot pieces, with an online softmax (the cost follows each row's length, at a
    small fixed cost per row and piece: faster on CPU once rows' lengths differ, slow on GPU/TPU)."""
    dt, b, d = q.dtype, q.shape[0], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    view = mask.key_mask.shape[1]
    parts_k, parts_v = (layer_view(c, cache.layer, b, view) for c in (cache.k, cache.v))
    dense = 1 if ragged else len(parts_k)
    width = sum(part.shape[2] for part in parts_k[:dense])
    slot = jnp.arange(width, dtype=jnp.int32)[None]
    index = mask.first_slot[:, None]
    allowed = mask.key_mask[:, :width] & (slot < index)
    if mask.window is not None:
        allowed &= slot > index - mask.window
    allowed = jnp.concatenate([jnp.ones((b, 1), bool), allowed], axis=1)  # the row's own new key first
    scores = jnp.concatenate([jnp.einsum("bkgtd,bksd->bkgts", q, part.astype(dt), preferred_element_type=jnp.float32)
                              for part in (k_new,) + parts_k[:dense]], axis=-1)
    scores = jnp.where(allowed[:, None, None, None], _cap(scores * scale, softcap), MASKED)
    m = scores.max(-1)
    probs = jnp.exp(scores - m[..., None])
    starts = np.cumsum([0] + [part.shape[2] for part in (v_new,) + parts_v[:dense]])
    acc = functools.reduce(operator.add, (
        jnp.einsum("bkgts,bksd->bkgtd", probs[..., a:c].astype(dt), part.astype(dt), preferred_element_type=jnp.float32)
        for a, c, part in zip(starts[:-1], starts[1:], (v_new,) + parts_v[:dense])))
    stats = (m[..., 0], probs.sum(-1)[..., 0], acc[..., 0, :])  # [B, KV, G], [B, KV, G], [B, KV, G, D]
    if dense < len(parts_k):
        stats = _ragged_rest(q[..., 0, :], cache, mask, width, block, scale, softcap, stats)
    _, l, acc = stats
    return (acc / l[..., None])[..., None, :].astype(dt)


def _ragged_rest(q: Array, cache: LayerBlocks, mask: Mask, start: int, block: int, scale: float,
                 softcap: float | None, stats: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
    """The online softmax's (max, sum, weighted values) of each row carried over its cache slots
    from `start` up to its own, row by row and `block` slots at a time, within each group of the
    engine's buffer (groups are the batch devices: no row's keys cross a device). q [B, KV, G, D]."""
    groups = cache.k[0].shape[1]
    wg = q.shape[0] // groups  # the view's slots per group: the buffer's first wg
    view = mask.key_mask.shape[1]
    window = None if mask.window is None else jnp.asarray(mask.window, jnp.int32)
    by_group = lambda x: x.reshape(groups, wg, *x.shape[1:])  # noqa: E731

    def one_group(q, key_mask, index, stats, k_blocks, v_blocks):  # a group's rows; blocks [L, Wg, KV, S_i, D]
        def row(i, carry):
            r = order[i]
            m, l, acc = (x[r] for x in carry)
            qr = q[r].astype(jnp.float32)
            at = start
            for kb, vb in zip(k_blocks, v_blocks):
                size = min(kb.shape[3], view - at)
                if size <= 0:
                    break
                piece = min(block, size)
                todo = jnp.clip(index[r] - at, 0, size)

                def step(j, c, kb=kb, vb=vb, at=at, size=size, piece=piece):
                    m, l, acc = c
                    lo = jnp.minimum(j * piece, size - piece)  # the last piece ends at the view's end
                    take = lambda buf: jax.lax.dynamic_slice(  # noqa: E731
                        buf, (cache.layer, r, 0, lo, 0), (1, 1) + buf.shape[2:3] + (piece,) + buf.shape[4:])[0, 0]
                    slot = at + lo + jnp.arange(piece, dtype=jnp.int32)
                    ok = (jax.lax.dynamic_slice(key_mask[r], (at + lo,), (piece,)) & (slot >= at + j * piece)
                          & (slot < index[r]))
                    if window is not None:
                        ok &= slot > index[r] - window
                    s = jnp.einsum("kgd,ksd->kgs", qr, take(kb).astype(jnp.float32))
                    s = jnp.where(ok, _cap(s * scale, softcap), -jnp.inf)
                    m_new = jnp.maximum(m, s.max(-1))  # finite: m already holds the row's own key
                    p = jnp.exp(s - m_new[..., None])
                    alpha = jnp.exp(m - m_new)
                    pv = jnp.einsum("kgs,ksd->kgd", p, take(vb).astype(jnp.float32))
                    return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

                m, l, acc = jax.lax.fori_loop(0, (todo + piece - 1) // piece, step, (m, l, acc))
                at += kb.shape[3]
            return tuple(x.at[r].set(y) for x, y in zip(carry, (m, l, acc)))

        need = index > start  # rows with keys past the first block; only they are visited
        order = jnp.argsort(~need, stable=True)
        return jax.lax.fori_loop(0, jnp.sum(need, dtype=jnp.int32), row, stats)

    args = (by_group(q), by_group(mask.key_mask), by_group(mask.first_slot), tuple(by_group(x) for x in stats))
    rest = lambda blocks: tuple(b[:, 0] if groups == 1 else b for b in blocks[1:])  # noqa: E731
    if groups == 1:
        out = one_group(*(jax.tree.map(lambda x: x[0], args)), rest(cache.k), rest(cache.v))
        return tuple(x.reshape(-1, *x.shape[1:]) for x in out)
    out = jax.vmap(one_group, in_axes=(0, 0, 0, 0, 1, 1))(*args, rest(cache.k), rest(cache.v))
    return tuple(x.reshape(-1, *x.shape[2:]) for x in out)


# ---------------------------------------------------------------------- blockwise (flash) attention
def _blocks(k: Array, v: Array, key_mask: Array, block: int):
    """Keys, values, key mask and slot numbers cut into [nb, ...] blocks (S padded with dead slots)."""
    b, kv, s, d = k.shape
    nb = -(-s // block)
    pad = nb * block - s
    k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, kv, nb, block, d).transpose(2, 0, 1, 3, 4)
    v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, kv, nb, block, d).transpose(2, 0, 1, 3, 4)
    km = jnp.pad(key_mask, ((0, 0), (0, pad))).reshape(b, nb, block).transpose(1, 0, 2)
    slots = jnp.arange(nb * block, dtype=jnp.int32).reshape(nb, block)
    return k, v, km, slots, s


def _block_scores(q, k_blk, km_blk, slots_blk, query_slot, s_real, window, scale, softcap):
    """Scaled, capped, masked scores [B, KV, G, T, block] (float32) and the allowed pattern [B, 1, 1, T, block]."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k_blk.astype(q.dtype), preferred_element_type=jnp.float32)
    causal = slots_blk[None, :] <= query_slot[:, None]  # [T, block]
    if window is not None:
        causal = causal & (slots_blk[None, :] > query_slot[:, None] - window)
    allowed = (km_blk[:, None, :] & causal[None])[:, None, None]
    scores = jnp.where(allowed, _cap(scores * scale, softcap), MASKED)
    # Slots past the real S (block padding) do not exist: weight exactly 0 even in fully masked rows.
    return jnp.where(slots_blk < s_real, scores, -jnp.inf), allowed


def _forward(q, k, v, key_mask, query_slot, block, window, scale, softcap):
    kb, vb, kmb, slots, s_real = _blocks(k, v, key_mask, block)
    b, kv, g, t, d = q.shape
    init = (jnp.full((b, kv, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, kv, g, t), jnp.float32),
            jnp.zeros((b, kv, g, t, d), jnp.float32))

    def step(carry, blk):
        m, l, acc = carry
        k_blk, v_blk, km_blk, slots_blk = blk
        scores, _ = _block_scores(q, k_blk, km_blk, slots_blk, query_slot, s_real, window, scale, softcap)
        m_new = jnp.maximum(m, scores.max(-1))  # finite after the first block: it holds a real slot
        p = jnp.exp(scores - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(q.dtype), v_blk.astype(q.dtype),
                        preferred_element_type=jnp.float32)
        return (m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv), None

    (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, kmb, slots))
    # (m, l) rather than their log-sum-exp: in a fully masked row m = -1e30 absorbs log(l) in float32.
    return (acc / l[..., None]).astype(q.dtype), (m, l)


def blockwise(q: Array, k: Array, v: Array, key_mask: Array, query_slot: Array, block: int = 512,
              window: Array | int | None = None, scale: float | None = None, softcap: float | None = None) -> Array:
    """Flash attention in pure JAX: q [B, KV, G, T, D], k/v [B, KV, S, D], key_mask [B, S], query_slot [T];
    `window` (an int32 scalar, may be traced): keys in slots > query slot - window only."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if window is None:
        return _blockwise(q, k, v, key_mask, query_slot, block, scale, softcap)
    return _blockwise_windowed(q, k, v, key_mask, query_slot, jnp.asarray(window, jnp.int32), block, scale, softcap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise(q, k, v, key_mask, query_slot, block, scale, softcap):
    return _forward(q, k, v, key_mask, query_slot, block, None, scale, softcap)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _blockwise_windowed(q, k, v, key_mask, query_slot, window, block, scale, softcap):
    return _forward(q, k, v, key_mask, query_slot, block, window, scale, softcap)[0]


def _blockwise_fwd(q, k, v, key_mask, query_slot, block, scale, softcap, window=None):
    out, stats = _forward(q, k, v, key_mask, query_slot, block, window, scale, softcap)
    return out, (q, k, v, key_mask, query_slot, window, out, stats)


def _blockwise_bwd(block, scale, softcap, res, d_out):
    q, k, v, key_mask, query_slot, window, out, (m, l) = res
    kb, vb, kmb, slots, s_real = _blocks(k, v, key_mask, block)
    dt, d = q.dtype, q.shape[-1]
    do = d_out.astype(jnp.float32)
    delta = jnp.sum(do * out.astype(jnp.float32), axis=-1)  # [B, KV, G, T]: sum_s p * dp

    def step(dq, blk):
        k_blk, v_blk, km_blk, slots_blk = blk
        scores, allowed = _block_scores(q, k_blk, km_blk, slots_blk, query_slot, s_real, window, scale, softcap)
        p = jnp.exp(scores - m[..., None]) / l[..., None]
        dv = jnp.einsum("bkgts,bkgtd->bksd", p, do)
        dp = jnp.einsum("bkgtd,bksd->bkgts", do, v_blk.astype(jnp.float32))
        ds = p * (dp - delta[..., None])
        if softcap is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2, tanh = the capped score / c
            ds = ds * (1.0 - jnp.square(jnp.where(allowed, scores, 0.0) / softcap))
        ds = jnp.where(allowed, ds, 0.0) * scale  # masked scores are constants
        dq = dq + jnp.einsum("bkgts,bksd->bkgtd", ds, k_blk.astype(jnp.float32))
        dk = jnp.einsum("bkgts,bkgtd->bksd", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), (kb, vb, kmb, slots))
    unblock = lambda x: x.transpose(1, 2, 0, 3, 4).reshape(k.shape[0], k.shape[1], -1, d)[:, :, :s_real]  # noqa: E731
    zero_int = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    grads = (dq.astype(dt), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype),
             zero_int(key_mask), zero_int(query_slot))
    return grads if window is None else grads + (zero_int(window),)


def _windowed_fwd(q, k, v, key_mask, query_slot, window, block, scale, softcap):
    return _blockwise_fwd(q, k, v, key_mask, query_slot, block, scale, softcap, window)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
_blockwise_windowed.defvjp(_windowed_fwd, _blockwise_bwd)


# ---------------------------------------------------------------------- cuDNN (GPU)
def _cudnn(q: Array, k: Array, v: Array, mask: Mask, scale: float | None = None, implementation: str = "cudnn") -> Array:
    """cuDNN's fused attention; left padding, the cache offset and the window go in as a boolean mask.
    (`implementation="xla"`: the same call on any backend, which the tests use to check what goes in.)"""
    b, kv, g, t, d = q.shape
    q_bthd = q.reshape(b, kv * g, t, d).transpose(0, 2, 1, 3)
    out = jax.nn.dot_product_attention(
        q_bthd, k.transpose(0, 2, 1, 3).astype(q.dtype), v.transpose(0, 2, 1, 3).astype(q.dtype),
        mask=mask.allowed(t)[:, None], scale=scale, implementation=implementation,
    )
    return out.transpose(0, 2, 1, 3).reshape(b, kv, g, t, d)
