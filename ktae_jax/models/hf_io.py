"""Loading from and saving to Hugging Face checkpoint folders (config.json, safetensors, tokenizer).

Hugging Face stores linear weights as [out, in]; we store [in, ...] with heads split out
(q: [E, H, D], o: [H, D, E]). `_param_map` is the single table of names and layout changes
used by both directions, so load and save cannot drift apart.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktae_jax.mesh import variable_sharding
from ktae_jax.models.config import ModelConfig, ModelOptions
from ktae_jax.models.safetensors_io import read_safetensors, write_safetensors
from ktae_jax.models.transformer import Transformer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


class CheckpointError(ValueError):
    """A checkpoint folder we cannot load; the message names the file and tensor."""


# One entry: (our path in the module tree, layer (None: not a per-layer weight), HF tensor name, layout kind).
# Per-layer weights are stacked along a leading [L] axis on our side: slice `layer` of our variable.
ParamEntry = tuple[tuple[str, ...], int | None, str, str]


def _param_map(cfg: ModelConfig) -> list[ParamEntry]:
    entries: list[ParamEntry] = [(("embed",), None, "model.embed_tokens.weight", "copy")]
    a, m = ("layers", "attn"), ("layers", "mlp")
    per_layer = [
        (("layers", "input_norm", "weight"), "input_layernorm.weight", "copy"),
        (("layers", "post_attn_norm", "weight"), "post_attention_layernorm.weight", "copy"),
        (a + ("q",), "self_attn.q_proj.weight", "heads_in"),
        (a + ("k",), "self_attn.k_proj.weight", "heads_in"),
        (a + ("v",), "self_attn.v_proj.weight", "heads_in"),
        (a + ("o",), "self_attn.o_proj.weight", "heads_out"),
        (m + ("gate",), "mlp.gate_proj.weight", "linear"),
        (m + ("up",), "mlp.up_proj.weight", "linear"),
        (m + ("down",), "mlp.down_proj.weight", "linear"),
    ]
    if cfg.spec.sandwich_norms:  # Gemma: HF's post_attention_layernorm is the attention output's norm
        per_layer[1] = (("layers", "post_attn_norm", "weight"), "pre_feedforward_layernorm.weight", "copy")
        per_layer += [(("layers", "attn_out_norm", "weight"), "post_attention_layernorm.weight", "copy"),
                      (("layers", "mlp_out_norm", "weight"), "post_feedforward_layernorm.weight", "copy")]
    if cfg.spec.qk_norm:
        per_layer += [(a + (f"{n}_norm", "weight"), f"self_attn.{n}_norm.weight", "copy") for n in "qk"]
    if cfg.qkv_bias:
        per_layer += [(a + (f"{n}_bias",), f"self_attn.{n}_proj.bias", "heads_bias") for n in "qkv"]
    if cfg.o_bias:
        per_layer.append((a + ("o_bias",), "self_attn.o_proj.bias", "copy"))
    if cfg.mlp_bias:
        per_layer += [(m + (f"{n}_bias",), f"mlp.{n}_proj.bias", "copy") for n in ("gate", "up", "down")]
    for i in range(cfg.num_layers):
        entries += [(path, i, f"model.layers.{i}.{name}", kind) for path, name, kind in per_layer]
    entries.append((("final_norm", "weight"), None, "model.norm.weight", "copy"))
    if not cfg.tie_word_embeddings:
        entries.append((("lm_head",), None, "lm_head.weight", "copy"))
    return entries


def _hf_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "heads_in":  # ours [E, n, D] <- HF [n*D, E]
        return (ours[1] * ours[2], ours[0])
    if kind == "heads_out":  # ours [H, D, E] <- HF [E, H*D]
        return (ours[2], ours[0] * ours[1])
    if kind == "heads_bias":  # ours [n, D] <- HF [n*D]
        return (ours[0] * ours[1],)
    if kind == "linear":  # ours [in, out] <- HF [out, in]
        return ours[::-1]
    return ours


def _from_hf(kind: str, x: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    """HF layout -> ours; numpy views where possible, so a memory-mapped tensor is not read whole."""
    if kind in ("heads_in", "heads_out", "linear"):
        return x.T.reshape(ours)
    return x.reshape(ours)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if kind == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    if kind == "heads_bias":
        return x.reshape(-1)
    if kind == "linear":
        return x.T
    return x


def _get(module: Any, path: tuple[str, ...]) -> nnx.Variable:
    for key in path:
        module = getattr(module, key)
    return module


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc


def _open_weights(folder: pathlib.Path) -> dict[str, tuple[pathlib.Path, np.ndarray]]:
    """HF name -> (file, memory-mapped array), from model.safetensors or a sharded index."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = sorted(set(weight_map.values()))
    elif single.exists():
        weight_map, files = None, [single.name]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, tuple[pathlib.Path, np.ndarray]] = {}
    for name in files:
        file = folder / name
        if not file.exists():
            raise CheckpointError(f"{file}: listed in {index.name} but missing")
        for key, array in read_safetensors(file).items():
            if weight_map is not None and weight_map.get(key) != name:
                continue  # the index is the authority on which file holds a tensor
            tensors[key] = (file, array)
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in tensors:
                raise CheckpointError(f"{folder / name}: tensor {key!r} listed in {index.name} is not in the file")
    return tensors


def _place(var: nnx.Variable, parts: list[np.ndarray] | np.ndarray, dtype: jnp.dtype,
           mesh: jax.sharding.Mesh | None) -> jax.Array:
    """One variable's value from a host array, or from one host array per layer (stacked on axis 0)."""
    shape = tuple(var.get_value().shape)
    stacked = isinstance(parts, list)

    def block(idx: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return np.asarray(parts[idx]).astype(dtype)
        # Only the layers (and within them the slice) this device holds are read from the files.
        return np.stack([np.asarray(p[idx[1:]]).astype(dtype) for p in parts[idx[0]]])

    if mesh is None:
        return jnp.asarray(block(tuple(slice(None) for _ in shape)))
    return jax.make_array_from_callback(shape, variable_sharding(var, mesh), block)


def load_pretrained(
    path: str | pathlib.Path, *, dtype=jnp.float32, compute_dtype=None,
    mesh: jax.sharding.Mesh | None = None, options: ModelOptions = ModelOptions(),
) -> tuple[Transformer, Any]:
    """(model, tokenizer or None) from a Hugging Face folder.

    `dtype` is the parameter dtype, `compute_dtype` the activations' (default: `dtype`). The model
    is built abstractly (`nnx.eval_shape`) and each tensor is read from its memory-mapped file straight
    into place (each layer's into its slice of the stacked weights); with `mesh`, every device
    receives only its shard (by the mesh rules). `options`: how the model computes (`ModelOptions`).
    Missing, unexpected or mis-shaped tensors raise CheckpointError naming the tensor and file.
    """
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{config_file}: missing")
    try:
        config = ModelConfig.from_hf(_read_json(config_file))
    except ValueError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from exc
    tensors = _open_weights(folder)

    # Abstract model first: no random weights are ever materialised.
    model = nnx.eval_shape(lambda: Transformer(config, param_dtype=dtype, dtype=compute_dtype, rngs=nnx.Rngs(0),
                                               options=options))
    host: dict[tuple[str, ...], Any] = {}  # our path -> host array, or per-layer list of them
    for our_path, layer, hf_name, kind in _param_map(config):
        ours = tuple(_get(model, our_path).get_value().shape)
        ours = ours if layer is None else ours[1:]
        if hf_name not in tensors:
            raise CheckpointError(f"{folder}: tensor {hf_name!r} is missing from the checkpoint")
        file, array = tensors[hf_name]
        want = _hf_shape(kind, ours)
        if tuple(array.shape) != want:
            raise CheckpointError(f"{file}: tensor {hf_name!r} has shape {tuple(array.shape)}, expected {want}")
        value = _from_hf(kind, array, ours)
        if layer is None:
            host[our_path] = value
        else:
            host.setdefault(our_path, []).append(value)
    for our_path, parts in host.items():
        var = _get(model, our_path)
        var.set_value(_place(var, parts, jnp.dtype(dtype), mesh))
    used = {hf_name for _, _, hf_name, _ in _param_map(config)}
    unexpected = [
        n for n in tensors
        if n not in used and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if unexpected:
        raise CheckpointError(f"{tensors[unexpected[0]][0]}: unexpected tensor(s) {unexpected[:5]}")
    return model, load_tokenizer(folder)


def load_tokenizer(folder: str | pathlib.Path) -> Any:
    """transformers' AutoTokenizer from local files, or None when the folder has no tokenizer."""
    folder = pathlib.Path(folder)
    if not any((folder / name).exists() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    declared = None
    if (folder / "tokenizer_config.json").exists():
        declared = _read_json(folder / "tokenizer_config.json").get("tokenizer_class")
    if declared in _GENERIC_TOKENIZER_CLASSES and (folder / "tokenizer.json").exists():
        # transformers 5's AutoTokenizer swaps a generic class for the model type's own (e.g.
        # Qwen2Tokenizer), which rebuilds the pre-tokenizer; keep tokenizer.json as written.
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def eos_token_ids(folder: str | pathlib.Path, config: ModelConfig, tokenizer: Any = None) -> tuple[int, ...]:
    """Stop ids: the config's, generation_config.json's and the tokenizer's EOS, deduplicated."""
    ids = list(config.eos_token_ids)
    gen = pathlib.Path(folder) / "generation_config.json"
    if gen.exists():
        eos = _read_json(gen).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def save_pretrained(
    model: Transformer, tokenizer: Any, path: str | pathlib.Path, *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> pathlib.Path:
    """Writes config.json, safetensors (sharded above `max_shard_bytes`) and the tokenizer."""
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    param_dtype = None
    values: dict[tuple[str, ...], np.ndarray] = {}  # one device-to-host copy per (stacked) variable
    for our_path, layer, hf_name, kind in _param_map(config):
        host = values.get(our_path)
        if host is None:
            host = values[our_path] = np.asarray(jax.device_get(_get(model, our_path)[...]))
        host = host if layer is None else host[layer]
        param_dtype = param_dtype or host.dtype
        tensor = np.ascontiguousarray(_to_hf(kind, host))
        if sizes[-1] and sizes[-1] + tensor.nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][hf_name] = tensor
        sizes[-1] += tensor.nbytes
    for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        old.unlink()  # stale shards from an earlier save would confuse loaders
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(folder / name, shard)
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = config.to_hf()
    hf["dtype"] = "bfloat16" if param_dtype == jnp.bfloat16 else str(np.dtype(param_dtype))
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder
