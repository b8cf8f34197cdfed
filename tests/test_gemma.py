"""Gemma 3 text (`gemma3_text`) against transformers' Gemma3ForCausalLM: logits through every attention
path past the sliding window, log-probs, greedy decoding, save round trip, 8-device load; the
windowed / soft-capped attention kernels against a float64 oracle; config errors."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from _model_helpers import hf_logits, left_padded_batch, make_hf_checkpoint
from ktae_jax import aot
from ktae_jax.config import load_config
from ktae_jax.mesh import MeshConfig, batch_sharding, make_mesh
from ktae_jax.models import (ConfigError, ModelConfig, init_random, load_pretrained, response_logprobs,
                             save_pretrained)
from ktae_jax.models import attention as attn_lib
from ktae_jax.models.config import ModelOptions
from ktae_jax.models.transformer import RMSNorm
from ktae_jax.sample import SamplingConfig, sample

S, F = "sliding_attention", "full_attention"
# Window 4 (rows up to 12 tokens), layers sliding/sliding/full/sliding, a local rope base unlike the
# global one (which is linearly scaled), and a query scale unlike head_dim's.
GEMMA = dict(num_hidden_layers=4, head_dim=16, sliding_window=4, layer_types=[S, S, F, S], query_pre_attn_scalar=24,
             rope_theta=10000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
LENGTHS = [9, 4, 6]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("gemma"), "gemma3_text", tie_word_embeddings=False, **GEMMA)


def _logits(model, ids, mask):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m))
    return np.asarray(fn(state, jnp.asarray(ids), jnp.asarray(mask)))


def test_logits_match_transformers_in_every_attention_path(gemma_dir):
    ids, mask = left_padded_batch(LENGTHS, 96)
    real = mask.astype(bool)
    want = hf_logits(gemma_dir, ids, mask)
    for options in (ModelOptions(attention="xla"), ModelOptions(attention="blockwise", attention_block=3),
                    ModelOptions(attention="blockwise", attention_block=5, scan_layers=False, remat="full")):
        model, _ = load_pretrained(gemma_dir, options=options)
        np.testing.assert_allclose(_logits(model, ids, mask)[real], want[real], atol=1e-4, rtol=0, err_msg=str(options))


def test_tied_final_softcapped_logits_match_transformers(tmp_path):
    folder = make_hf_checkpoint(tmp_path, "gemma3_text", tie_word_embeddings=True, final_logit_softcapping=2.0, **GEMMA)
    model, _ = load_pretrained(folder)
    assert model.lm_head is None and model.config.final_logit_softcapping == 2.0
    ids, mask = left_padded_batch(LENGTHS, 96, seed=1)
    real = mask.astype(bool)
    got, want = _logits(model, ids, mask)[real], hf_logits(folder, ids, mask)[real]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(got).max() < 2.0 and np.abs(want).max() > 1.5  # the cap binds


def test_response_logprobs_match_transformers(gemma_dir):
    """The training forward: prompts prefilled once, k responses each through the cache, past the window."""
    model, _ = load_pretrained(gemma_dir)
    rng = np.random.default_rng(2)
    prompts, prompt_mask = left_padded_batch([7, 3, 5], 96, seed=2)
    k, r = 2, 6
    resp_mask = (np.arange(r)[None] < rng.integers(1, r + 1, 3 * k)[:, None]).astype(np.int32)
    resp = np.where(resp_mask > 0, rng.integers(6, 96, (3 * k, r)), 0).astype(np.int32)
    logp, ent = jax.jit(lambda *a: response_logprobs(model, *a, chunk=4))(prompts, prompt_mask, resp, resp_mask)
    ids = np.concatenate([np.repeat(prompts, k, 0), resp], 1)
    mask = np.concatenate([np.repeat(prompt_mask, k, 0), resp_mask], 1)
    ref = torch.log_softmax(torch.tensor(hf_logits(gemma_dir, ids, mask)), dim=-1).numpy()[:, -r - 1:-1]
    keep = resp_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logp)[keep], np.take_along_axis(ref, resp[..., None], -1)[..., 0][keep],
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent)[keep], -(np.exp(ref) * ref).sum(-1)[keep], atol=1e-4)


def test_greedy_decoding_matches_transformers_generate_past_the_window(gemma_dir):
    """3 decode slots for 8 rows (continuous batching), 10 new tokens after prompts of 1-8 tokens: the
    sliding layers' decode steps must leave out the cache slots before their window."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_pretrained(gemma_dir)
    ids, mask = left_padded_batch([8, 3, 6, 1], 96, seed=7)
    eos, r = tokenizer.eos_token_id, 10
    got = sample(model, ids, mask, jax.random.key(0),
                 SamplingConfig(r, greedy=True, eos_ids=(eos,), pad_id=0, num_samples=2, slots=3))
    tokens = np.asarray(got.tokens)
    hf = AutoModelForCausalLM.from_pretrained(str(gemma_dir), dtype=torch.float32).eval()
    want = hf.generate(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(), do_sample=False,
                       max_new_tokens=r, eos_token_id=[eos], pad_token_id=0)[:, ids.shape[1]:].numpy()
    for copy in (0, 1):
        np.testing.assert_array_equal(tokens[copy::2, :want.shape[1]], want)
        assert np.all(tokens[copy::2, want.shape[1]:] == 0)
    assert want.shape[1] > 4  # decoding went past the window


def test_save_round_trip_through_transformers(gemma_dir, tmp_path):
    model, tokenizer = load_pretrained(gemma_dir)
    out = save_pretrained(model, tokenizer, tmp_path / "saved", max_shard_bytes=40_000)
    saved = json.loads((out / "config.json").read_text())
    assert saved["layer_types"] == GEMMA["layer_types"] and saved["hidden_activation"] == "gelu_pytorch_tanh"
    assert ModelConfig.from_hf(saved) == model.config
    ids, mask = left_padded_batch(LENGTHS, 96, seed=3)
    real = mask.astype(bool)
    reference = _logits(model, ids, mask)
    np.testing.assert_allclose(hf_logits(out, ids, mask)[real], reference[real], atol=1e-4, rtol=0)
    reloaded, _ = load_pretrained(out)
    np.testing.assert_array_equal(_logits(reloaded, ids, mask), reference)


def test_eight_devices_match_one(gemma_dir):
    assert jax.device_count() == 8
    ids, mask = left_padded_batch([7, 3, 5, 6, 2, 7, 4, 1], 96, seed=4)
    single, _ = load_pretrained(gemma_dir)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded, _ = load_pretrained(gemma_dir, mesh=mesh)
    assert sharded.layers.attn_out_norm.weight[...].shape == (4, 64)
    graphdef, state = nnx.split(sharded)
    put = lambda x: jax.device_put(jnp.asarray(x), batch_sharding(mesh, x.shape))  # noqa: E731
    got = np.asarray(jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m))(state, put(ids), put(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], _logits(single, ids, mask)[real], atol=1e-5, rtol=0)


def _oracle(q, k, v, key_mask, first, window, scale, cap):
    """float64 NumPy attention, loops over rows and queries."""
    b, kv, g, t, d = q.shape
    out = np.zeros(q.shape)
    for row in range(b):
        for i in range(t):
            seen = [s for s in range(k.shape[2])
                    if key_mask[row, s] and s <= first + i and (window is None or s > first + i - window)]
            if not seen:  # a padding query: its output is never read
                continue
            scores = np.einsum("kgd,ksd->kgs", q[row, :, :, i], k[row][:, seen]) * scale
            scores = cap * np.tanh(scores / cap) if cap else scores
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[row, :, :, i] = np.einsum("kgs,ksd->kgd", p / p.sum(-1, keepdims=True), v[row][:, seen])
    return out


@pytest.mark.parametrize("window,cap", [(3, None), (5, 1.5), (None, 1.5)])
def test_windowed_softcapped_attention_kernels(window, cap):
    """xla and blockwise (forward and its hand-written backward) with a window and soft-capping, queries
    after a cache offset (first slot 2), left padding: against the float64 oracle and autodiff; the
    cuDNN path's call (run by XLA here) without soft-capping."""
    rng = np.random.default_rng(5)
    b, kv, g, t, s, d, first, scale = 2, 2, 2, 7, 9, 8, 2, 0.3
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in
               ((b, kv, g, t, d), (b, kv, s, d), (b, kv, s, d)))
    key_mask = np.ones((b, s), bool)
    key_mask[1, :4] = False
    mask = attn_lib.Mask(jnp.asarray(key_mask), first, window=None if window is None else jnp.int32(window))
    want = _oracle(q, k, v, key_mask, first, window, scale, cap)
    live = np.arange(t)[None, :] + first >= np.array([0, 4])[:, None]  # queries with a real key in view
    query_slot = jnp.arange(t, dtype=jnp.int32) + first
    xla = lambda q, k, v: attn_lib.materialised(q, k, v, mask.allowed(t), scale, cap)  # noqa: E731
    flash = lambda q, k, v: attn_lib.blockwise(q, k, v, mask.key_mask, query_slot, 4, mask.window, scale, cap)  # noqa: E731
    # The cuDNN path's call (its mask and scale), run by XLA: no soft-capping there.
    same_call = lambda q, k, v: attn_lib._cudnn(q, k, v, mask, scale, implementation="xla")  # noqa: E731
    for fn in (xla, flash) + ((same_call,) if cap is None else ()):
        np.testing.assert_allclose(np.asarray(fn(q, k, v)).transpose(0, 3, 1, 2, 4)[live],
                                   want.transpose(0, 3, 1, 2, 4)[live], atol=1e-5)
    w = jnp.asarray(rng.standard_normal(q.shape) * live[:, None, None, :, None], jnp.float32)
    grads = [jax.jit(jax.grad(lambda *a, f=f: (f(*a) * w).sum(), argnums=(0, 1, 2)))(q, k, v) for f in (xla, flash)]
    for a, b_ in zip(*grads):
        np.testing.assert_allclose(np.asarray(b_), np.asarray(a), atol=1e-5)


def test_config_reading_and_refusals():
    base = dict(model_type="gemma3_text", vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=7,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    cfg = ModelConfig.from_hf(base)  # Gemma3TextConfig's defaults: every 6th layer full, window 4096, ...
    assert cfg.layer_types == (S,) * 5 + (F, S) and cfg.sliding_window == 4096 and cfg.tie_word_embeddings
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.query_pre_attn_scalar) == (1e6, 1e4, 256)
    assert cfg.hidden_act == "gelu_pytorch_tanh" and ModelConfig.from_hf(cfg.to_hf()) == cfg
    tiny = nnx.eval_shape(lambda: init_random(cfg))  # shapes only (eager random init compiles per shape)
    _, params = nnx.split(tiny, nnx.Param)
    assert cfg.num_params == sum(x.size for x in jax.tree.leaves(params))
    norm = RMSNorm(4, 1e-6, param_dtype=jnp.float32, offset=True)  # (1 + w) norms start at w = 0
    assert float(jnp.abs(norm.weight[...]).max()) == 0 and np.allclose(norm(jnp.ones((1, 4))), 1.0, atol=1e-5)
    nested = ModelConfig.from_hf({**base, "rope_parameters": {
        F: {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5}, S: {"rope_type": "default", "rope_theta": 50.0}}})
    assert (nested.rope_theta, nested.rope_scaling, nested.rope_local_theta) == (5e5, (("factor", 8.0), ("rope_type", "linear")), 50.0)
    with pytest.raises(ConfigError, match="model_type 'gemma3' .multimodal"):
        ModelConfig.from_hf({**base, "model_type": "gemma3"})
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        ModelConfig.from_hf({**base, "use_bidirectional_attention": True})
    with pytest.raises(ConfigError, match="attn_logit_softcapping=50.0: not supported for gemma3_text"):
        ModelConfig.from_hf({**base, "attn_logit_softcapping": 50.0})
    with pytest.raises(ConfigError, match="layer_types: 'chunked_attention' is not supported"):
        ModelConfig.from_hf({**base, "layer_types": [S] * 6 + ["chunked_attention"]})
    with pytest.raises(ConfigError, match="rope_parameters.sliding_attention rope_type 'linear'"):
        ModelConfig.from_hf({**base, "rope_parameters": {F: {"rope_type": "default"}, S: {"rope_type": "linear"}}})
    # The splash kernel's mask is static: an explicit pallas refuses windows, `auto` picks blockwise on TPU.
    with pytest.raises(ValueError, match="pallas supports neither sliding-window layers"):
        attn_lib.resolve("pallas", "tpu", windowed=True)
    assert attn_lib.resolve("auto", "tpu", 4096, 4096, windowed=True) == "blockwise"
    assert attn_lib.resolve("auto", "tpu", 4096, 4096) == "pallas"
    train_cfg = load_config([pathlib.Path(__file__).resolve().parents[1] / "configs/tiny.yaml"], [])
    assert aot.model_summary(train_cfg, "tpu", cfg).startswith("attention blockwise (auto)")  # --compile-only's report
    assert aot.model_summary(train_cfg, "tpu").startswith("attention pallas (auto)")
