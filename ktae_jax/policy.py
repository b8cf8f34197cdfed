"""The policy as every entry point loads it: model, tokenizer, stop ids and pad id, from one folder.

`load_policy` serves the trainer, `ktae-eval`, `ktae-generate` and the demo, so that they agree on
what a folder means: a built-in name ("tiny", see `builtin`) or a Hugging Face folder; the stop
ids (`models.eos_token_ids`: config.json, generation_config.json and the tokenizer's EOS); and the
pad id (`pad_token_id`), the one choice of the id written into padding.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from ktae_jax import builtin
from ktae_jax import mesh as mesh_lib
from ktae_jax.models import (CheckpointError, ModelConfig, Transformer, eos_token_ids, init_random, load_pretrained,
                             load_tokenizer)
from ktae_jax.models.config import ModelOptions


@dataclasses.dataclass(frozen=True)
class Policy:
    model: Transformer
    tokenizer: Any  # transformers tokenizer
    stop_ids: tuple[int, ...]  # a response ends at the first of these
    pad_id: int  # written into padding (left of prompts, after a stopped response)
    folder: pathlib.Path  # where it was read from (a built-in name resolved)


def pad_token_id(tokenizer: Any, stop_ids: Sequence[int] = ()) -> int:
    """The tokenizer's pad id; without one its EOS, then the first stop id (padding is always masked,
    so any id serves; an end-of-sequence id is the one a model is used to seeing there)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, *stop_ids):
        if candidate is not None:
            return int(candidate)
    raise CheckpointError("the tokenizer has neither a pad nor an EOS token and the model no stop id: "
                          "padding needs one of them")


def load_policy(path: str | pathlib.Path, *, dtype: Any = "float32", compute_dtype: Any = None, mesh=None,
                init: str = "pretrained", seed: int = 0, options: ModelOptions = ModelOptions()) -> Policy:
    """The policy in `path` (a folder or a built-in name), placed on `mesh` when given.

    `init="random"`: the folder's architecture with random weights (`seed`), its tokenizer.
    `options`: how the model computes (attention kernel, remat, scanned layers; `ModelOptions`).
    A folder without a tokenizer raises `models.CheckpointError` naming it.
    """
    folder = builtin.model_folder(path)
    dtype = jnp.dtype(dtype)
    compute = jnp.dtype(compute_dtype) if compute_dtype is not None else None
    if init == "random":
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: no such file (model.init=random needs the architecture)")
        model = init_random(ModelConfig.from_hf(json.loads(config_file.read_text())), seed=seed, dtype=dtype,
                            compute_dtype=compute, options=options)
        tokenizer = load_tokenizer(folder)
        if mesh is not None:
            mesh_lib.shard_model(model, mesh)
    else:
        try:
            model, tokenizer = load_pretrained(folder, dtype=dtype, compute_dtype=compute, mesh=mesh,
                                               options=options)
        except CheckpointError:
            raise
        except (ValueError, OSError, OverflowError, MemoryError) as err:  # a truncated or foreign weights file
            raise CheckpointError(f"{folder}: cannot load the model (a damaged or foreign weights file?): "
                                  f"{type(err).__name__} {err}") from None
    if tokenizer is None:
        raise CheckpointError(f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json) in the "
                              "model folder")
    stop_ids = eos_token_ids(folder, model.config, tokenizer)
    return Policy(model, tokenizer, stop_ids, pad_token_id(tokenizer, stop_ids), folder)
