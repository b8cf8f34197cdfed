"""Model hyper-parameters: one frozen dataclass for the Qwen2 / Llama / Qwen3 / Gemma 3 decoders.

What differs between families is one row each in `families.FAMILIES`; this file reads and writes
config.json through that row.

`ModelConfig.from_hf(dict)` reads a Hugging Face `config.json` (both the older top-level
`rope_theta` / `rope_scaling` keys and transformers-5 `rope_parameters`), and `to_hf()` writes one
back that transformers loads. The dataclass is hashable: NNX keeps it in the graphdef (static).

Per-layer attention (Gemma 3's `layer_types`): "sliding_attention" layers see the last
`sliding_window` cache slots (their own included) and use the rope base `rope_local_theta`
without scaling; "full_attention" layers see everything and use `rope_theta` with `rope_scaling`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ktae_jax.models.families import ACTIVATIONS, FAMILIES, Family

SUPPORTED_FAMILIES = tuple(FAMILIES)
# RoPE variants whose inverse frequencies we compute; others (yarn, dynamic, ...) are rejected.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
UNBOUNDED = 2**30  # the window of a full-attention layer in the per-layer window array (no slot is that far)


REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "cudnn", "pallas")
DECODE_ATTENTION = ("auto", "dense", "ragged")


class ConfigError(ValueError):
    """A config.json we cannot represent; the message names the offending key."""


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the model computes (not what): results equal up to rounding for every choice.

    attention: `auto` (by platform: TPU pallas, GPU cudnn, CPU xla for short rows else blockwise),
    `xla` (scores materialised), `blockwise`, `cudnn`, `pallas`; see `models.attention`.
    remat: what the backward pass keeps per layer: `none` (everything), `full` (only the layer's
    input; all recomputed), `dots` (matmul outputs without batch dimensions: the projections).
    scan_layers: the layer stack as one `lax.scan` (compile time independent of depth) or unrolled.
    decode_attention: the decode engine's step over its cache past the first block: `dense` (every
    row reads the whole view), `ragged` (each row up to its own length, row by row), `auto` (ragged
    on CPU, dense on GPU/TPU, where a loop of small per-row pieces would leave the device idle);
    see `attention.engine_decode_attention`.
    platform: the target for `auto` ('cpu', 'gpu', 'tpu'); "" = JAX's default backend when traced.
    mesh: the device mesh a run uses, for kernels that must be placed by hand (Pallas: `shard_map`
    over the batch and head splits); None on one device.
    """

    attention: str = "auto"
    attention_block: int = 512  # keys per block of the blockwise implementation
    remat: str = "none"
    decode_attention: str = "auto"
    scan_layers: bool = True
    platform: str = ""
    mesh: Any = None  # a jax.sharding.Mesh (hashable, static like the rest)

    def ragged_decode(self) -> bool:
        """Whether the decode engine's step reads each row's cache up to its own length (`decode_attention`)."""
        if self.decode_attention == "auto":
            import jax

            return (self.platform or jax.default_backend()) == "cpu"
        return self.decode_attention == "ragged"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"model.attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")
        if self.decode_attention not in DECODE_ATTENTION:
            raise ConfigError(f"model.decode_attention={self.decode_attention!r}: expected one of {DECODE_ATTENTION}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        if self.attention_block < 1:
            raise ConfigError(f"model.attention_block={self.attention_block}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # a key of families.FAMILIES: "qwen2", "llama", "qwen3", "gemma3_text"
    vocab_size: int
    hidden_size: int  # E
    intermediate_size: int  # F, the SwiGLU width
    num_layers: int
    num_heads: int  # H, query heads
    num_kv_heads: int  # KV, key/value heads (grouped-query attention when < H)
    head_dim: int  # D
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Sorted (key, value) pairs of the HF rope scaling dict without rope_theta; None = plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on q/k/v projections (always on for Qwen2)
    o_bias: bool = False  # bias on the output projection (Llama / Qwen3 attention_bias)
    mlp_bias: bool = False  # biases on gate/up/down (Llama mlp_bias)
    hidden_act: str = "silu"  # MLP activation, a key of families.ACTIVATIONS
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    query_pre_attn_scalar: int | None = None  # attention scores scaled by its -1/2 power (None: head_dim's)
    attn_logit_softcapping: float | None = None  # scores -> c * tanh(scores / c) before the mask
    final_logit_softcapping: float | None = None  # logits -> c * tanh(logits / c)
    layer_types: tuple[str, ...] | None = None  # per layer, one of LAYER_TYPES; None: all full attention
    sliding_window: int | None = None  # slots a sliding-window layer sees, its own included
    rope_local_theta: float | None = None  # rope base of the sliding-window layers (None: rope_theta)

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise ConfigError(f"model_type {self.family!r} is not supported (expected one of {SUPPORTED_FAMILIES})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope_scaling rope_type {rope_type!r} is not supported ({SUPPORTED_ROPE_TYPES})")
        if self.attn_logit_softcapping is not None and not self.spec.attn_softcap:
            raise ConfigError(f"attn_logit_softcapping={self.attn_logit_softcapping}: not supported for {self.family} "
                              "(its transformers model does not apply it; null in its checkpoints)")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ConfigError(f"layer_types: {unknown[0]!r} is not supported (expected one of {LAYER_TYPES})")
            if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) >= 1:
                raise ConfigError(f"sliding_window={self.sliding_window}: sliding_attention layers need a window >= 1")

    @property
    def spec(self) -> Family:
        """The family's row: what differs from the other families."""
        return FAMILIES[self.family]

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling or ()).get("rope_type", "default")

    @property
    def attention_scale(self) -> float:
        """The factor on q . k: query_pre_attn_scalar ** -0.5 (Gemma) or head_dim ** -0.5."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_windows(self) -> np.ndarray | None:
        """int32 [L]: the cache slots each layer sees (UNBOUNDED for full attention); None when no
        layer has a window (then the model builds no window masks at all)."""
        if not self.layer_types or "sliding_attention" not in self.layer_types:
            return None
        return np.array([self.sliding_window if t == "sliding_attention" else UNBOUNDED for t in self.layer_types],
                        np.int32)

    def layer_rope(self) -> np.ndarray | None:
        """int32 [L]: which of `inv_freqs()` each layer uses; None when all layers share one."""
        if self.rope_local_theta is None or not self.layer_types or "sliding_attention" not in self.layer_types:
            return None
        return np.array([int(t == "sliding_attention") for t in self.layer_types], np.int32)

    def inv_freqs(self) -> np.ndarray:
        """[K, D/2]: the global rope, then (when the layers differ) the sliding-window layers' rope."""
        if self.layer_rope() is None:
            return self.inv_freq()[None]
        d = self.head_dim
        local = 1.0 / (self.rope_local_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        return np.stack([self.inv_freq(), local])

    @property
    def num_params(self) -> int:
        """Parameter count, for benchmarks (bandwidth bound) and logs."""
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        attn += (self.num_heads + 2 * self.num_kv_heads) * d * self.qkv_bias + e * self.o_bias
        mlp = 3 * e * f + (2 * f + e) * self.mlp_bias
        per_layer = attn + mlp + (4 if self.spec.sandwich_norms else 2) * e + 2 * d * self.spec.qk_norm
        embed = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + e

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [D/2] (float64 on host), with the config's scaling applied."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        scaling = dict(self.rope_scaling or ())
        rope_type = self.rope_type
        if rope_type == "linear":
            inv = inv / float(scaling["factor"])
        elif rope_type == "llama3":
            # Llama 3.1: long wavelengths divided by `factor`, short kept, a linear blend between.
            factor = float(scaling["factor"])
            low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
            old_len = float(scaling.get("original_max_position_embeddings", self.max_position_embeddings))
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > old_len / low, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            blended = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
            inv = np.where(medium, blended, scaled)
        return inv

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Reads a Hugging Face config.json dict; unsupported settings raise ConfigError naming the key."""

        family = hf.get("model_type")
        if family == "gemma3":
            raise ConfigError("model_type 'gemma3' (multimodal Gemma 3, Gemma3ForConditionalGeneration) is not "
                              "supported; text-only 'gemma3_text' folders (Gemma3ForCausalLM) are")
        if family not in SUPPORTED_FAMILIES:
            raise ConfigError(f"model_type {family!r} is not supported (expected one of {SUPPORTED_FAMILIES})")
        spec = FAMILIES[family]
        hf = {**dict(spec.defaults), **hf}

        def need(key: str) -> Any:
            if key not in hf:
                raise ConfigError(f"config.json lacks the key {key!r}")
            return hf[key]

        act = hf.get(spec.act_key, "silu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"{spec.act_key} {act!r} is not supported ({tuple(ACTIVATIONS)})")
        if hf.get("use_sliding_window", False):
            raise ConfigError("use_sliding_window=true is not supported")
        if hf.get("use_bidirectional_attention", False):
            raise ConfigError("use_bidirectional_attention=true is not supported (causal decoders only)")
        if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConfigError("partial_rotary_factor != 1 is not supported")
        if int(hf.get("pretraining_tp", 1)) != 1:
            raise ConfigError("pretraining_tp != 1 is not supported")
        hidden, heads, layers = int(need("hidden_size")), int(need("num_attention_heads")), int(need("num_hidden_layers"))
        params = dict(hf.get("rope_parameters") or {})
        per_type = spec.layer_types and bool(set(params) & set(LAYER_TYPES))  # {"full_attention": {...}, ...}
        theta, rope_scaling = _rope(dict(params.get("full_attention") or {}) if per_type else params,
                                    hf.get("rope_scaling") or {}, float(hf.get("rope_theta", 10000.0)))
        extra: dict[str, Any] = {}
        if spec.layer_types:
            extra = _layer_fields(hf, layers, dict(params.get("sliding_attention") or {}) if per_type else {})
        eos = hf.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        qkv_bias, o_bias, mlp_bias = spec.biases(hf)
        optional = lambda key: None if hf.get(key) is None else float(hf[key])  # noqa: E731
        return cls(
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            hidden_act=act,
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
            query_pre_attn_scalar=None if hf.get("query_pre_attn_scalar") is None else int(hf["query_pre_attn_scalar"]),
            attn_logit_softcapping=optional("attn_logit_softcapping"),
            final_logit_softcapping=optional("final_logit_softcapping"),
            **extra,
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers' AutoConfig reads back into the same model."""
        try:
            bias_keys = self.spec.hf_bias_keys(self.qkv_bias, self.o_bias, self.mlp_bias)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        rope = {"rope_theta": self.rope_theta, "rope_type": "default", **dict(self.rope_scaling or ())}
        eos: Any = list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0]
        hf: dict[str, Any] = {
            "architectures": [self.spec.architecture],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            self.spec.act_key: self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # read by older transformers / vLLM
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos if self.eos_token_ids else None,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if self.spec.layer_types:
            local = self.rope_theta if self.rope_local_theta is None else self.rope_local_theta
            hf["rope_parameters"] = {"full_attention": rope,
                                     "sliding_attention": {"rope_type": "default", "rope_theta": local}}
            hf["rope_local_base_freq"] = local  # older transformers / vLLM
            hf["layer_types"] = list(self.layer_types or ("full_attention",) * self.num_layers)
            hf["sliding_window"] = self.sliding_window
        for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(self, key) is not None or self.spec.layer_types:
                hf[key] = getattr(self, key)
        hf.update(bias_keys)
        hf.update(self.spec.extra_hf)
        return hf


def _rope(params: dict[str, Any], legacy: dict[str, Any], theta: float) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling) from a rope_parameters dict and the older rope_scaling / rope_theta keys."""
    rope = dict(params)
    rope.update({k: v for k, v in legacy.items() if k != "type"})
    if "type" in legacy and "rope_type" not in rope:
        rope["rope_type"] = legacy["type"]
    theta = float(rope.pop("rope_theta", theta))
    return theta, (tuple(sorted(rope.items())) if rope.get("rope_type", "default") != "default" else None)


def _layer_fields(hf: dict[str, Any], layers: int, local_rope: dict[str, Any]) -> dict[str, Any]:
    """Per-layer attention (Gemma 3): layer_types (or every `sliding_window_pattern`-th layer full),
    the window and the sliding layers' rope base (rope_parameters.sliding_attention or rope_local_base_freq)."""
    types = hf.get("layer_types")
    if types is None:
        pattern = int(hf.get("sliding_window_pattern") or 1)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if local_rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_parameters.sliding_attention rope_type {local_rope['rope_type']!r} is not supported "
                          "(only 'default')")
    window = hf.get("sliding_window")
    return dict(layer_types=tuple(str(t) for t in types), sliding_window=None if window is None else int(window),
                rope_local_theta=float(local_rope.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))))
