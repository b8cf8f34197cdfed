"""The pure update step: skipping the old-policy pass on-policy, sharing prompts within groups, and
the mini/micro-batch layout change nothing but the work done.

Two computations of an update are compared under plain SGD (`_train_helpers.assert_same_updates`):
an SGD update is -lr x gradient, so the comparison is one of gradients; Adam would turn last-bit
differences of near-zero gradients into visible parameter changes."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_helpers import assert_same_updates
from flax import nnx

from ktae_jax.config import AlgoSection, OptimSection
from ktae_jax.models import ModelConfig, init_random
from ktae_jax.step import (Layout, TrainState, UpdateBatch, UpdateSettings, make_optimizer, micro_logprobs,
                           rollout_logprobs, train_step)


@dataclasses.dataclass(frozen=True)
class _RecomputingSettings(UpdateSettings):
    @property
    def on_policy(self) -> bool:  # force the general path: old log-probs from the batch
        return False


def test_on_policy_update_equals_the_recomputed_one():
    config = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=40, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    graphdef, params = nnx.split(init_random(config, seed=1))
    rng = np.random.default_rng(0)
    N, Tp, R = 8, 5, 6
    tokens = jnp.asarray(rng.integers(0, 40, (N, Tp + R)), jnp.int32)
    attn = jnp.ones((N, Tp + R), jnp.int32)
    resp_mask = jnp.asarray(np.arange(R)[None] < rng.integers(1, R + 1, (N, 1)), jnp.int32)
    adv = jnp.asarray(rng.normal(size=(N, R)), jnp.float32) * resp_mask
    old, _ = micro_logprobs(graphdef, params, tokens, attn, response_len=R, rows_per_prompt=1, temperature=1.0)
    batch = UpdateBatch(tokens, attn, resp_mask, adv, old, jnp.zeros_like(old))
    tx = optax.sgd(1e-2)
    algo = AlgoSection(clip_low=0.2, clip_high=0.28)
    results = []
    for settings_cls in (UpdateSettings, _RecomputingSettings):
        settings = settings_cls(algo=algo, num_minibatches=1, num_microbatches=2, temperature=1.0)
        state = TrainState(params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                           step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))
        zeroed = batch._replace(old_logp_NxR=jnp.zeros_like(old)) if settings.on_policy else batch
        new_state, metrics = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, tx=tx, settings=settings))(
            state, zeroed)
        results.append((jax.tree.leaves(new_state.params), metrics))
    assert UpdateSettings(algo=algo, num_minibatches=1, num_microbatches=2, temperature=1.0).on_policy
    (p1, m1), (p2, m2) = results
    assert float(m1["loss/ratio_mean"]) == 1.0 and abs(float(m2["loss/ratio_mean"]) - 1.0) < 1e-5
    np.testing.assert_allclose(float(m1["loss/total"]), float(m2["loss/total"]), rtol=1e-5)
    assert_same_updates([np.asarray(x) for x in jax.tree.leaves(params)], p1, p2)


@pytest.mark.parametrize("minis,micros,devices,group", [(1, 1, 1, 4), (2, 2, 1, 4), (2, 1, 4, 4), (4, 2, 2, 2),
                                                        (2, 8, 1, 4), (3, 2, 2, 2)])
def test_layout_keeps_groups_in_mini_batches_and_device_rows_on_their_device(minis, micros, devices, group):
    n = 48 if minis == 3 else 64
    layout = Layout(minis, micros, group, devices)
    rows = jnp.arange(n)
    split = np.asarray(layout.split(rows))
    assert split.shape == (minis, micros, n // (minis * micros))
    np.testing.assert_array_equal(np.asarray(layout.merge(layout.split(rows))), rows)  # a permutation, undone
    groups = n // group
    for m in range(minis):
        # Mini-batch m: the whole groups g with g mod M = m, whatever the micro-batching and the mesh.
        want = [r for r in range(n) if (r // group) % minis == m]
        assert sorted(split[m].reshape(-1)) == want
        for u in range(micros):
            piece = split[m, u].reshape(devices, -1)  # what each batch device holds of this micro-batch
            for d in range(devices):
                if groups % (minis * devices) == 0:  # whole groups per device and mini-batch: no row moves
                    assert all(r * devices // n == d for r in piece[d])
                k = layout.rows_per_prompt(n)
                assert len(piece[d]) % k == 0
                runs = piece[d].reshape(-1, k) // group  # runs of k rows share a group (a prompt)
                assert np.all(runs == runs[:, :1])


def test_layout_rejects_a_batch_it_cannot_split():
    with pytest.raises(ValueError, match="do not split into 3 mini-batches of whole groups of 4"):
        Layout(3, 1, 4, 1).split(jnp.zeros((16, 2)))


def _grouped_batch(graphdef, params, P=4, G=4, Tp=6, R=5, seed=0):
    rng = np.random.default_rng(seed)
    plen = rng.integers(2, Tp + 1, P)
    pmask = (np.arange(Tp)[None] >= Tp - plen[:, None]).astype(np.int32)
    prompts = np.where(pmask > 0, rng.integers(1, 40, (P, Tp)), 0)
    rmask = (np.arange(R)[None] < rng.integers(1, R + 1, (P * G, 1))).astype(np.int32)
    tokens = jnp.asarray(np.concatenate([np.repeat(prompts, G, 0), rng.integers(1, 40, (P * G, R)) * rmask], 1), jnp.int32)
    attn = jnp.asarray(np.concatenate([np.repeat(pmask, G, 0), rmask], 1), jnp.int32)
    resp_mask = jnp.asarray(rmask)
    adv = jnp.asarray(rng.normal(size=(P * G, R)), jnp.float32) * resp_mask
    old, _ = micro_logprobs(graphdef, params, tokens, attn, response_len=R, rows_per_prompt=1, temperature=1.0)
    ref = old + jnp.asarray(rng.normal(scale=0.1, size=old.shape), jnp.float32) * resp_mask
    return UpdateBatch(tokens, attn, resp_mask, adv, old, ref)


def test_sharing_prompts_in_the_update_changes_nothing_but_the_work():
    config = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=40, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    graphdef, params = nnx.split(init_random(config, seed=2))
    batch = _grouped_batch(graphdef, params)
    tx = optax.sgd(1e-2)
    algo = AlgoSection(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_estimator="low_var_kl", ppo_epochs=2)
    results = []
    # 4 prompts x 4 rows in 2 mini-batches of 2 prompts; 8 micro-batches of 1 row share nothing (the
    # reference), 1 and 4 micro-batches share each prompt over 4 and 2 rows.
    for micros, shared_rows in ((8, 1), (1, 4), (4, 2)):
        settings = UpdateSettings(algo=algo, num_minibatches=2, num_microbatches=micros, temperature=1.0,
                                  group_size=4)
        layout = settings.layout()
        assert layout.rows_per_prompt(16) == shared_rows
        # The log-prob pass, micro-batched and shared, returns every row in its place.
        logp, _ = jax.jit(lambda p, t, a: rollout_logprobs(graphdef, p, t, a, response_len=5, temperature=1.0,
                                                           layout=layout))(params, batch.tokens_NxT, batch.attn_NxT)
        np.testing.assert_allclose(np.asarray(logp), np.asarray(batch.old_logp_NxR), atol=2e-6)
        state = TrainState(params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                           step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))
        new_state, metrics = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, tx=tx, settings=settings))(
            state, batch)
        results.append((jax.tree.leaves(new_state.params), metrics))
    (p0, m0), *others = results
    for p, m in others:
        for key in ("loss/total", "loss/kl", "optim/grad_norm"):
            np.testing.assert_allclose(float(m[key]), float(m0[key]), rtol=1e-5, err_msg=key)
        assert_same_updates([np.asarray(x) for x in jax.tree.leaves(params)], p, p0)


@pytest.mark.parametrize("data, fsdp, tensor", [(8, 1, 1), (2, 4, 1), (1, 8, 1), (1, 4, 2)])
def test_optimizer_state_is_sharded_like_its_parameters(data, fsdp, tensor):
    """Every AdamW moment lives where its parameter lives (FSDP splits the optimizer state too);
    Adam's step count is replicated over the whole mesh. Per device: 2 x the parameters' bytes."""
    from ktae_jax.mesh import MeshConfig, make_mesh, shard_model
    from ktae_jax.step import init_optimizer

    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    cfg = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=False))
    _, params = nnx.split(shard_model(init_random(cfg), mesh))
    tx = make_optimizer(OptimSection(lr=1e-3, grad_clip=1.0, warmup_steps=2))
    opt = init_optimizer(tx, params, mesh)
    flat = jax.tree.leaves(params)
    for moments in (optax.tree_utils.tree_get(opt, "mu"), optax.tree_utils.tree_get(opt, "nu")):
        for moment, param in zip(jax.tree.leaves(moments), flat, strict=True):
            assert moment.sharding.is_equivalent_to(param.sharding, param.ndim), (moment.sharding, param.sharding)
            assert moment.shape == param.shape and moment.dtype == param.dtype
    every_device = set(mesh.devices.flat)
    counts = [x for x in jax.tree.leaves(opt) if x.ndim == 0]
    assert counts and all(c.sharding.is_fully_replicated and c.sharding.device_set == every_device for c in counts)

    def on_device_0(tree):
        device = mesh.devices.flat[0]
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)

    total = sum(x.nbytes for x in flat)
    expected = total if fsdp * tensor == 1 else sum(  # by hand: each weight split over fsdp x tensor
        x.nbytes // math.prod(mesh.shape[a] for axes in x.sharding.spec if axes
                              for a in ((axes,) if isinstance(axes, str) else axes)) for x in flat)
    assert on_device_0(params) == expected
    assert on_device_0(opt) == 2 * expected + 4 * len(counts)
    if fsdp == 8:  # every matrix divides by 8: an eighth of the moments per device, not all of them
        assert on_device_0(opt) < 2 * total / 4
