"""Reward shaping (correctness, DAPO, overlong penalty, format, custom)."""

import numpy as np
import pytest

from ktae_jax.rewards import RewardConfig, reward_parts


def length_bonus(responses, references, correct_N):
    """A user reward named by import path in the tests below: correct + 0.01 per character."""
    return [float(c) + 0.01 * len(r) for r, c in zip(responses, correct_N)]


# ---------------------------------------------------------------- host reward functions


def test_correctness_and_dapo_base_rewards():
    correct, lengths = [1.0, 0.0, 1.0], [5, 6, 7]
    np.testing.assert_array_equal(reward_parts(correct, lengths, RewardConfig())[1], [1, 0, 1])
    dapo = RewardConfig(kind="dapo")
    np.testing.assert_array_equal(reward_parts(correct, lengths, dapo)[1], [1, -1, 1])


def test_dapo_overlong_penalty_by_hand():
    # L = 100, B = 20, factor 0.5: zero up to 80 tokens, linear to -0.5 at 100, -0.5 beyond.
    config = RewardConfig(kind="dapo", overlong_buffer=20, overlong_factor=0.5, max_response_len=100)
    lengths = [10, 80, 81, 90, 100, 130]
    expected = np.array([0.0, 0.0, -0.5 / 20, -0.25, -0.5, -0.5]) + 1.0
    np.testing.assert_allclose(reward_parts([1.0] * 6, lengths, config)[1], expected, rtol=1e-6)


def test_format_reward_and_custom_function():
    responses = [r"\boxed{1}", "1", r"\boxed{2}"]
    fmt = RewardConfig(format_weight=0.1)
    np.testing.assert_allclose(
        reward_parts([1, 1, 0], [3, 3, 3], fmt, responses=responses)[1], [1.1, 1.0, 0.1]
    )
    custom = RewardConfig(custom_fn=f"{__name__}:length_bonus")
    np.testing.assert_allclose(
        reward_parts([1, 1, 0], [3, 3, 3], custom, responses=responses)[1],
        [1.09, 1.01, 0.09],
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "ppo"}, "reward.kind"),
        ({"overlong_buffer": 10}, "max_response_len is required"),
        ({"overlong_buffer": 10, "max_response_len": 5}, "exceeds"),
        ({"overlong_buffer": -1}, "overlong_buffer must be"),
        ({"custom_fn": "no_colon"}, "pkg.module:function"),
    ],
)
def test_bad_config_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)


def test_missing_custom_function_is_named():
    with pytest.raises(AttributeError, match="no function 'nope'"):
        reward_parts([1], [1], RewardConfig(custom_fn=f"{__name__}:nope"), responses=["x"])[1]
    with pytest.raises(ImportError, match="no_such_module"):
        reward_parts([1], [1], RewardConfig(custom_fn="no_such_module:f"), responses=["x"])[1]


@pytest.mark.parametrize("kind", ["correctness", "dapo"])
def test_base_reward_is_the_verdict_whatever_the_shaping(kind):
    # KTAE's split reads the base: a format bonus or an overlong penalty must not move a response across it.
    correct = np.array([1, 0, 1, 0, 1, 0], np.float32)
    lengths = np.array([10, 10, 98, 98, 50, 120])
    texts = [r"\boxed{1}", r"\boxed{2}", "3", r"\boxed{4}", "5", r"\boxed{6}"]
    config = RewardConfig(kind=kind, format_weight=0.5 if kind == "correctness" else 1.5, max_response_len=100,
                          overlong_buffer=40, overlong_factor=1.0 if kind == "correctness" else 2.5)
    base, final = reward_parts(correct, lengths, config, responses=texts)
    np.testing.assert_array_equal(base > 0, correct > 0)
    assert (final > 0).tolist() != (correct > 0).tolist()  # the shaping does cross zero on these rows


def test_base_reward_of_a_custom_function_is_its_own_reward():
    correct = np.array([1, 0, 0], np.float32)
    texts = ["abc", "abcd", ""]
    config = RewardConfig(custom_fn=f"{__name__}:length_bonus", format_weight=0.5)
    base, final = reward_parts(correct, np.array([3, 4, 0]), config, responses=texts)
    np.testing.assert_allclose(base, [1.03, 0.04, 0.0], rtol=1e-6)
    np.testing.assert_allclose(final, base)  # no box in any text
