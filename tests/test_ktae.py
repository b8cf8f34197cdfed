"""KTAE core: the golden vectors, an independent float64 reference, properties, jit/vmap/sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ktae_reference import naive_ktae_advantages
from scipy import stats

from ktae_jax.ktae import (KTAEConfig, fisher_p_table, key_scores_at_tokens, key_token_scores, ktae_advantages,
                           strongest_key_tokens)

GOLDEN_TOL = 1e-5


def _golden_cases(shared_dir):
    index = json.loads((shared_dir / "ktae_golden" / "index.json").read_text())
    return [(case["name"], shared_dir / "ktae_golden" / case["file"]) for case in index["cases"]]


def _config_of(npz) -> KTAEConfig:
    return KTAEConfig(
        alpha=float(npz["alpha"]), beta=float(npz["beta"]), gamma=float(npz["gamma"]), top=float(npz["top"]),
        k1=float(npz["k1"]), b=float(npz["b"]), eps=float(npz["eps"]),
        zero_fisher_at_p1=bool(npz["zero_fisher_at_p1"]), ignore_token_ids=tuple(int(i) for i in npz["ignore_ids"]),
    )


def _bucket(n: int) -> int:
    """Round a length or vocabulary size up to a power of 4, so that cases share compilations."""
    size = 4
    while size < n:
        size *= 4
    return size


def test_golden_vectors(shared_dir):
    cases = _golden_cases(shared_dir)
    assert len(cases) == 45, "the golden folder should hold 45 cases"
    for name, path in cases:
        case = np.load(path)
        config, G, V = _config_of(case), int(case["group_size"]), int(case["vocab_size"])
        tokens, mask, rewards = case["tokens"], case["mask"], case["rewards"]
        # Padding with masked-out positions and with ids that never occur changes nothing (the spec
        # counts masked positions only); it lets cases of nearby shapes share one compilation.
        B, L = tokens.shape
        pad_L, pad_V = _bucket(L) - L, (_bucket(V) if V < 4096 else V)
        tokens = np.pad(tokens, ((0, 0), (0, pad_L)), constant_values=pad_V - 1)
        mask = np.pad(mask, ((0, 0), (0, pad_L)))
        adv = np.asarray(ktae_advantages(tokens, mask, rewards, group_size=G, vocab_size=pad_V, config=config))
        np.testing.assert_allclose(adv[:, :L], case["adv"], atol=GOLDEN_TOL, rtol=0, err_msg=f"adv of case {name}")
        assert np.all(adv[:, L:] == 0)
        grouped = [x.reshape(B // G, G, *x.shape[1:]) for x in (tokens, mask, rewards)]
        keys = np.asarray(jax.vmap(lambda t, m, r: key_token_scores(t, m, r, vocab_size=pad_V, config=config))(*grouped))
        offsets = case["key_offsets"]
        for g in range(len(offsets) - 1):
            expected = np.zeros(pad_V)
            expected[case["key_ids"][offsets[g]:offsets[g + 1]]] = case["key_vals"][offsets[g]:offsets[g + 1]]
            np.testing.assert_allclose(keys[g], expected, atol=GOLDEN_TOL, rtol=0, err_msg=f"keys of {name} group {g}")


@pytest.mark.parametrize("G", [2, 5, 16, 33])
def test_fisher_table_matches_scipy(G):
    table = fisher_p_table(G)
    for n_c in range(G + 1):
        for a in range(n_c + 1):
            for b in range(0, G - n_c + 1, max(1, (G - n_c) // 4)):
                expected = stats.fisher_exact([[a, b], [n_c - a, G - n_c - b]]).pvalue
                assert table[n_c, a, b] == pytest.approx(min(expected, 1.0), abs=1e-9), (n_c, a, b)


def _random_batch(rng, n_groups, G, L, V, p_empty=0.1):
    tokens = rng.integers(0, V, size=(n_groups * G, L)).astype(np.int32)
    lengths = rng.integers(0, L + 1, size=n_groups * G)
    lengths[rng.random(n_groups * G) < p_empty] = 0
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int8)
    rewards = rng.choice([-1.0, 0.0, 0.3, 1.0], size=n_groups * G)
    return tokens, mask, rewards


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_matches_independent_float64_reference(seed):
    rng = np.random.default_rng(seed)
    G = int(rng.choice([3, 8, 12]))
    V = int(rng.integers(5, 60))
    hyper = dict(alpha=float(rng.uniform(0, 2)), beta=float(rng.uniform(0.1, 2)), gamma=float(rng.uniform(0, 2)),
                 top=float(rng.uniform(0.5, 2)), k1=float(rng.uniform(0.5, 3)), b=float(rng.uniform(0, 1)),
                 zero_fisher_at_p1=bool(rng.integers(2)), ignore_ids=(int(rng.integers(V)),))
    tokens, mask, rewards = _random_batch(rng, 3, G, 17, V)
    expected = naive_ktae_advantages(tokens, mask, rewards, group_size=G, eps=1e-4, **hyper)
    config = KTAEConfig(eps=1e-4, **{k: v for k, v in hyper.items() if k != "ignore_ids"},
                        ignore_token_ids=hyper["ignore_ids"])
    got = np.asarray(ktae_advantages(tokens, mask, rewards, group_size=G, vocab_size=V, config=config))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_hand_computed_two_rollouts():
    # G = 2, one correct ([1, 2]), one wrong ([3]): a=1,b=0 for id 1 -> p = 1 (2x2 with n=2), so F = 0;
    # IG = 1 bit (the id decides the label); dir = asin(1) - 0 = pi/2.
    # tf: L_c = 2, L_w = 1, avg = 1.5, K_c = 2 (0.5 + 0.5 * 4/3) = 7/3, f_c = 1/2,
    # tf_c = 0.5 * 3 / (0.5 + 7/3) = 1.5 / (17/6) = 9/17, tf_w = 0.
    tokens = np.array([[1, 2], [3, 0]], np.int32)
    mask = np.array([[1, 1], [1, 0]], np.int8)
    rewards = np.array([1.0, 0.0])
    keys = np.asarray(key_token_scores(tokens, mask, rewards, vocab_size=4, config=KTAEConfig()))
    x = np.pi / 2 + (9 / 17) / 1e-5
    s = (0 + 1.0) * x / 2
    assert keys[1] == pytest.approx(np.tanh(s / 2), abs=1e-6)
    assert keys[0] == 0.0  # id 0 only at an unmasked position


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis). Shapes are drawn from a few fixed choices to bound recompilation.
# ---------------------------------------------------------------------------------------------

SHAPES = [(4, 6, 7), (8, 5, 12)]  # (G, L, V)


@st.composite
def groups(draw, n_groups=2):
    G, L, V = draw(st.sampled_from(SHAPES))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    tokens, mask, rewards = _random_batch(rng, n_groups, G, L, V, p_empty=draw(st.sampled_from([0.0, 0.3])))
    if draw(st.booleans()):  # holes in the masks, not just prefixes
        mask = mask * (rng.random(mask.shape) < 0.8)
    return tokens, mask.astype(np.int8), rewards, G, V


PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONFIG = KTAEConfig(top=1.5, ignore_token_ids=(0,))


def _adv(tokens, mask, rewards, G, V, config=CONFIG):
    return np.asarray(ktae_advantages(tokens, mask, rewards, group_size=G, vocab_size=V, config=config))


@PROPERTY_SETTINGS
@given(groups(), st.randoms(use_true_random=False))
def test_permuting_rollouts_permutes_advantages(batch, random):
    tokens, mask, rewards, G, V = batch
    perm = np.concatenate([g * G + np.array(random.sample(range(G), G)) for g in range(len(rewards) // G)])
    np.testing.assert_allclose(_adv(tokens[perm], mask[perm], rewards[perm], G, V),
                               _adv(tokens, mask, rewards, G, V)[perm], atol=1e-6)


@PROPERTY_SETTINGS
@given(groups(), st.randoms(use_true_random=False))
def test_renaming_token_ids_leaves_scores_unchanged(batch, random):
    tokens, mask, rewards, G, V = batch
    rename = np.array([0] + random.sample(range(1, V), V - 1))  # keep the ignored id 0 in place
    np.testing.assert_allclose(_adv(rename[tokens], mask, rewards, G, V), _adv(tokens, mask, rewards, G, V), atol=1e-6)
    keys = np.asarray(key_token_scores(tokens[:G], mask[:G], rewards[:G], vocab_size=V, config=CONFIG))
    renamed = np.asarray(key_token_scores(rename[tokens[:G]], mask[:G], rewards[:G], vocab_size=V, config=CONFIG))
    np.testing.assert_allclose(renamed[rename], keys, atol=1e-6)


@PROPERTY_SETTINGS
@given(groups())
def test_scores_bounded_masked_zero_no_nan(batch):
    tokens, mask, rewards, G, V = batch
    keys = np.asarray(key_token_scores(tokens[:G], mask[:G], rewards[:G], vocab_size=V, config=CONFIG))
    adv = _adv(tokens, mask, rewards, G, V)
    assert np.all(np.isfinite(keys)) and np.all(np.isfinite(adv))
    # (-top, top) mathematically; float32 tanh may round a huge s to exactly +-top.
    assert np.all(np.abs(keys) <= CONFIG.top)
    assert np.all(adv[mask == 0] == 0.0)
    present = np.zeros(V, bool)
    present[tokens[:G][mask[:G] > 0]] = True
    assert np.all(keys[~present] == 0.0)


@PROPERTY_SETTINGS
@given(groups(), st.sampled_from([0.0, 1.0, -1.0]))
def test_unmixed_groups_get_plain_rollout_advantage(batch, value):
    tokens, mask, rewards, G, V = batch
    rewards = rewards.copy()
    rewards[:G] = value  # first group all equal: every key 0 and A = 0
    rewards[G:] = np.where(rewards[G:] > 0, 2.0, 1.0)  # second group all "correct" with graded rewards
    adv = _adv(tokens, mask, rewards, G, V)
    assert np.all(adv[:G] == 0.0)
    second = rewards[G:]
    plain = (second - second.mean()) / (second.std(ddof=1) + CONFIG.eps)
    np.testing.assert_allclose(adv[G:], np.where(mask[G:] > 0, plain[:, None], 0.0), atol=1e-6)


def test_degenerate_inputs_give_no_nan():
    empty = np.zeros((4, 5), np.int8)
    tokens = np.arange(20, dtype=np.int32).reshape(4, 5) % 6
    for mask, rewards, G in [(empty, np.array([1.0, 0, 1, 0]), 4), (np.ones((4, 5), np.int8), np.ones(4), 1),
                             (np.ones((4, 5), np.int8), np.zeros(4), 2)]:
        adv = _adv(tokens, mask, rewards, G, 6)
        assert np.all(np.isfinite(adv))
    assert np.all(_adv(tokens, np.ones((4, 5), np.int8), np.array([1.0, 0, 1, 0]), 1, 6) == 0)  # groups of 1


# ---------------------------------------------------------------------------------------------
# jit, vmap and sharding give the same numbers.
# ---------------------------------------------------------------------------------------------


def test_vmap_and_chunking_match_per_group_calls():
    rng = np.random.default_rng(5)
    G, L, V = 8, 20, 30
    tokens, mask, rewards = _random_batch(rng, 6, G, L, V)
    grouped = [x.reshape(6, G, *x.shape[1:]) for x in (tokens, mask, rewards)]
    vmapped = jax.vmap(lambda t, m, r: key_token_scores(t, m, r, vocab_size=V, config=CONFIG))(*grouped)
    for g in range(6):
        one = key_token_scores(grouped[0][g], grouped[1][g], grouped[2][g], vocab_size=V, config=CONFIG)
        np.testing.assert_array_equal(np.asarray(vmapped[g]), np.asarray(one))
    by_chunk = [np.asarray(key_scores_at_tokens(tokens, mask, rewards, group_size=G, vocab_size=V, config=CONFIG,
                                                groups_per_chunk=c)) for c in (1, 4, 6)]
    np.testing.assert_allclose(by_chunk[1], by_chunk[0], atol=1e-7)
    np.testing.assert_allclose(by_chunk[2], by_chunk[0], atol=1e-7)


def test_jit_inside_a_larger_program():
    rng = np.random.default_rng(6)
    tokens, mask, rewards = _random_batch(rng, 3, 4, 9, 11)

    @jax.jit
    def step(t, m, r):
        return jnp.sum(ktae_advantages(t, m, r, group_size=4, vocab_size=11, config=CONFIG) ** 2)

    expected = (_adv(tokens, mask, rewards, 4, 11).astype(np.float64) ** 2).sum()
    assert float(step(tokens, mask, rewards)) == pytest.approx(expected, rel=1e-5)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="whole number of groups"):
        ktae_advantages(np.zeros((6, 3), np.int32), np.ones((6, 3)), np.zeros(6), group_size=4, vocab_size=5)
    with pytest.raises(ValueError, match="alpha"):
        KTAEConfig(alpha=0, beta=0)


def test_strongest_key_tokens_by_hand():
    # ids 1..4 at masked positions with mean key +0.5, -0.2, +0.1, -0.6; id 5 only where masked out.
    tokens = np.array([[1, 2, 3, 5], [1, 4, 2, 5]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], np.int8)
    key = np.array([[0.4, -0.1, 0.1, 9.0], [0.6, -0.6, -0.3, 9.0]], np.float32)
    top_ids, top_vals, low_ids, low_vals = (np.asarray(x) for x in
                                            strongest_key_tokens(tokens, mask, key, vocab_size=7, k=2))
    assert top_ids.tolist() == [1, 3] and low_ids.tolist() == [4, 2]
    np.testing.assert_allclose(top_vals, [0.5, 0.1], atol=1e-7)
    np.testing.assert_allclose(low_vals, [-0.6, -0.2], atol=1e-7)
