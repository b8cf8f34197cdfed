"""What differs between the decoder families we support, in one table (the seam for a new family).

A family is a `Family` row: its Hugging Face `model_type` and architecture name, how config.json's
keys turn into biases, whether queries and keys get a per-head RMSNorm before the rotary embedding
(Qwen3), the MLP activation, and config.json keys it writes back. The transformer reads the row
(`ModelConfig.spec`), and `hf_io` adds the per-layer tensors of optional parts (q/k norms) from it;
every layer of a family has the same parts, which keeps the weights stackable for the layer scan.

Adding a family = one row here (plus, for a new kind of difference, its field and the few lines
that use it in `transformer.py`). Gemma 3 added the embedding scale (sqrt(hidden)), the norm offset
(scale = 1 + weight, in float32), the norms on the attention and MLP outputs, and per-layer
attention (`layer_types`: sliding-window layers with their own rope base), which `config.py`
reads from config.json and the layer scan carries as per-layer inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

# HF activation name -> function (gelu_pytorch_tanh: GELU's tanh approximation, as torch's approximate="tanh")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # config.json "architectures"
    qkv_bias: bool | None  # always on / off; None = config.json's attention_bias
    o_bias_key: str | None  # config.json key switching the o_proj bias (None: never)
    mlp_bias_key: str | None  # config.json key switching the MLP biases (None: never)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before the rotary embedding
    extra_hf: tuple[tuple[str, Any], ...] = ()  # constant config.json entries written back
    act_key: str = "hidden_act"  # config.json key of the MLP activation
    norm_offset: bool = False  # RMSNorm scale = 1 + weight, applied in float32 (Gemma)
    embed_scale: bool = False  # input embeddings times sqrt(hidden), rounded to the weights' dtype (Gemma)
    sandwich_norms: bool = False  # RMSNorms on the attention and MLP outputs too, before the residual add
    layer_types: bool = False  # config.json `layer_types`: sliding-window layers with their own rope base
    # Whether the family's HF model applies attn_logit_softcapping. transformers' Gemma3 keeps the key
    # but never passes it to attention (Gemma 3 checkpoints leave it null): a set value is refused.
    attn_softcap: bool = False
    defaults: tuple[tuple[str, Any], ...] = ()  # config.json values the family's HF config class assumes

    def biases(self, hf: dict[str, Any]) -> tuple[bool, bool, bool]:
        """(qkv, o, mlp) biases from a config.json dict."""
        attention = bool(hf.get("attention_bias", False))
        qkv = attention if self.qkv_bias is None else self.qkv_bias
        o = bool(hf.get(self.o_bias_key, False)) if self.o_bias_key else False
        mlp = bool(hf.get(self.mlp_bias_key, False)) if self.mlp_bias_key else False
        return qkv, o, mlp

    def hf_bias_keys(self, qkv: bool, o: bool, mlp: bool) -> dict[str, Any]:
        """The config.json keys that give back these biases; a combination the family cannot
        express raises ValueError naming it."""
        keys: dict[str, Any] = {}
        if self.qkv_bias is None:
            keys["attention_bias"] = qkv
        if self.o_bias_key:
            keys[self.o_bias_key] = o
        if self.mlp_bias_key:
            keys[self.mlp_bias_key] = mlp
        if self.biases(keys) != (qkv, o, mlp):
            raise ValueError(f"a {self.model_type} config cannot have biases qkv={qkv}, o={o}, mlp={mlp}")
        return keys


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, o_bias_key=None, mlp_bias_key=None,
           extra_hf=(("use_sliding_window", False),)),
    Family("llama", "LlamaForCausalLM", qkv_bias=None, o_bias_key="attention_bias", mlp_bias_key="mlp_bias"),
    Family("qwen3", "Qwen3ForCausalLM", qkv_bias=None, o_bias_key="attention_bias", mlp_bias_key=None,
           qk_norm=True, extra_hf=(("use_sliding_window", False),)),
    # Gemma 3 text (Gemma3ForCausalLM); its defaults are Gemma3TextConfig's.
    Family("gemma3_text", "Gemma3ForCausalLM", qkv_bias=None, o_bias_key="attention_bias", mlp_bias_key=None,
           qk_norm=True, act_key="hidden_activation", norm_offset=True, embed_scale=True, sandwich_norms=True,
           layer_types=True, defaults=(
               ("hidden_activation", "gelu_pytorch_tanh"), ("head_dim", 256), ("query_pre_attn_scalar", 256),
               ("sliding_window", 4096), ("sliding_window_pattern", 6), ("rope_theta", 1_000_000.0),
               ("rope_local_base_freq", 10_000.0), ("tie_word_embeddings", True),
               ("max_position_embeddings", 131_072), ("pad_token_id", 0), ("eos_token_id", 1), ("bos_token_id", 2))),
)}
