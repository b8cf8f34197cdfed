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


def materialised(q: Array, k: Array | tuple[Array, ...], v: Array | tuple[Array, ...], allowed_BxTxS: Array,
                 scale: float | None = None, softcap: float | None = None) -> Array:
    """The reference: softmax of the whole [T, S] score matrix per head.

    `k`, `v`: [B, KV, S, D], or consecutive parts [B, KV, S_i, D] of the S slots (the decode
    engine's cache blocks), joined only in the [T, S] scores: the keys are not copied into one array."""
    dt, d = q.dtype, q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    k_parts, v_parts = (k, v) if isinstance(k, tuple) else ((k,), (v,))
    scores = jnp.concatenate([jnp.einsum("bkgtd,bksd->bkgts", q, part.astype(dt), preferred_element_type=jnp.float32)
                              for part in k_parts], axis=-1)
    scores = jnp.where(allowed_BxTxS[:, None, None], _cap(scores * scale, softcap), MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    starts = np.cumsum([0] + [part.shape[2] for part in v_parts])
    return functools.reduce(operator.add, (jnp.einsum("bkgts,bksd->bkgtd", probs[..., a:b], part.astype(dt))
                                           for a, b, part in zip(starts[:-1], starts[1:], v_parts)))


def decode_attention(q: Array, k: Array | tuple[Array, ...], v: Array | tuple[Array, ...], mask: Mask,
                     scale: float | None = None, softcap: float | None = None) -> Array:
    """One new query per row (the sampler's decode step) over every slot of the cache (a
    sliding-window layer's mask leaves out the slots before its window); the cache whole or in
    parts (`materialised`)."""
    return materialised(q, k, v, mask.allowed(q.shape[3]), scale, softcap)


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
