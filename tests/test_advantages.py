"""Rollout-level estimators and their composition with KTAE; the sharded run equals the unsharded one.

References: hand computation, and a float64 NumPy oracle with verl's semantics (mean, unbiased std,
(r - mean) / (std + eps); RLOO as r G / (G - 1) - mean G / (G - 1)) except for groups of one, which
get no baseline (0) here.
"""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from ktae_reference import naive_group_scores, naive_ktae_advantages

from ktae_jax.advantages import ESTIMATORS, rollout_advantages, token_advantages
from ktae_jax.ktae import KTAEConfig, ktae_advantages
from ktae_jax.rewards import RewardConfig, reward_parts


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
    plain = np.asarray(token_advantages(tokens, mask, rewards, group_size=4, vocab_size=13, estimator=estimator).advantages)
    rollout = np.asarray(rollout_advantages(rewards, group_size=4, estimator=estimator))
    np.testing.assert_allclose(plain, np.where(mask > 0, rollout[:, None], 0), atol=1e-7)
    out = token_advantages(tokens, mask, rewards, group_size=4, vocab_size=13, estimator=estimator, ktae=config)
    with_ktae = np.asarray(out.advantages)
    # The key score is estimator-independent: reference KTAE minus its GRPO part.
    grpo = naive_ktae_advantages(tokens, mask, rewards, group_size=4, ignore_ids=(0,))
    grpo_rollout = np.asarray(rollout_advantages(rewards, group_size=4, estimator="grpo"))
    key = np.where(mask > 0, grpo - grpo_rollout[:, None], 0)
    np.testing.assert_allclose(with_ktae, np.where(mask > 0, rollout[:, None] + key, 0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.key_scores), key, atol=1e-5)  # the KTAE part, returned as such
    if estimator == "grpo":
        np.testing.assert_allclose(with_ktae, np.asarray(ktae_advantages(tokens, mask, rewards, group_size=4,
                                                                         vocab_size=13, config=config)), atol=1e-7)


def test_sharded_over_8_devices_equals_unsharded():
    assert jax.device_count() == 8, "conftest should simulate 8 CPU devices"
    tokens, mask, rewards = _batch(2, n_groups=16, G=4)
    config = KTAEConfig(ignore_token_ids=(0,))
    correct = (np.arange(len(rewards)) % 3 == 0).astype(np.float32)  # verdicts unrelated to the rewards
    expected = token_advantages(tokens, mask, rewards, correct, group_size=4, vocab_size=13, ktae=config)
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    args = [jax.device_put(x, sharding) for x in (tokens, mask, rewards, correct)]
    got = token_advantages(*args, group_size=4, vocab_size=13, ktae=config, mesh=mesh)
    assert len(got.advantages.sharding.device_set) == 8
    for x, y in zip(got, expected):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    # A group is never split: 16 rollouts over 8 devices would put half a group of 4 on each.
    small = [x[:16] for x in (tokens, mask, rewards)]
    with pytest.raises(ValueError, match="whole groups"):
        token_advantages(*small, group_size=4, vocab_size=13, ktae=config, mesh=mesh)


# ---------------------------------------------------------------------------------------------
# Uniform and near-uniform groups (issue 13.1): exactly 0, and a float64 oracle elsewhere.
# ---------------------------------------------------------------------------------------------


def oracle(rewards, group_size, estimator, eps=1e-6):
    """float64, verl's formulas, on the float32 rewards the trainer actually holds."""
    r = np.asarray(rewards, np.float32).astype(np.float64).reshape(-1, group_size)
    if group_size == 1:
        return np.zeros(r.size)
    G, mean = group_size, r.mean(1, keepdims=True)
    if estimator == "grpo":
        return ((r - mean) / (r.std(1, ddof=1, keepdims=True) + eps)).reshape(-1)
    if estimator == "drgrpo":
        return (r - mean).reshape(-1)
    return (r * G / (G - 1) - mean * G / (G - 1)).reshape(-1)


def _jitted(estimator, G):
    return jax.jit(functools.partial(rollout_advantages, group_size=G, estimator=estimator))


UNIFORM_VALUES = [-1.3, 0.7, 1.0, 0.0, -0.1, 0.3, 1 / 3, 2.5e-8, -7.7e5, 1e30]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("G", [2, 3, 5, 7, 16, 64])
def test_uniform_groups_get_exactly_zero(estimator, G):
    rewards = np.repeat(np.asarray(UNIFORM_VALUES, np.float32), G)
    for fn in (_jitted(estimator, G), functools.partial(rollout_advantages, group_size=G, estimator=estimator)):
        assert np.all(np.asarray(fn(rewards)) == 0.0), (estimator, G)
    # Beside mixed groups in one batch.
    mixed = np.concatenate([rewards, np.tile(np.linspace(-1, 1, G, dtype=np.float32), 2)])
    got = np.asarray(_jitted(estimator, G)(mixed))
    n = len(UNIFORM_VALUES) * G
    assert np.all(got[:n] == 0.0)
    # The mixed groups keep their advantages (for odd G the middle reward is the mean: 0 up to rounding).
    np.testing.assert_allclose(got[n:], oracle(mixed[n:], G, estimator), rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(np.abs(got[n:]) > 1e-3) == 2 * (G - G % 2)


@pytest.mark.parametrize("G", [3, 16])
def test_uniform_groups_get_exactly_zero_with_ktae(G):
    values = np.asarray(UNIFORM_VALUES, np.float32)
    rewards = np.concatenate([np.repeat(values, G), np.tile(np.linspace(-1, 1, G, dtype=np.float32), 2)])
    n = len(values) * G
    rng = np.random.default_rng(G)
    tokens = rng.integers(0, 9, (len(rewards), 6)).astype(np.int32)
    mask = np.ones((len(rewards), 6), np.int8)
    correct = (np.arange(len(rewards)) % 2).astype(np.float32)  # mixed verdicts even in the uniform groups
    for estimator in ESTIMATORS if G == 3 else ("grpo",):
        for ktae in (None, KTAEConfig()):
            out = token_advantages(tokens, mask, rewards, correct, group_size=G, vocab_size=9, estimator=estimator,
                                   ktae=ktae)
            assert np.all(np.asarray(out.advantages)[:n] == 0.0), (estimator, ktae)
            assert np.any(np.asarray(out.advantages)[n:] != 0.0)
    for config in (KTAEConfig(), KTAEConfig(eps=0.0)):  # eps = 0: no 0 / 0 either
        adv = np.asarray(ktae_advantages(tokens, mask, rewards, group_size=G, vocab_size=9, config=config))
        assert np.all(adv[:n] == 0.0) and np.all(np.isfinite(adv))


def _near_uniform(rng, G):
    """Groups whose rewards lie a few float32 steps apart, around values of any size: spreads far
    below eps and, for 1e6, far below the resolution of anything but the rewards themselves."""
    centres = np.asarray([-1.3, 0.7, 1.0, 1e6, -3e-3, 123.456], np.float32)
    steps = rng.integers(-3, 4, (len(centres), G))
    steps[:, :2] = [1, 0]  # never uniform
    out = np.repeat(centres[:, None], G, axis=1)
    for (i, j), k in np.ndenumerate(steps):
        for _ in range(abs(int(k))):
            out[i, j] = np.nextafter(out[i, j], np.float32(np.sign(k) * np.inf))
    return out.reshape(-1)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("G", [3, 16, 64])
def test_against_float64_oracle_on_unseen_rewards(estimator, G):
    rng = np.random.default_rng(100 + G)
    ordinary = rng.choice([-1.3, 0.7, 1.0, 0.0, -1.0, 0.55], size=8 * G) + rng.normal(0, 0.1, 8 * G) * (
        rng.random(8 * G) < 0.5)
    near = _near_uniform(rng, G)
    for rewards in (ordinary.astype(np.float32), near):
        expected = oracle(rewards, G, estimator)
        got = np.asarray(_jitted(estimator, G)(rewards))
        assert np.all(np.isfinite(got))
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * max(scale, 1e-12))
        np.testing.assert_allclose(np.asarray(rollout_advantages(rewards, group_size=G, estimator=estimator)),
                                   expected, rtol=1e-5, atol=1e-6 * max(scale, 1e-12))
    # Sign and order are preserved in a near-uniform group: the rollout a step above gets more.
    got = np.asarray(_jitted(estimator, G)(near)).reshape(-1, G)
    assert np.all(np.sign(got) == np.sign(oracle(near, G, estimator).reshape(-1, G)))


# ---------------------------------------------------------------------------------------------
# KTAE splits on the grader's verdict, the rollout advantage uses the shaped reward (issue 13.3).
# ---------------------------------------------------------------------------------------------


def _expected_verdict_split(tokens, mask, shaped, verdicts, G, estimator, ignore=()):
    rollout = oracle(shaped, G, estimator)
    adv = np.zeros(tokens.shape)
    for start in range(0, len(shaped), G):
        rows = slice(start, start + G)
        uniform = np.all(shaped[rows] == shaped[start])
        scores = naive_group_scores(tokens[rows], mask[rows], verdicts[rows], ignore_ids=ignore)
        for g in range(start, start + G):
            for t in range(tokens.shape[1]):
                if mask[g, t]:
                    adv[g, t] = rollout[g] + (0.0 if uniform else scores[int(tokens[g, t])])
    return adv


@pytest.mark.parametrize("shaping,estimator", [("format_bonus", "grpo"), ("overlong_penalty", "drgrpo"),
                                               ("dapo_overlong", "grpo")])
def test_ktae_splits_on_the_verdict_not_the_shaped_reward(shaping, estimator):
    G, L, V, n_groups = 6, 8, 11, 4
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, V, (n_groups * G, L)).astype(np.int32)
    lengths = rng.integers(1, L + 1, n_groups * G)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int8)
    verdicts = np.tile([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], n_groups).astype(np.float32)
    texts = [r"so \boxed{3}" if i % 3 else "no box" for i in range(n_groups * G)]  # wrong ones boxed too
    config = {
        "format_bonus": RewardConfig(kind="correctness", format_weight=0.2),
        "overlong_penalty": RewardConfig(kind="correctness", overlong_buffer=4, max_response_len=L),
        "dapo_overlong": RewardConfig(kind="dapo", overlong_buffer=4, max_response_len=L, overlong_factor=2.0),
    }[shaping]
    shaped = reward_parts(verdicts, lengths, config, responses=texts)[1]
    # The shaping really moves rollouts across 0: reward > 0 is not the verdict here.
    assert np.any((shaped > 0) != (verdicts > 0))
    expected = _expected_verdict_split(tokens, mask, shaped, verdicts, G, estimator)
    got = token_advantages(tokens, mask, shaped, verdicts, group_size=G, vocab_size=V, estimator=estimator,
                           ktae=KTAEConfig())
    np.testing.assert_allclose(np.asarray(got.advantages), expected, atol=2e-5)
    if estimator == "grpo":
        np.testing.assert_allclose(np.asarray(ktae_advantages(tokens, mask, shaped, group_size=G, vocab_size=V,
                                                              correct=verdicts)), expected, atol=2e-5)
    # Splitting on the shaped reward instead gives something else (what the trainer used to do).
    wrong = token_advantages(tokens, mask, shaped, group_size=G, vocab_size=V, estimator=estimator, ktae=KTAEConfig())
    assert np.abs(np.asarray(wrong.advantages) - expected).max() > 1e-2
    if shaping == "format_bonus":  # the paper's reward kinds: verdict and reward > 0 agree, nothing changes
        for plain in (verdicts, np.where(verdicts > 0, 1.0, -1.0).astype(np.float32)):
            with_verdict = token_advantages(tokens, mask, plain, verdicts, group_size=G, vocab_size=V,
                                            ktae=KTAEConfig())
            without = token_advantages(tokens, mask, plain, group_size=G, vocab_size=V, ktae=KTAEConfig())
            np.testing.assert_array_equal(np.asarray(with_verdict.advantages), np.asarray(without.advantages))
