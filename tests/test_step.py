"""The pure update step: with one update per step, skipping the old-policy pass changes nothing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktae_jax.config import AlgoSection, OptimSection
from ktae_jax.models import ModelConfig, init_random
from ktae_jax.step import TrainState, UpdateBatch, UpdateSettings, make_optimizer, micro_logprobs, train_step


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
    tx = make_optimizer(OptimSection(lr=1e-2))
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
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(p1, jax.tree.leaves(params)))
