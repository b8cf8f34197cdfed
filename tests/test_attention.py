"""Memory-efficient attention, remat and the scanned layer stack against the materialised path.

Values and gradients (float32, 1e-5) of the blockwise kernel, the splash kernel (Pallas, run in
interpret mode on CPU) and whole models under every `ModelOptions` choice, with left-padded prompts,
shared prompts and padded responses; the TPU and GPU kernels compiled for their targets.
"""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ktae_jax.mesh import MeshConfig, batch_sharding, make_mesh, state_shardings
from ktae_jax.models import ModelConfig, init_random, response_logprobs, token_logprobs
from ktae_jax.models import attention as attn_lib
from ktae_jax.models.config import ConfigError, ModelOptions
from ktae_jax.models.kv_cache import LayerBlocks
from ktae_jax.models.transformer import LayerList, stack_layers, unstack_layers
from ktae_jax.sample import decode_params

TOL = dict(atol=1e-5, rtol=1e-5)


def _qkv(b, kv, g, t, s, d, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(ks[0], (b, kv, g, t, d)), jax.random.normal(ks[1], (b, kv, s, d)),
            jax.random.normal(ks[2], (b, kv, s, d)), jax.random.normal(ks[3], (b, kv, g, t, d)))


def _case(kind):
    """(q, k, v, cotangent weights, mask, real query rows [B, T]) for a prefill or a cached pass."""
    b, kv, g, d = 3, 2, 2, 8
    if kind == "prefill":  # left-padded rows, queries = keys (rows 1 and 2 start with padding)
        t = s = 9
        first = np.int32(0)
    else:  # 7 new tokens after 5 cached slots (left-padded prompt), one response row padded at its end
        t, s = 7, 12
        first = np.int32(5)
    q, k, v, w = _qkv(b, kv, g, t, s, d)
    key_mask = np.arange(s)[None] >= np.array([0, 3, 4])[:, None]
    if kind == "cached":
        key_mask[2, 9:] = False  # padding after the end of row 2's response
    mask = attn_lib.Mask(jnp.asarray(key_mask), first)
    real = key_mask[:, int(first):int(first) + t]
    return q, k, v, w, mask, real


def _value_and_grads(fn, q, k, v, w):
    """(fn's value, the gradients of sum(fn * w) with respect to q, k, v), jitted."""
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
    return jax.jit(fn)(q, k, v), grads


@pytest.mark.parametrize("kind,block", [("prefill", 4), ("cached", 5), ("cached", 64)])  # S % block: 1, 2, S < block
def test_blockwise_equals_materialised_values_and_gradients(kind, block):
    q, k, v, w, mask, _ = _case(kind)
    t = q.shape[3]
    ref = _value_and_grads(lambda *a: attn_lib.materialised(*a, mask.allowed(t)), q, k, v, w)
    query_slot = jnp.arange(t) + mask.first_slot
    got = _value_and_grads(lambda *a: attn_lib.blockwise(*a, mask.key_mask, query_slot, block), q, k, v, w)
    # Every row, fully masked (padding) ones included: they see the same uniform softmax.
    np.testing.assert_allclose(got[0], ref[0], **TOL)
    for g_got, g_ref in zip(got[1], ref[1]):
        np.testing.assert_allclose(g_got, g_ref, **TOL)


@pytest.mark.parametrize("kind", ["prefill", "cached"])
def test_splash_kernel_interpreted_equals_materialised_on_real_rows(kind):
    from ktae_jax.models.pallas_tpu import splash

    q, k, v, w, mask, real = _case(kind)
    w = w * jnp.asarray(real)[:, None, None, :, None]  # padding queries' outputs are never read
    t = q.shape[3]
    ref = _value_and_grads(lambda *a: attn_lib.materialised(*a, mask.allowed(t)), q, k, v, w)
    got = _value_and_grads(lambda *a: splash(*a, mask, interpret=True), q, k, v, w)
    np.testing.assert_allclose(np.asarray(got[0]).transpose(0, 3, 1, 2, 4)[real],
                               np.asarray(ref[0]).transpose(0, 3, 1, 2, 4)[real], **TOL)
    for g_got, g_ref in zip(got[1], ref[1]):
        np.testing.assert_allclose(g_got, g_ref, **TOL)


CONFIG = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=50, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))


def _batch(seed=0):
    """2 left-padded prompts x 3 responses each (some padded at the end), and the same as full rows."""
    rng = np.random.default_rng(seed)
    tp, r = 6, 5
    prompt_ids = rng.integers(2, 50, (2, tp)).astype(np.int32)
    prompt_mask = (np.arange(tp)[None] >= np.array([0, 2])[:, None]).astype(np.int32)
    resp_ids = rng.integers(2, 50, (6, r)).astype(np.int32)
    resp_mask = (np.arange(r)[None] < np.array([5, 3, 1, 5, 4, 2])[:, None]).astype(np.int32)
    return prompt_ids, prompt_mask, resp_ids, resp_mask


def _logprob_loss(graphdef, shared: bool):
    p_ids, p_mask, r_ids, r_mask = _batch()
    weights = jnp.asarray(np.random.default_rng(1).normal(size=r_ids.shape), jnp.float32)

    def loss(state):
        model = nnx.merge(graphdef, state)
        if shared:
            logp, ent = response_logprobs(model, p_ids, p_mask, r_ids, r_mask)
        else:  # one full row per response: the prompt repeated
            rep = lambda x: np.repeat(x, 3, axis=0)  # noqa: E731
            ids, mask = np.concatenate([rep(p_ids), r_ids], 1), np.concatenate([rep(p_mask), r_mask], 1)
            logp, ent = (x[:, p_ids.shape[1]:] for x in token_logprobs(model, ids, mask))
        return jnp.sum(logp * weights) + 0.1 * jnp.sum(ent), (logp, ent)

    return loss


@functools.lru_cache(maxsize=None)  # the references (attention="xla") are shared by the tests below
def _run(options: ModelOptions, shared: bool):
    """(log-probs, entropies, gradients) of the model with `options` (same weights for every options)."""
    graphdef, state = nnx.split(init_random(CONFIG, seed=4, options=options))
    (_, (logp, ent)), grads = jax.jit(jax.value_and_grad(_logprob_loss(graphdef, shared), has_aux=True))(state)
    return logp, ent, grads


@pytest.mark.parametrize("options,shared", [
    (ModelOptions(attention="blockwise", attention_block=4), True),
    (ModelOptions(attention="blockwise", attention_block=4), False),
    (ModelOptions(attention="blockwise", attention_block=3, remat="full"), True),
    (ModelOptions(attention="xla", remat="dots", scan_layers=False), True),
], ids=["blockwise-shared-prompts", "blockwise-full-rows", "blockwise-remat-full", "xla-remat-dots-unrolled"])
def test_model_values_and_gradients_equal_the_materialised_path(options, shared):
    logp_ref, ent_ref, grads_ref = _run(ModelOptions(attention="xla"), shared)
    logp, ent, grads = _run(options, shared)
    np.testing.assert_allclose(logp, logp_ref, **TOL)
    np.testing.assert_allclose(ent, ent_ref, **TOL)
    assert np.count_nonzero(np.asarray(logp)) > 10  # real tokens, not all padding
    for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_layer_lists_give_the_stacked_weights_values(scan):
    """The frozen reference's layout (`unstack_layers`: each layer's weights as separate arrays) computes
    what the stacked weights do, through the unrolled stack and (stacked again) the scan."""
    graphdef, state = nnx.split(init_random(CONFIG, seed=4, options=ModelOptions(attention="xla", scan_layers=scan)))
    unstacked = unstack_layers(state)
    lists = [x for x in jax.tree.leaves(unstacked, is_leaf=lambda x: isinstance(x, LayerList)) if isinstance(x, LayerList)]
    assert len(lists) == len(jax.tree.leaves(state["layers"]))  # every stacked weight, nothing else
    assert all(len(x.arrays) == CONFIG.num_layers for x in lists)
    pointers = lambda tree: {x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)}  # noqa: E731
    assert not pointers(unstacked) & pointers(state)  # a copy: the policy's update may donate its buffers
    restacked = stack_layers(unstacked)  # checkpoints' and the sampler's layout (decode_params)
    assert jax.tree.structure(restacked) == jax.tree.structure(state)
    for x, y in zip(jax.tree.leaves(restacked), jax.tree.leaves(state)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(decode_params(unstacked, None, jnp.float32)), jax.tree.leaves(state)):
        np.testing.assert_array_equal(x, y)
    loss = jax.jit(_logprob_loss(graphdef, shared=True))
    (_, (logp, ent)), (_, (logp_split, ent_split)) = loss(state), loss(unstacked)
    assert np.count_nonzero(np.asarray(logp)) > 10
    np.testing.assert_allclose(logp_split, logp, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ent_split, ent, rtol=1e-6, atol=1e-6)


def _engine_decode_case(groups, window, seed=0):
    """The engine's decode step in its buffer: 2 layers, blocks of 6 and 13 slots, a view of 17 slots
    and 3 of each group's 4 slots; rows whose new token sits in either block (or at the second's
    first slot), left padding in the prompt slots."""
    lay, wg_all, kv, g, d, sizes, view = 2, 4, 2, 3, 8, (6, 13), 17
    rng = np.random.default_rng(seed)
    blocks = lambda: tuple(jnp.asarray(rng.standard_normal((lay, groups, wg_all, kv, s, d)), jnp.float32)  # noqa: E731
                           for s in sizes)
    kb, vb = blocks(), blocks()
    b = groups * 3
    index = np.array([4, 6, 16, 7, 11, 5][:b], np.int32)  # the new token's slot per row
    key_mask = np.arange(view)[None] >= rng.integers(0, 3, b)[:, None]  # left padding
    q = jnp.asarray(rng.standard_normal((b, kv, g, 1, d)), jnp.float32)
    k_new, v_new = (jnp.asarray(rng.standard_normal((b, kv, 1, d)), jnp.float32) for _ in range(2))
    mask = attn_lib.Mask(jnp.asarray(key_mask), jnp.asarray(index), window=window)
    return q, k_new, v_new, LayerBlocks(kb, vb, jnp.int32(1)), mask


def _engine_decode_reference(q, k_new, v_new, cache, mask, softcap):
    """Row by row in NumPy: a softmax over the row's real keys in slots before its own (within the
    window) and its own new key."""
    k_all, v_all = (np.concatenate([np.asarray(x) for x in blocks], axis=4)[1] for blocks in (cache.k, cache.v))
    wg = q.shape[0] // k_all.shape[0]
    out = np.zeros(q.shape, np.float64)
    for r in range(q.shape[0]):
        idx = int(mask.first_slot[r])
        seen = [s for s in range(idx) if mask.key_mask[r, s] and (mask.window is None or s > idx - mask.window)]
        keys = np.concatenate([k_all[r // wg, r % wg][:, seen], np.asarray(k_new[r])], axis=1)  # [KV, n, D]
        values = np.concatenate([v_all[r // wg, r % wg][:, seen], np.asarray(v_new[r])], axis=1)
        scores = np.einsum("kgd,knd->kgn", np.asarray(q[r, :, :, 0], np.float64), keys) / np.sqrt(q.shape[-1])
        if softcap is not None:
            scores = softcap * np.tanh(scores / softcap)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[r, :, :, 0] = np.einsum("kgn,knd->kgd", p / p.sum(-1, keepdims=True), values)
    return out


@pytest.mark.parametrize("groups,window,softcap", [(1, None, None), (2, None, None), (1, 5, None), (2, None, 3.0)])
@pytest.mark.parametrize("ragged,block", [(False, 128), (True, 4), (True, 128)])  # pieces of 4: 11 % 4 = 3
def test_engine_decode_attention_reads_each_rows_own_keys(groups, window, softcap, ragged, block):
    q, k_new, v_new, cache, mask = _engine_decode_case(groups, window)
    want = _engine_decode_reference(q, k_new, v_new, cache, mask, softcap)
    fn = functools.partial(attn_lib.engine_decode_attention, ragged=ragged, block=block, softcap=softcap)
    got = jax.jit(fn)(q, k_new, v_new, cache, mask)
    np.testing.assert_allclose(got, want, **TOL)


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="model.attention='flash'"):
        ModelOptions(attention="flash")
    with pytest.raises(ConfigError, match="model.remat='some'"):
        ModelOptions(remat="some")
    with pytest.raises(ConfigError, match="model.decode_attention='paged'"):
        ModelOptions(decode_attention="paged")
    assert ModelOptions(platform="cpu").ragged_decode() and not ModelOptions(platform="gpu").ragged_decode()
    assert not ModelOptions(decode_attention="dense", platform="cpu").ragged_decode()
    with pytest.raises(ValueError, match="cudnn needs bfloat16"):
        attn_lib.resolve("cudnn", "gpu", dtype=jnp.float32)
    assert attn_lib.resolve("auto", "tpu") == "pallas"
    assert attn_lib.resolve("auto", "cpu", 64, 64) == "xla"
    assert attn_lib.resolve("auto", "cpu", 4096, 4096) == "blockwise"
    assert attn_lib.resolve("auto", "gpu", dtype=jnp.float32) == "blockwise"


def _compile_grad(mesh, attention):
    """The gradient of the shared-prompt log-prob pass (prefill + responses), compiled for `mesh`."""
    cfg = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=64, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64))
    options = ModelOptions(attention=attention, platform=mesh.devices.flat[0].platform, remat="full", mesh=mesh)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_random(cfg, dtype=jnp.bfloat16, options=options)))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                            state_shardings(state, mesh))
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, shape))  # noqa: E731

    def loss(state, p_ids, p_mask, r_ids, r_mask):
        return response_logprobs(nnx.merge(graphdef, state), p_ids, p_mask, r_ids, r_mask)[0].sum()

    lowered = jax.jit(jax.grad(loss)).lower(abstract, ints(2, 40), ints(2, 40), ints(4, 24), ints(4, 24))
    calls = set(re.findall(r"custom_call @([A-Za-z_0-9$]+)", lowered.as_text()))
    compiled = lowered.compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    return calls


def test_splash_kernel_compiles_for_a_tpu_topology():
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another test process may hold libtpu
    topology = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    # Rows split in two and kv heads in two: the kernel runs under shard_map on each device's part.
    calls = _compile_grad(make_mesh(MeshConfig(data=2, tensor=2), topology.devices), "auto")
    assert "tpu_custom_call" in calls, calls  # the Pallas kernel, forward and backward


def test_cudnn_attention_compiles_for_an_h100_target(shared_dir, monkeypatch):
    from jax._src.cudnn import fused_attention_stablehlo
    from jax.experimental import topologies

    # This machine has the CUDA plugin but no cuDNN library; the lowering only asks its version.
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    attn_lib.cudnn_version.cache_clear()
    monkeypatch.setattr(attn_lib, "cudnn_version", lambda: 91000)
    target = (shared_dir / "aot" / "h100_sxm.txtpb").read_text()
    topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=target)
    calls = _compile_grad(make_mesh(MeshConfig(data=1), topology.devices), "auto")
    assert any(c.startswith("__cudnn$fmha") for c in calls), calls
