"""Models against Hugging Face PyTorch: logits, cached decoding, save round trip, 8-device sharding."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from _model_helpers import hf_logits, left_padded_batch, make_hf_checkpoint
from ktae_jax.mesh import MeshConfig, batch_sharding, make_mesh
from ktae_jax.models import (
    CheckpointError, ConfigError, ModelConfig, init_cache, init_random, load_pretrained, response_logprobs, save_pretrained,
    token_logprobs,
)
from ktae_jax.models.safetensors_io import read_safetensors, write_safetensors

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
VARIANTS = {
    "qwen2-gqa-untied": ("qwen2", {}),
    "qwen2-mha-tied-theta1e6": ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=1e6)),
    "llama-gqa1-untied-nobias": ("llama", dict(num_key_value_heads=1, rope_theta=500000.0)),
    "llama-tied-bias-llama3rope": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                                 rope_scaling=LLAMA3_ROPE, head_dim=24)),
    "qwen3-qknorm-headdim24": ("qwen3", dict(head_dim=24)),  # q/k RMSNorm per head; head_dim != hidden / heads
    "qwen3-tied-attention-bias": ("qwen3", dict(tie_word_embeddings=True, attention_bias=True)),
}
LENGTHS = [9, 4, 6]  # left-padded rows of different lengths


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask, cache):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask, cache=cache)


def _ours(model, ids, mask, cache=None):
    """Jitted forward: one compile per shape is far cheaper than op-by-op dispatch of new shapes."""
    out = _forward(*nnx.split(model), jnp.asarray(ids), jnp.asarray(mask), cache)
    return np.asarray(out) if cache is None else (np.asarray(out[0]), out[1])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    family, overrides = VARIANTS[variant]
    folder = make_hf_checkpoint(tmp_path, family, **overrides)
    ids, mask = left_padded_batch(LENGTHS, 96)
    model, tokenizer = load_pretrained(folder)
    real = mask.astype(bool)
    np.testing.assert_allclose(_ours(model, ids, mask)[real], hf_logits(folder, ids, mask)[real], atol=1e-4, rtol=0)
    assert tokenizer is not None and tokenizer.eos_token == "</s>"


def test_cached_decoding_matches_full_forward(tmp_path):
    folder = make_hf_checkpoint(tmp_path, "qwen2")
    model, _ = load_pretrained(folder)
    ids, mask = left_padded_batch([10, 6, 3], 96, seed=1)
    full = _ours(model, ids, mask)
    # Prefill the first 5 columns, then two tokens at once, then one token at a time.
    cache = init_cache(model.config, ids.shape[0], ids.shape[1] + 2)
    pieces = []
    for start, stop in [(0, 5), (5, 7), (7, 8), (8, 9), (9, 10)]:
        logits, cache = _ours(model, ids[:, start:stop], mask[:, start:stop], cache)
        pieces.append(logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[real], full[real], atol=1e-5, rtol=0)
    assert int(cache.index) == 10


@pytest.mark.parametrize("family,overrides", [("llama", dict(attention_bias=True)), ("qwen3", dict(head_dim=24))])
def test_save_round_trip_through_transformers(tmp_path, family, overrides):
    folder = make_hf_checkpoint(tmp_path, family, tie_word_embeddings=False, **overrides)
    model, tokenizer = load_pretrained(folder)
    out = save_pretrained(model, tokenizer, tmp_path / "saved", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the size limit forced several shards
    ids, mask = left_padded_batch(LENGTHS, 96, seed=2)
    real = mask.astype(bool)
    reference = _ours(model, ids, mask)
    np.testing.assert_allclose(hf_logits(out, ids, mask)[real], reference[real], atol=1e-4, rtol=0)
    reloaded, tok2 = load_pretrained(out)
    np.testing.assert_array_equal(_ours(reloaded, ids, mask), reference)
    assert tok2("the answer is 4").input_ids == tokenizer("the answer is 4").input_ids


def test_eight_devices_match_one(tmp_path):
    assert jax.device_count() == 8
    folder = make_hf_checkpoint(tmp_path, "qwen2", num_attention_heads=4, num_key_value_heads=2)
    ids, mask = left_padded_batch([7, 3, 5, 6, 2, 7, 4, 1], 96, seed=3)
    single, _ = load_pretrained(folder)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded, _ = load_pretrained(folder, mesh=mesh)
    q = sharded.layers.attn.q[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)  # [L, E, H, D]
    # No device holds the whole tensor: each shard is a quarter of it.
    assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 2, 16)}
    graphdef, state = nnx.split(sharded)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask)

    put = lambda x: jax.device_put(jnp.asarray(x), batch_sharding(mesh, x.shape))  # noqa: E731
    got = np.asarray(forward(state, put(ids), put(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], _ours(single, ids, mask)[real], atol=1e-5, rtol=0)


def test_token_logprobs_match_transformers_log_softmax(tmp_path):
    folder = make_hf_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True)
    model, _ = load_pretrained(folder)
    ids, mask = left_padded_batch([8, 5], 96, seed=4)
    logp, ent = jax.jit(lambda i, m: token_logprobs(model, i, m, chunk=3))(jnp.asarray(ids), jnp.asarray(mask))
    ref = torch.log_softmax(torch.tensor(hf_logits(folder, ids, mask)), dim=-1).numpy()
    want_logp = np.take_along_axis(ref[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    want_ent = -(np.exp(ref[:, :-1]) * ref[:, :-1]).sum(-1)
    keep = mask[:, 1:].astype(bool) & mask[:, :-1].astype(bool)
    np.testing.assert_allclose(np.asarray(logp)[:, 1:][keep], want_logp[keep], atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent)[:, 1:][keep], want_ent[keep], atol=1e-4)
    assert np.all(np.asarray(logp)[:, 0] == 0) and np.all(np.asarray(logp)[:, 1:][~keep] == 0)


def _prompts_and_responses(vocab: int, k: int, seed: int):
    """3 left-padded prompts, k responses each (random lengths, right-padded), and the concatenated rows."""
    rng = np.random.default_rng(seed)
    prompts, prompt_mask = left_padded_batch([7, 3, 5], vocab, seed=seed)
    n, r = 3 * k, 5
    lengths = rng.integers(1, r + 1, n)
    resp_mask = (np.arange(r)[None] < lengths[:, None]).astype(np.int32)
    resp = np.where(resp_mask > 0, rng.integers(6, vocab, (n, r)), 0).astype(np.int32)
    rows = np.concatenate([np.repeat(prompts, k, 0), resp], 1), np.concatenate([np.repeat(prompt_mask, k, 0), resp_mask], 1)
    return prompts, prompt_mask, resp, resp_mask, rows


@pytest.mark.parametrize("k", [1, 4])
def test_response_logprobs_share_prompts_and_match_transformers(tmp_path, k):
    folder = make_hf_checkpoint(tmp_path, "qwen2")
    model, _ = load_pretrained(folder)
    prompts, prompt_mask, resp, resp_mask, (ids, mask) = _prompts_and_responses(96, k, seed=6)
    logp, ent = jax.jit(lambda *a: response_logprobs(model, *a, chunk=2))(prompts, prompt_mask, resp, resp_mask)
    ref = torch.log_softmax(torch.tensor(hf_logits(folder, ids, mask)), dim=-1).numpy()[:, -6:-1]  # predicts resp
    keep = resp_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logp)[keep], np.take_along_axis(ref, resp[..., None], -1)[..., 0][keep],
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent)[keep], -(np.exp(ref) * ref).sum(-1)[keep], atol=1e-4)
    assert np.all(np.asarray(logp)[~keep] == 0) and np.all(np.asarray(ent)[~keep] == 0)

    # The gradient through the shared prompt equals the gradient of the full rows, computed apart.
    graphdef, state = nnx.split(model)
    shared = lambda s: (response_logprobs(nnx.merge(graphdef, s), prompts, prompt_mask, resp, resp_mask)[0]  # noqa: E731
                        * np.arange(1, 6)).sum()
    full = lambda s: (token_logprobs(nnx.merge(graphdef, s), ids, mask)[0][:, -5:] * np.arange(1, 6)).sum()  # noqa: E731
    g_shared, g_full = jax.jit(jax.grad(shared))(state), jax.jit(jax.grad(full))(state)
    for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_full)):  # sums of many terms: relative to the leaf
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.abs(b).max()), rtol=0)


def test_response_logprobs_rejects_uneven_groups():
    cfg = ModelConfig(family="qwen2", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8)
    ids = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="5 responses cannot be split evenly over 2 prompts"):
        response_logprobs(init_random(cfg), ids, ids, jnp.ones((5, 2), jnp.int32), jnp.ones((5, 2), jnp.int32))


def test_bfloat16_close_to_float32(tmp_path):
    folder = make_hf_checkpoint(tmp_path, "llama")
    ids, mask = left_padded_batch([6, 4], 96, seed=5)
    f32, _ = load_pretrained(folder)
    bf16, _ = load_pretrained(folder, dtype=jnp.bfloat16)
    assert bf16.layers.mlp.up[...].dtype == jnp.bfloat16
    real = mask.astype(bool)
    a, b = _ours(f32, ids, mask)[real], _ours(bf16, ids, mask)[real]
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.8


def test_init_random_split_merge_grad_under_jit():
    cfg = ModelConfig(family="qwen2", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, qkv_bias=True)
    model = init_random(cfg, seed=3)
    ids, mask = left_padded_batch([5, 3], 32)
    graphdef, state = nnx.split(model, nnx.Param)
    assert cfg.num_params == sum(x.size for x in jax.tree.leaves(state))

    @jax.jit
    def loss(state, ids, mask):
        logp, _ = token_logprobs(nnx.merge(graphdef, state), ids, mask, chunk=2)
        return -logp.sum()

    value, grads = jax.value_and_grad(loss)(state, ids, mask)
    # The chunked, checkpointed log-probs reach every parameter (biases start at zero but get gradients).
    assert np.isfinite(float(value)) and float(value) > 0
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------- bad checkpoints
def _rewrite(folder: pathlib.Path, edit) -> None:
    file = folder / "model.safetensors"
    tensors = {k: np.array(v) for k, v in read_safetensors(file).items()}
    edit(tensors)
    write_safetensors(file, tensors)


def test_missing_tensor_names_tensor_and_folder(tmp_path):
    folder = make_hf_checkpoint(tmp_path, "qwen2")
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_pretrained(folder)


def test_shape_mismatch_names_tensor_and_file(tmp_path):
    folder = make_hf_checkpoint(tmp_path, "qwen2")
    _rewrite(folder, lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape \(65,\)"):
        load_pretrained(folder)


def test_unexpected_tensor_and_unsupported_family(tmp_path):
    folder = make_hf_checkpoint(tmp_path, "llama")
    _rewrite(folder, lambda t: t.update({"model.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.extra\.weight"):
        load_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'gpt2' is not supported"):
        load_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(folder)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_family_rows_round_trip_config_json_and_refuse_what_they_cannot_express(family):
    hf = dict(model_type=family, vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=family == "llama")
    cfg = ModelConfig.from_hf(hf)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg.to_hf()["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                                             "qwen3": "Qwen3ForCausalLM"}[family]]
    assert cfg.qkv_bias == (family != "qwen3")  # Qwen2: always; Llama: attention_bias; Qwen3: attention_bias
    assert cfg.spec.qk_norm == (family == "qwen3")
    with pytest.raises(ConfigError, match=f"a {family} config cannot have biases"):
        dataclasses.replace(cfg, qkv_bias=True, o_bias=False, mlp_bias=family == "qwen2").to_hf()
