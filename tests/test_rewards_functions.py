"""Reward shaping (correctness, DAPO, overlong penalty, format, custom) and the on-device reward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktae_jax.rewards import RewardConfig, compute_rewards, exact_match_reward, extract_boxed, reward_parts


def length_bonus(responses, references, correct_N):
    """A user reward named by import path in the tests below: correct + 0.01 per character."""
    return [float(c) + 0.01 * len(r) for r, c in zip(responses, correct_N)]


# ---------------------------------------------------------------- host reward functions


def test_correctness_and_dapo_base_rewards():
    correct, lengths = [1.0, 0.0, 1.0], [5, 6, 7]
    np.testing.assert_array_equal(compute_rewards(correct, lengths, RewardConfig()), [1, 0, 1])
    dapo = RewardConfig(kind="dapo")
    np.testing.assert_array_equal(compute_rewards(correct, lengths, dapo), [1, -1, 1])


def test_dapo_overlong_penalty_by_hand():
    # L = 100, B = 20, factor 0.5: zero up to 80 tokens, linear to -0.5 at 100, -0.5 beyond.
    config = RewardConfig(kind="dapo", overlong_buffer=20, overlong_factor=0.5, max_response_len=100)
    lengths = [10, 80, 81, 90, 100, 130]
    expected = np.array([0.0, 0.0, -0.5 / 20, -0.25, -0.5, -0.5]) + 1.0
    np.testing.assert_allclose(compute_rewards([1.0] * 6, lengths, config), expected, rtol=1e-6)


def test_format_reward_and_custom_function():
    responses = [r"\boxed{1}", "1", r"\boxed{2}"]
    fmt = RewardConfig(format_weight=0.1)
    np.testing.assert_allclose(
        compute_rewards([1, 1, 0], [3, 3, 3], fmt, responses=responses), [1.1, 1.0, 0.1]
    )
    custom = RewardConfig(custom_fn=f"{__name__}:length_bonus")
    np.testing.assert_allclose(
        compute_rewards([1, 1, 0], [3, 3, 3], custom, responses=responses),
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
        compute_rewards([1], [1], RewardConfig(custom_fn=f"{__name__}:nope"), responses=["x"])
    with pytest.raises(ImportError, match="no_such_module"):
        compute_rewards([1], [1], RewardConfig(custom_fn="no_such_module:f"), responses=["x"])


# ---------------------------------------------------------------- on-device exact match

# A character-level vocabulary: token id = code point. `\boxed{` is 7 tokens, `}` closes.
OPEN = tuple(ord(c) for c in "\\boxed{")
CLOSE = (ord("}"),)


def _encode(texts, width):
    tokens = np.zeros((len(texts), width), np.int32)
    mask = np.zeros((len(texts), width), bool)
    for i, t in enumerate(texts):
        ids = [ord(c) for c in t[:width]]
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = True
    return tokens, mask


def _host_reference(text, ref):
    """Independent reference: the host extractor (answers here hold no braces)."""
    return float(extract_boxed(text) == ref)


def test_exact_match_agrees_with_host_extraction():
    # Within the device reward's contract: boxes are `\boxed{` (no brace-less `\boxed 5`)
    # and answers hold no braces; boxes may be nested, unclosed, empty or repeated.
    rng = np.random.default_rng(0)
    pieces = ["\\boxed{", "}", "12", "7", "ab", " ", "x"]
    texts, refs = [], []
    answers = ["12", "7", "ab", "x", "127", ""]
    for _ in range(300):
        text = "".join(rng.choice(pieces, size=rng.integers(0, 8)))
        if rng.random() < 0.5:  # a well-formed final box, often closed, then some words
            closing = "}" if rng.random() < 0.8 else ""
            text += "\\boxed{" + str(rng.choice(answers)) + closing + str(rng.choice([" ", "x", ""]))
        texts.append(text)
        refs.append(str(rng.choice(answers)))
    texts += [r"so \boxed{12}", r"\boxed{7} \boxed{12}", r"\boxed{12", r"\boxed{12}}"]
    refs += ["12", "12", "12", "12"]
    T, R = 64, 4
    tokens, mask = _encode(texts, T)
    ref_tokens, _ = _encode(refs, R)
    ref_len = np.array([len(r) for r in refs], np.int32)
    fn = jax.jit(functools.partial(exact_match_reward, open_ids=OPEN, close_ids=CLOSE))
    got = np.asarray(fn(tokens, mask, ref_tokens, ref_len))
    expected = np.array([_host_reference(t[:T], r) for t, r in zip(texts, refs)])
    np.testing.assert_array_equal(got, expected)
    assert expected.sum() > 10  # the random set holds real matches, not only zeros


def test_exact_match_respects_the_mask_and_merged_close_tokens():
    # Token ids: 1 = "\boxed{", 2 = "}", 3 = "}$" (a merged closing token), 5..9 digits.
    tokens = jnp.array([[1, 5, 6, 2, 0], [1, 5, 6, 3, 0], [1, 5, 6, 2, 0], [1, 5, 1, 6, 2]])
    mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ref = jnp.array([[5, 6], [5, 6], [5, 6], [5, 6]])
    ref_len = jnp.array([2, 2, 2, 2])
    out = exact_match_reward(tokens, mask, ref, ref_len, open_ids=(1,), close_ids=(2, 3))
    # row 2: the close token is masked out (past the response); row 3: the last box holds "6".
    np.testing.assert_array_equal(np.asarray(out), [1.0, 1.0, 0.0, 0.0])


def test_exact_match_sharded_over_8_devices_equals_one_device():
    from jax.sharding import NamedSharding, PartitionSpec as P

    devices = jax.devices()
    assert len(devices) == 8
    texts = [rf"a \boxed{{{k % 5}}} b" if k % 3 else "none" for k in range(16)]
    refs = [str(k % 4) for k in range(16)]
    tokens, mask = _encode(texts, 24)
    ref_tokens, _ = _encode(refs, 2)
    ref_len = np.array([len(r) for r in refs], np.int32)
    fn = jax.jit(functools.partial(exact_match_reward, open_ids=OPEN, close_ids=CLOSE))
    single = np.asarray(fn(tokens, mask, ref_tokens, ref_len))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    sharded = fn(*(jax.device_put(x, rows) for x in (tokens, mask, ref_tokens, ref_len)))
    np.testing.assert_array_equal(np.asarray(sharded), single)
    assert single.sum() > 0


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
    np.testing.assert_array_equal(final, compute_rewards(correct, lengths, config, responses=texts))
    assert (final > 0).tolist() != (correct > 0).tolist()  # the shaping does cross zero on these rows


def test_base_reward_of_a_custom_function_is_its_own_reward():
    correct = np.array([1, 0, 0], np.float32)
    texts = ["abc", "abcd", ""]
    config = RewardConfig(custom_fn=f"{__name__}:length_bonus", format_weight=0.5)
    base, final = reward_parts(correct, np.array([3, 4, 0]), config, responses=texts)
    np.testing.assert_allclose(base, [1.03, 0.04, 0.0], rtol=1e-6)
    np.testing.assert_allclose(final, base)  # no box in any text
