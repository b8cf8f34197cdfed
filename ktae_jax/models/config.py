"""Model hyper-parameters: one frozen dataclass for the Qwen2 / Llama / Qwen3 decoders.

What differs between families is one row each in `families.FAMILIES`; this file reads and writes
config.json through that row.

`ModelConfig.from_hf(dict)` reads a Hugging Face `config.json` (both the older top-level
`rope_theta` / `rope_scaling` keys and transformers-5 `rope_parameters`), and `to_hf()` writes one
back that transformers loads. The dataclass is hashable: NNX keeps it in the graphdef (static).
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


REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "cudnn", "pallas")


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
    platform: the target for `auto` ('cpu', 'gpu', 'tpu'); "" = JAX's default backend when traced.
    mesh: the device mesh a run uses, for kernels that must be placed by hand (Pallas: `shard_map`
    over the batch and head splits); None on one device.
    """

    attention: str = "auto"
    attention_block: int = 512  # keys per block of the blockwise implementation
    remat: str = "none"
    scan_layers: bool = True
    platform: str = ""
    mesh: Any = None  # a jax.sharding.Mesh (hashable, static like the rest)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"model.attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        if self.attention_block < 1:
            raise ConfigError(f"model.attention_block={self.attention_block}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # a key of families.FAMILIES: "qwen2", "llama", "qwen3"
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

    @property
    def spec(self) -> Family:
        """The family's row: what differs from the other families."""
        return FAMILIES[self.family]

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling or ()).get("rope_type", "default")

    @property
    def num_params(self) -> int:
        """Parameter count, for benchmarks (bandwidth bound) and logs."""
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        attn += (self.num_heads + 2 * self.num_kv_heads) * d * self.qkv_bias + e * self.o_bias
        mlp = 3 * e * f + (2 * f + e) * self.mlp_bias
        per_layer = attn + mlp + 2 * e + 2 * d * self.spec.qk_norm
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

        def need(key: str) -> Any:
            if key not in hf:
                raise ConfigError(f"config.json lacks the key {key!r}")
            return hf[key]

        family = hf.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ConfigError(f"model_type {family!r} is not supported (expected one of {SUPPORTED_FAMILIES})")
        if hf.get("hidden_act", "silu") not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported ({tuple(ACTIVATIONS)})")
        if hf.get("use_sliding_window", False):
            raise ConfigError("use_sliding_window=true is not supported")
        if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConfigError("partial_rotary_factor != 1 is not supported")
        if int(hf.get("pretraining_tp", 1)) != 1:
            raise ConfigError("pretraining_tp != 1 is not supported")
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope.update({k: v for k, v in legacy.items() if k != "type"})
        if "type" in legacy and "rope_type" not in rope:
            rope["rope_type"] = legacy["type"]
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_scaling = tuple(sorted(rope.items())) if rope.get("rope_type", "default") != "default" else None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        qkv_bias, o_bias, mlp_bias = FAMILIES[family].biases(hf)
        return cls(
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
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
            hidden_act=hf.get("hidden_act", "silu"),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
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
            "hidden_act": self.hidden_act,
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
        hf.update(bias_keys)
        hf.update(self.spec.extra_hf)
        return hf
