"""The Qwen2 / Llama / Qwen3 / Gemma 3 decoder in Flax NNX (family differences: `families.py`), with a KV cache.

Letters in names: B batch, T new tokens, S cache slots (keys), E hidden, H query heads,
KV key/value heads, G = H / KV query heads per kv head, D head dim, F MLP width, V vocabulary,
L layers, C positions per logits chunk; P prompts (Tp columns) and N = P x k rollouts (R columns).

Left padding: `attention_mask` marks real tokens; rotary positions count real tokens only
(`cumsum(mask) - 1`), and padded keys are never attended to. Each parameter stores its logical
axis names as the `logical_axes` metadata, which `ktae_jax.mesh` maps onto devices.

The layers' weights are stacked ([L, ...], logical axis "layers") and the stack runs as one
`lax.scan` (`ModelOptions.scan_layers`; unrolled otherwise), so compile time does not grow with
depth; each layer's body is rematerialised by `ModelOptions.remat`. The cache (`kv_cache.py`) is `[L, B, KV, S, D]`;
log-probabilities of given tokens are in `logprobs.py`.
What differs between layers (Gemma 3: a sliding window, a rope table) goes into the scan as
per-layer inputs beside the weights, so one traced body serves every layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktae_jax.models import attention as attn_lib
from ktae_jax.models.config import ModelConfig, ModelOptions
from ktae_jax.models.families import ACTIVATIONS
from ktae_jax.models.kv_cache import Constrain, KVCache, LayerBlocks, layer_view, unconstrained, write_new

Array = jax.Array
_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _adapted(module: nnx.Module, name: str, x: Array, y: Array, constrain: Constrain) -> Array:
    """y = x W plus the low-rank update s (x A) B of weight `name`, where it has an adapter
    (`models.lora`); y unchanged otherwise."""
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:
        return y
    dt = y.dtype
    xa = constrain(x @ a[...].astype(dt))
    return y + constrain(xa @ getattr(module, f"{name}_lora_b")[...].astype(dt)) * jnp.asarray(module.lora_scale, dt)


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], names: tuple[str | None, ...], dtype, init: str,
           layers: int | None = None) -> nnx.Param:
    if layers is not None:  # one slice per layer, stacked in front
        shape, names = (layers,) + tuple(shape), ("layers",) + tuple(names)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=names)


class RMSNorm(nnx.Module):
    """`offset` (Gemma): the scale is 1 + weight (weights start at 0), applied in float32."""

    def __init__(self, size: int, eps: float, *, param_dtype, layers: int | None = None, offset: bool = False):
        self.weight = _param(None, (size,), ("norm",), param_dtype, "zeros" if offset else "ones", layers)
        self.eps, self.offset = eps, offset

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:  # Gemma scales in float32, then rounds
            return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        # Normalise in float32, then scale in the input dtype, as Hugging Face does.
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


def _norm(cfg: ModelConfig, size: int, param_dtype, layers: int | None = None) -> RMSNorm:
    return RMSNorm(size, cfg.rms_norm_eps, param_dtype=param_dtype, layers=layers, offset=cfg.spec.norm_offset)


def _rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotary embedding, half-split convention. x [B, ..., T, D]; cos/sin [B, T, D/2] broadcastable."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, param_dtype, dtype, rngs: nnx.Rngs, layers: int | None = None):
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_kv, self.group, self.head_dim, self.dtype = kv, h // kv, d, dtype
        self.scale, self.softcap = cfg.attention_scale, cfg.attn_logit_softcapping
        par = lambda shape, names, init="normal": _param(rngs, shape, names, param_dtype, init, layers)  # noqa: E731
        self.q = par((e, h, d), ("embed", "heads", "head_dim"))
        self.k = par((e, kv, d), ("embed", "kv_heads", "head_dim"))
        self.v = par((e, kv, d), ("embed", "kv_heads", "head_dim"))
        self.o = par((h, d, e), ("heads", "head_dim", "embed"))
        bias = lambda shape, names, on: par(shape, names, "zeros") if on else None  # noqa: E731
        self.q_bias = bias((h, d), ("heads", "head_dim"), cfg.qkv_bias)
        self.k_bias = bias((kv, d), ("kv_heads", "head_dim"), cfg.qkv_bias)
        self.v_bias = bias((kv, d), ("kv_heads", "head_dim"), cfg.qkv_bias)
        self.o_bias = bias((e,), ("embed",), cfg.o_bias)
        # Qwen3, Gemma 3: per head, before the rotary embedding
        self.q_norm = _norm(cfg, d, param_dtype, layers) if cfg.spec.qk_norm else None
        self.k_norm = _norm(cfg, d, param_dtype, layers) if cfg.spec.qk_norm else None

    def __call__(
        self, x_BxTxE: Array, cos: Array, sin: Array, mask: attn_lib.Mask,
        cache_kv: tuple[Array, Array] | None, options: ModelOptions, constrain: Constrain = unconstrained,
    ) -> tuple[Array, tuple[Array, Array]]:
        """(output [B, T, E], this call's new keys/values [B, KV, T, D]); `cache_kv` is this layer's cache."""
        b, t, e = x_BxTxE.shape
        kv, g, d, dt = self.num_kv, self.group, self.head_dim, self.dtype
        # Projections as 2-D matmuls on [B*T, E] (XLA on CPU: faster, and a faster weight gradient),
        # then the heads moved to their [B, KV, (G,) T, D] layout.
        x = x_BxTxE.astype(dt).reshape(b * t, e)
        proj = lambda name, width: _adapted(  # noqa: E731
            self, name, x, constrain(x @ getattr(self, name)[...].astype(dt).reshape(e, width)), constrain)
        q = proj("q", kv * g * d).reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)
        k = proj("k", kv * d).reshape(b, t, kv, d).transpose(0, 2, 1, 3)
        v = proj("v", kv * d).reshape(b, t, kv, d).transpose(0, 2, 1, 3)
        if self.q_bias is not None:
            q = q + self.q_bias[...].astype(dt).reshape(kv, g, 1, d)
            k = k + self.k_bias[...].astype(dt)[:, None, :]
            v = v + self.v_bias[...].astype(dt)[:, None, :]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = _rope(q, cos[:, None, None], sin[:, None, None])
        k = _rope(k, cos[:, None], sin[:, None])
        if isinstance(cache_kv, LayerBlocks):  # the decode engine's step (its new keys written after the layers)
            out = attn_lib.engine_decode_attention(q, k, v, cache_kv, mask, options.ragged_decode(),
                                                   scale=self.scale, softcap=self.softcap)
        else:
            # The new keys written at `first_slot`; attend over every slot of the cache.
            keys, values = (k, v) if cache_kv is None else (
                write_new(c, new, mask.first_slot) for c, new in zip(cache_kv, (k, v)))
            if cache_kv is not None and t == 1:
                out = attn_lib.decode_attention(q, keys, values, mask, self.scale, self.softcap)
            else:
                out = attn_lib.attend(q, keys, values, mask, options.attention, options.attention_block,
                                      options.platform or None, options.mesh, scale=self.scale, softcap=self.softcap)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b * t, kv * g * d)
        y = _adapted(self, "o", out, constrain(out @ self.o[...].astype(dt).reshape(kv * g * d, e)), constrain)
        y = y.reshape(b, t, e)
        if self.o_bias is not None:
            y = y + self.o_bias[...].astype(dt)
        return y, (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, param_dtype, dtype, rngs: nnx.Rngs, layers: int | None = None):
        e, f = cfg.hidden_size, cfg.intermediate_size
        self.dtype, self.activation = dtype, cfg.hidden_act  # a name: static attributes stay plain data
        par = lambda shape, names, init="normal": _param(rngs, shape, names, param_dtype, init, layers)  # noqa: E731
        self.gate = par((e, f), ("embed", "mlp"))
        self.up = par((e, f), ("embed", "mlp"))
        self.down = par((f, e), ("mlp", "embed"))
        on = cfg.mlp_bias
        self.gate_bias = par((f,), ("mlp",), "zeros") if on else None
        self.up_bias = par((f,), ("mlp",), "zeros") if on else None
        self.down_bias = par((e,), ("embed",), "zeros") if on else None

    def __call__(self, x_BxTxE: Array, constrain: Constrain = unconstrained) -> Array:
        dt = self.dtype
        # Matmuls on [B*T, E]: XLA on CPU runs the weight gradient of a 3-D `x @ W` (two
        # contracting dimensions) about 3x slower than the same product on a 2-D operand.
        x = x_BxTxE.reshape(-1, x_BxTxE.shape[-1])
        gate = _adapted(self, "gate", x, constrain(x @ self.gate[...].astype(dt)), constrain)
        up = _adapted(self, "up", x, constrain(x @ self.up[...].astype(dt)), constrain)
        if self.gate_bias is not None:
            gate, up = gate + self.gate_bias[...].astype(dt), up + self.up_bias[...].astype(dt)
        hidden = ACTIVATIONS[self.activation](gate) * up
        y = _adapted(self, "down", hidden, constrain(hidden @ self.down[...].astype(dt)), constrain)
        y = y + self.down_bias[...].astype(dt) if self.down_bias is not None else y
        return y.reshape(x_BxTxE.shape)


class Block(nnx.Module):
    """One decoder layer; built with `layers=L`, it holds all L layers' weights stacked.

    `post_attn_norm` is the norm before the MLP (HF Llama's post_attention_layernorm, Gemma's
    pre_feedforward_layernorm); Gemma's norms of the attention and MLP outputs are `attn_out_norm`
    and `mlp_out_norm` (None for the other families)."""

    def __init__(self, cfg: ModelConfig, *, param_dtype, dtype, rngs: nnx.Rngs, layers: int | None = None):
        e, sandwich = cfg.hidden_size, cfg.spec.sandwich_norms
        self.input_norm = _norm(cfg, e, param_dtype, layers)
        self.attn = Attention(cfg, param_dtype=param_dtype, dtype=dtype, rngs=rngs, layers=layers)
        self.attn_out_norm = _norm(cfg, e, param_dtype, layers) if sandwich else None
        self.post_attn_norm = _norm(cfg, e, param_dtype, layers)
        self.mlp = MLP(cfg, param_dtype=param_dtype, dtype=dtype, rngs=rngs, layers=layers)
        self.mlp_out_norm = _norm(cfg, e, param_dtype, layers) if sandwich else None

    def __call__(self, x, cos, sin, mask, cache_kv, options, constrain: Constrain = unconstrained):
        y, kv = self.attn(self.input_norm(x), cos, sin, mask, cache_kv, options, constrain)
        x = x + (y if self.attn_out_norm is None else self.attn_out_norm(y))
        y = self.mlp(self.post_attn_norm(x), constrain)
        return x + (y if self.mlp_out_norm is None else self.mlp_out_norm(y)), kv


@jax.tree_util.register_pytree_node_class
class LayerList:
    """A stacked [L, ...] weight held as L separate arrays (`unstack_layers`). The unrolled stack
    reads each layer's array as it is, where taking a layer out of a stacked array makes XLA on
    CPU copy it at every call (and the gradient of the stack is a concatenation of the layers'):
    the frozen reference and, on CPU, the train state are held this way (`adapters.PolicyWeights`).
    The scanned stack stacks it again (`stack_layers`)."""

    def __init__(self, arrays):
        self.arrays = tuple(arrays)

    def tree_flatten(self):
        return self.arrays, None

    @classmethod
    def tree_unflatten(cls, _, arrays):
        return cls(arrays)


def _is_layer_list(x) -> bool:
    return isinstance(x, LayerList)


def has_layer_lists(tree) -> bool:
    return any(map(_is_layer_list, jax.tree.leaves(tree, is_leaf=_is_layer_list)))


def is_stacked_path(path) -> bool:
    """Whether a leaf at `path` (of parameters, or of optimizer moments laid out like them) is a
    stacked [L, ...] layer weight: it lies under the model's `layers`."""
    return any(getattr(key, "key", None) == "layers" for key in path)


def unstack_layers(state):
    """A copy of `state` (a model's parameters, or a tree holding them, such as a train state),
    each stacked layer weight as a `LayerList`. Every leaf is a new buffer, so a donating update of
    `state` leaves the copy intact."""
    def unstack(path, x):
        return LayerList(x[i] for i in range(x.shape[0])) if is_stacked_path(path) else jnp.copy(x)
    return jax.tree.map_with_path(unstack, state)


def stack_layers(state):
    """The inverse of `unstack_layers`: every `LayerList` stacked again into one [L, ...] array."""
    return jax.tree.map(lambda x: jnp.stack(x.arrays) if _is_layer_list(x) else x, state, is_leaf=_is_layer_list)


def _num_layers(params) -> int:
    first = jax.tree.leaves(params, is_leaf=_is_layer_list)[0]
    return len(first.arrays) if _is_layer_list(first) else first.shape[0]


def _layer_slices(xs, num_layers: int) -> list:
    """The stacked [L, ...] leaves of `xs` as L per-layer trees, for the unrolled stack. One split
    per leaf: its gradient is one concatenation of the layers' gradients, where indexing each layer
    made XLA pad every layer's gradient to the whole stack and add them (the 28M Qwen2 of
    bench_step: its update's gradient 1.09x faster on this CPU, benchmarks/README). A `LayerList`
    gives its arrays as they are."""
    leaves, treedef = jax.tree.flatten(xs, is_leaf=_is_layer_list)
    pieces = [leaf.arrays if _is_layer_list(leaf) else [p[0] for p in jnp.split(leaf, num_layers)] for leaf in leaves]
    return [jax.tree.unflatten(treedef, [p[i] for p in pieces]) for i in range(num_layers)]


def _run_layers(layers: Block, x: Array, cos: Array, sin: Array, mask: attn_lib.Mask,
                cache: KVCache | None, options: ModelOptions, constrain: Constrain,
                per_layer: dict[str, np.ndarray] | None = None) -> tuple[Array, KVCache | None]:
    """The stacked layers over x [B, T, E]: a scan (or an unrolled loop) over the weights' first axis.

    cos/sin [K, B, T, D/2]: K rotary tables; `per_layer` (Gemma 3) holds int32 [L] arrays scanned
    beside the weights: "rope" (which table) and "window" (the layer's sliding window, `Mask.window`).
    With a cache, each layer reads its slice [B, KV, S, D] and only the new T slots are written
    back into the stacked [L, ...] arrays, which the loop carries (updated in place by XLA).
    """
    graphdef, params = nnx.split(layers)
    num_layers = _num_layers(params)
    if options.scan_layers:
        params = stack_layers(params)
    per_layer = {k: jnp.asarray(v) for k, v in (per_layer or {}).items()}

    def one_layer(x, layer_params, extra, cache_kv):
        table = extra.get("rope", 0)  # one table: a static index
        layer_mask = mask._replace(window=extra["window"]) if "window" in extra else mask
        return nnx.merge(graphdef, layer_params)(x, cos[table], sin[table], layer_mask, cache_kv, options, constrain)

    if options.remat != "none":
        one_layer = jax.checkpoint(one_layer, policy=_REMAT_POLICIES[options.remat],
                                   prevent_cse=not options.scan_layers)  # a scan needs no CSE barrier

    if cache is not None and isinstance(cache.k, tuple):
        return _run_layers_grouped(one_layer, params, num_layers, per_layer, x, mask, cache, options)

    def body(carry, xs):
        x, ck, cv = carry
        layer_params, i, extra = xs
        if ck is None:
            return (one_layer(x, layer_params, extra, None)[0], None, None), None
        take = lambda c: layer_view(c, i, x.shape[0], mask.key_mask.shape[1])  # noqa: E731
        x, (k, v) = one_layer(x, layer_params, extra, (take(ck), take(cv)))
        put = lambda c, new: write_new(c, new, mask.first_slot, i)  # noqa: E731
        return (x, put(ck, k), put(cv, v)), None

    carry = (x, None, None) if cache is None else (x, cache.k, cache.v)
    xs = (params, jnp.arange(num_layers, dtype=jnp.int32), per_layer)
    if options.scan_layers:
        carry, _ = jax.lax.scan(body, carry, xs)
    else:
        for layer_xs in _layer_slices(xs, num_layers):
            carry, _ = body(carry, layer_xs)
    x, ck, cv = carry
    return x, None if cache is None else cache._replace(k=ck, v=cv)


def _run_layers_grouped(one_layer, params, num_layers: int, per_layer, x: Array, mask: attn_lib.Mask,
                        cache: KVCache, options: ModelOptions) -> tuple[Array, KVCache]:
    """The layers over the decode engine's grouped buffer (its `Blocks`): each layer's attention
    reads its layer of the buffer (`LayerBlocks`; the buffer is not carried by the loop) and returns
    its new keys/values, written into the buffer once after the loop. (Carried and written per
    layer, the buffer was copied whole at every layer by XLA: the read of a layer's view and the
    in-place write could not be ordered.)"""
    def body(x, xs):
        layer_params, i, extra = xs
        x, (k, v) = one_layer(x, layer_params, extra, LayerBlocks(cache.k, cache.v, i))
        return x, (k, v)

    xs = (params, jnp.arange(num_layers, dtype=jnp.int32), per_layer)
    if options.scan_layers:
        x, (k, v) = jax.lax.scan(body, x, xs)
    else:
        outs = []
        for layer_xs in _layer_slices(xs, num_layers):
            x, kv = body(x, layer_xs)
            outs.append(kv)
        k, v = (jnp.stack(z) for z in zip(*outs))
    return x, cache._replace(k=write_new(cache.k, k, mask.first_slot), v=write_new(cache.v, v, mask.first_slot))


class Transformer(nnx.Module):
    """Decoder-only LM. `model(ids, attention_mask=mask)` -> float32 logits [B, T, V]."""

    def __init__(self, config: ModelConfig, *, param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs,
                 options: ModelOptions = ModelOptions()):
        dtype = param_dtype if dtype is None else dtype
        self.config, self.dtype, self.options = config, dtype, options
        self.embed = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), param_dtype, "normal")
        self.layers = Block(config, param_dtype=param_dtype, dtype=dtype, rngs=rngs, layers=config.num_layers)
        self.final_norm = _norm(config, config.hidden_size, param_dtype)
        self.lm_head = (
            None if config.tie_word_embeddings
            else _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), param_dtype, "normal")
        )

    # ------------------------------------------------------------------ forward
    def hidden(
        self, input_ids_BxT: Array, attention_mask_BxT: Array | None = None, *,
        positions_BxT: Array | None = None, cache: KVCache | None = None, constrain: Constrain = unconstrained,
    ) -> tuple[Array, KVCache | None]:
        """Final-normed hidden states [B, T, E] and the updated cache (None without one).

        `constrain` pins the activations to the batch sharding (see `response_logprobs`)."""
        b, t = input_ids_BxT.shape
        mask = jnp.ones((b, t), bool) if attention_mask_BxT is None else jnp.asarray(attention_mask_BxT).astype(bool)
        if cache is None:
            key_mask, first_slot, seen_BxT = mask, np.int32(0), jnp.zeros((b, 1), jnp.int32)
        else:
            first_slot = cache.index
            if jnp.ndim(first_slot) == 1 and t != 1:
                raise ValueError(f"a cache with per-row indices takes one token per row, got {t}")
            key_mask = (cache.key_mask.at[jnp.arange(b), first_slot].set(mask[:, 0]) if jnp.ndim(first_slot) == 1
                        else jax.lax.dynamic_update_slice(cache.key_mask, mask, (0, first_slot)))
            seen_BxT = jnp.sum(cache.key_mask, axis=-1, dtype=jnp.int32)[:, None]
        if positions_BxT is None:
            positions_BxT = jnp.maximum(seen_BxT + jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)
        # A query in slot first_slot + t sees real keys in slots <= its own.
        attn_mask = attn_lib.Mask(key_mask, first_slot)
        attn_mask = attn_mask._replace(dense=attn_mask.allowed(t))

        inv_freqs = jnp.asarray(self.config.inv_freqs(), jnp.float32)  # [K, D/2]
        angles = positions_BxT.astype(jnp.float32)[None, ..., None] * inv_freqs[:, None, None, :]
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        per_layer = {"rope": self.config.layer_rope(), "window": self.config.layer_windows()}

        x = jnp.take(self.embed[...], input_ids_BxT, axis=0)
        if self.config.spec.embed_scale:  # Gemma: sqrt(E) in the weights' dtype, as transformers rounds it
            x = x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)
        x = constrain(x.astype(self.dtype))
        x, new_cache = _run_layers(self.layers, x, cos, sin, attn_mask, cache, self.options, constrain,
                                   {k: v for k, v in per_layer.items() if v is not None})
        x = self.final_norm(x)
        if cache is None:
            return x, None
        return x, new_cache._replace(key_mask=key_mask, index=first_slot + t)

    def output_embedding(self) -> Array:
        """The [V, E] matrix that maps hidden states to logits (the input embedding when tied)."""
        return (self.embed if self.lm_head is None else self.lm_head)[...]

    def logits(self, hidden_BxTxE: Array) -> Array:
        w = self.output_embedding().astype(self.dtype)
        return softcap_logits(jnp.einsum("bte,ve->btv", hidden_BxTxE, w, preferred_element_type=jnp.float32),
                        self.config.final_logit_softcapping)

    def __call__(
        self, input_ids_BxT: Array, attention_mask: Array | None = None, *,
        positions: Array | None = None, cache: KVCache | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Logits [B, T, V] (float32); with a cache, `(logits, new_cache)`."""
        h, new_cache = self.hidden(input_ids_BxT, attention_mask, positions_BxT=positions, cache=cache)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)


def init_random(config: ModelConfig, *, seed: int = 0, dtype=jnp.float32, compute_dtype=None,
                options: ModelOptions = ModelOptions()) -> Transformer:
    """A randomly initialised model (normal(0.02) weights, unit norms, zero biases); no files."""
    return Transformer(config, param_dtype=dtype, dtype=compute_dtype, rngs=nnx.Rngs(params=seed), options=options)


def softcap_logits(logits: Array, cap: float | None) -> Array:
    """Gemma's final soft-capping, c * tanh(logits / c) (before any temperature)."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)
