"""Rollout-level estimators and their composition with KTAE; the sharded run equals the unsharded one."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from ktae_reference import naive_ktae_advantages

from ktae_jax.advantages import rollout_advantages, token_advantages
from ktae_jax.ktae import KTAEConfig, ktae_advantages


def _batch(seed, n_groups=8, G=4, L=10, V=13):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(n_groups * G, L)).astype(np.int32)
    mask = (np.arange(L)[None] < rng.integers(0, L + 1, size=(n_groups * G, 1))).astype(np.int8)
    rewards = rng.choice([0.0, 1.0, 0.5, -1.0], size=n_groups * G)
    return tokens, mask, rewards


def test_estimators_against_hand_computation():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])  # two groups of four
    g1, g2 = rewards[:4], rewards[4:]
    grpo = np.concatenate([(g - g.mean()) / (g.std(ddof=1) + 1e-6) for g in (g1, g2)])
    np.testing.assert_allclose(rollout_advantages(rewards, group_size=4, estimator="grpo"), grpo, atol=1e-6)
    # Dr.GRPO: centred, not scaled. Group 1: mean 1/2 -> +-1/2; group 2: mean 3/4.
    np.testing.assert_allclose(rollout_advantages(rewards, group_size=4, estimator="drgrpo"),
                               [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25], atol=1e-7)
    # RLOO: r_i minus the mean of the other three.
    rloo = [r - (g.sum() - r) / 3 for g in (g1, g2) for r in g]
    np.testing.assert_allclose(rollout_advantages(rewards, group_size=4, estimator="rloo"), rloo, atol=1e-6)
    for estimator in ("grpo", "drgrpo", "rloo"):
        assert np.all(np.asarray(rollout_advantages(rewards, group_size=1, estimator=estimator)) == 0)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        rollout_advantages(rewards, group_size=4, estimator="ppo")


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_token_advantages_compose_rollout_and_key_scores(estimator):
    tokens, mask, rewards = _batch(1)
    config = KTAEConfig(ignore_token_ids=(0,))
    plain = np.asarray(token_advantages(tokens, mask, rewards, group_size=4, vocab_size=13, estimator=estimator))
    rollout = np.asarray(rollout_advantages(rewards, group_size=4, estimator=estimator))
    np.testing.assert_allclose(plain, np.where(mask > 0, rollout[:, None], 0), atol=1e-7)
    with_ktae = np.asarray(token_advantages(tokens, mask, rewards, group_size=4, vocab_size=13, estimator=estimator,
                                            ktae=config))
    # The key score is estimator-independent: reference KTAE minus its GRPO part.
    grpo = naive_ktae_advantages(tokens, mask, rewards, group_size=4, ignore_ids=(0,))
    grpo_rollout = np.asarray(rollout_advantages(rewards, group_size=4, estimator="grpo"))
    key = np.where(mask > 0, grpo - grpo_rollout[:, None], 0)
    np.testing.assert_allclose(with_ktae, np.where(mask > 0, rollout[:, None] + key, 0), atol=1e-5)
    if estimator == "grpo":
        np.testing.assert_allclose(with_ktae, np.asarray(ktae_advantages(tokens, mask, rewards, group_size=4,
                                                                         vocab_size=13, config=config)), atol=1e-7)


def test_sharded_over_8_devices_equals_unsharded():
    assert jax.device_count() == 8, "conftest should simulate 8 CPU devices"
    tokens, mask, rewards = _batch(2, n_groups=16, G=4)
    config = KTAEConfig(ignore_token_ids=(0,))
    expected = np.asarray(token_advantages(tokens, mask, rewards, group_size=4, vocab_size=13, ktae=config))
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    args = [jax.device_put(x, sharding) for x in (tokens, mask, rewards)]
    got = token_advantages(*args, group_size=4, vocab_size=13, ktae=config, mesh=mesh)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)
    # A group is never split: 16 rollouts over 8 devices would put half a group of 4 on each.
    small = [x[:16] for x in (tokens, mask, rewards)]
    with pytest.raises(ValueError, match="whole groups"):
        token_advantages(*small, group_size=4, vocab_size=13, ktae=config, mesh=mesh)
