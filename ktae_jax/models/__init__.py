"""Qwen2 / Llama / Qwen3 / Gemma 3 (text) decoders in Flax NNX, loaded from and saved to Hugging Face checkpoint folders."""

from ktae_jax.models.config import ConfigError, ModelConfig, ModelOptions
from ktae_jax.models.hf_io import CheckpointError, eos_token_ids, load_pretrained, load_tokenizer, save_pretrained
from ktae_jax.models.kv_cache import KVCache, init_cache
from ktae_jax.models.logprobs import response_logprobs, token_logprobs
from ktae_jax.models.transformer import Transformer, init_random

__all__ = [
    "CheckpointError", "ConfigError", "KVCache", "ModelConfig", "ModelOptions", "Transformer", "eos_token_ids",
    "init_cache", "init_random", "load_pretrained", "load_tokenizer", "response_logprobs", "save_pretrained",
    "token_logprobs",
]
