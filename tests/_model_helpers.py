"""Tiny random Hugging Face checkpoints (Qwen2 / Llama / Qwen3 / Gemma 3) built with transformers + torch, offline.

`make_hf_checkpoint(tmp_path, family="qwen2", **overrides)` writes config.json, model.safetensors,
generation_config.json and a small word-level tokenizer (with a chat template and eos/pad
tokens) into a folder and returns it. Other test modules (trainer, sampler) reuse it.
"""

from __future__ import annotations

import atexit
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    ["system", "user", "assistant", "the", "answer", "is", "what", "plus", "minus", "times"]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + [str(d) for d in range(10)]
    + ["+", "-", "*", "=", "?", ".", ",", "(", ")"]
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)

_DEFAULTS: dict[str, Any] = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False,
    max_position_embeddings=512, rms_norm_eps=1e-6,
)


def make_tokenizer() -> Any:
    """A word-level PreTrainedTokenizerFast over SPECIAL_TOKENS + WORDS, built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def make_hf_checkpoint(
    tmp_path: pathlib.Path, family: str = "qwen2", *, seed: int = 0, weight_std: float = 0.1,
    name: str | None = None, **overrides: Any,
) -> pathlib.Path:
    """Writes a random tiny `family` ("qwen2" | "llama" | "qwen3" | "gemma3_text") checkpoint; `overrides`
    go to the HF config.

    All weights (biases included) are drawn normal(0, weight_std) and norm scales 1 + normal(0, 0.1)
    (Gemma's weights normal(0, 0.1): its scale is 1 + weight), so that biases and norms matter and
    greedy argmax is not decided by rounding noise.
    The same arguments give the same files: a checkpoint built before in this session is copied.
    """
    folder = pathlib.Path(tmp_path) / (name or f"{family}-{seed}")
    key = repr((family, seed, weight_std, sorted(overrides.items())))
    if key in _BUILT:
        shutil.copytree(_BUILT[key], folder, dirs_exist_ok=True)
        return folder
    _build_hf_checkpoint(folder, family, seed, weight_std, overrides)
    _BUILT[key] = pathlib.Path(tempfile.mkdtemp(dir=_built_root())) / "checkpoint"
    shutil.copytree(folder, _BUILT[key])  # a private copy: the caller's folder may be changed by its test
    return folder


_BUILT: dict[str, pathlib.Path] = {}
_ROOT: list[str] = []


def _built_root() -> str:
    if not _ROOT:
        _ROOT.append(tempfile.mkdtemp(prefix="ktae-test-checkpoints-"))
        atexit.register(shutil.rmtree, _ROOT[0], ignore_errors=True)
    return _ROOT[0]


def _build_hf_checkpoint(folder: pathlib.Path, family: str, seed: int, weight_std: float,
                         overrides: dict[str, Any]) -> None:
    import torch
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    tokenizer = make_tokenizer()
    kwargs = dict(_DEFAULTS)
    kwargs.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(overrides)
    if family == "qwen2":
        config, model_cls = Qwen2Config(**kwargs), Qwen2ForCausalLM
    elif family == "llama":
        config, model_cls = LlamaConfig(**kwargs), LlamaForCausalLM
    elif family == "qwen3":
        config, model_cls = Qwen3Config(**kwargs), Qwen3ForCausalLM
    elif family == "gemma3_text":
        config, model_cls = Gemma3TextConfig(**kwargs), Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.copy_((0.0 if family == "gemma3_text" else 1.0) + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, weight_std)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def left_padded_batch(
    lengths: list[int], vocab_size: int, pad_id: int = 0, seed: int = 0, low: int = 6,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 [B, max(lengths)]: random tokens in [low, vocab), left-padded with pad_id."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.full((len(lengths), t), pad_id, np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for row, n in enumerate(lengths):
        ids[row, t - n:] = rng.integers(low, vocab_size, n)
        mask[row, t - n:] = 1
    return ids, mask


def hf_logits(folder: pathlib.Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers' float32 logits [B, T, V], positions counted over real tokens (as generate does)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions)
    return out.logits.float().numpy()
