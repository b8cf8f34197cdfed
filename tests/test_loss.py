"""The policy loss against hand-computed NumPy: surrogate, dual clip, KL estimators, aggregation modes; masked
positions and extreme log-ratios."""

import functools

import jax
import numpy as np
import pytest

from ktae_jax.loss import Normalisers, aggregate, clipped_surrogate, kl_penalty, policy_loss

RNG = np.random.default_rng(0)
LOGP = np.log(RNG.uniform(0.05, 1, (3, 5))).astype(np.float32)
OLD = (LOGP + RNG.normal(0, 0.5, (3, 5))).astype(np.float32)
REF = (LOGP + RNG.normal(0, 0.5, (3, 5))).astype(np.float32)
ADV = RNG.normal(0, 1, (3, 5)).astype(np.float32)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], np.int32)


def test_kl_estimators():
    d = REF.astype(np.float64) - LOGP
    np.testing.assert_allclose(kl_penalty(LOGP, REF, "k1"), LOGP - REF, rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(LOGP, REF, "k2"), 0.5 * d**2, rtol=1e-5)
    np.testing.assert_allclose(kl_penalty(LOGP, REF, "k3"), np.exp(d) - d - 1, rtol=1e-5, atol=1e-7)
    far = np.array([0.0], np.float32), np.array([20.0], np.float32)  # exp(20) - 21: clamped at 10
    assert float(kl_penalty(*far, "low_var_kl")[0]) == 10.0
    assert float(kl_penalty(*far, "k3")[0]) > 1e8
    with pytest.raises(ValueError, match="unknown KL"):
        kl_penalty(LOGP, REF, "k4")


def test_clipped_surrogate_and_dual_clip():
    ratio = np.exp(LOGP.astype(np.float64) - OLD)
    pg = np.maximum(-ADV * ratio, -ADV * np.clip(ratio, 0.8, 1.28))
    got, clipped, _ = clipped_surrogate(LOGP, OLD, ADV, clip_low=0.2, clip_high=0.28, clip_ratio_c=0.0)
    np.testing.assert_allclose(got, pg, rtol=1e-5)
    np.testing.assert_array_equal(clipped, -ADV * np.clip(ratio, 0.8, 1.28) > -ADV * ratio)
    dual = np.where(ADV < 0, np.minimum(pg, -ADV * 3.0), pg)
    got, _, dual_clipped = clipped_surrogate(LOGP, OLD, ADV, clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0)
    np.testing.assert_allclose(got, dual, rtol=1e-5)
    np.testing.assert_array_equal(dual_clipped, (ADV < 0) & (-ADV * 3.0 < pg))
    # A hand case: A = -1, ratio = 5 -> PPO term max(5, 1.28) = 5, dual clip caps it at c = 3.
    got, _, _ = clipped_surrogate(np.log([5.0]), np.zeros(1), np.array([-1.0]), clip_low=0.2, clip_high=0.28,
                                  clip_ratio_c=3.0)
    assert float(got[0]) == pytest.approx(3.0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_aggregation_modes_and_micro_batch_sums(mode):
    loss = RNG.normal(0, 1, (3, 5))
    m = MASK.astype(np.float64)
    expected = {
        "token-mean": (loss * m).sum() / m.sum(),
        "seq-mean-token-mean": np.mean((loss * m).sum(1) / m.sum(1)),
        "seq-mean-token-sum": np.mean((loss * m).sum(1)),
        "seq-mean-token-sum-norm": (loss * m).sum() / (3 * 5),
    }[mode]
    norm = Normalisers(num_tokens=np.float32(m.sum()), num_seqs=np.float32(3), max_len=np.float32(5))
    assert float(aggregate(loss, MASK, mode, norm)) == pytest.approx(expected, rel=1e-5)
    # Micro-batches with the mini-batch's normalisers add up to the whole.
    parts = float(aggregate(loss[:1], MASK[:1], mode, norm)) + float(aggregate(loss[1:], MASK[1:], mode, norm))
    assert parts == pytest.approx(expected, rel=1e-5)


def test_policy_loss_composes_terms():
    entropy = RNG.uniform(0, 2, (3, 5)).astype(np.float32)
    norm = Normalisers(num_tokens=np.float32(MASK.sum()), num_seqs=np.float32(3), max_len=np.float32(5))
    kwargs = dict(clip_low=0.2, clip_high=0.2, clip_ratio_c=0.0, kl_estimator="low_var_kl", loss_agg="token-mean")
    loss, metrics = policy_loss(LOGP, OLD, REF, ADV, MASK, entropy, norm, kl_coef=0.1, entropy_coef=0.01, **kwargs)
    pg, _, _ = clipped_surrogate(LOGP, OLD, ADV, clip_low=0.2, clip_high=0.2, clip_ratio_c=0.0)
    kl = np.asarray(kl_penalty(LOGP, REF, "low_var_kl"))
    expected = ((np.asarray(pg) + 0.1 * kl - 0.01 * entropy) * MASK).sum() / MASK.sum()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["loss/kl"]) == pytest.approx((kl * MASK).sum() / MASK.sum(), rel=1e-5)
    loss0, metrics0 = policy_loss(LOGP, OLD, REF, ADV, MASK, entropy, norm, kl_coef=0.0, entropy_coef=0.0, **kwargs)
    assert "loss/kl" not in metrics0
    assert float(loss0) == pytest.approx(float(metrics0["loss/pg"]), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Masked positions and extreme log-ratios (issue 13.2).
# ---------------------------------------------------------------------------------------------

GARBAGE = [np.inf, -np.inf, np.nan, 1e30, -1e30, 3e38]


@functools.lru_cache(maxsize=None)
def _loss_and_grads_fn(mode, kl_estimator, clip_ratio_c):
    """jit(value and gradient in logp and entropy) of the policy loss; compiled once per setting."""
    norm = Normalisers(num_tokens=np.float32(MASK.sum()), num_seqs=np.float32(3), max_len=np.float32(5))

    def loss_fn(logp, entropy, old, ref, adv):
        return policy_loss(logp, old, ref, adv, MASK, entropy, norm, clip_low=0.2, clip_high=0.28,
                           clip_ratio_c=clip_ratio_c, kl_coef=0.1, kl_estimator=kl_estimator, entropy_coef=0.01,
                           loss_agg=mode)

    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))


def _loss_and_grads(logp, old, ref, adv, entropy, *setting):
    (loss, metrics), grads = _loss_and_grads_fn(*setting)(logp, entropy, old, ref, adv)
    return loss, metrics, grads


@pytest.mark.parametrize("mode,kl_estimator,clip_ratio_c", [("token-mean", "low_var_kl", 0.0),
                                                            ("seq-mean-token-mean", "k3", 3.0),
                                                            ("seq-mean-token-sum", "k2", 0.0),
                                                            ("seq-mean-token-sum-norm", "k1", 10.0)])
def test_masked_positions_never_reach_loss_or_gradient(mode, kl_estimator, clip_ratio_c):
    entropy = RNG.uniform(0, 2, (3, 5)).astype(np.float32)
    clean = _loss_and_grads(LOGP, OLD, REF, ADV, entropy, mode, kl_estimator, clip_ratio_c)
    assert np.isfinite(float(clean[0]))
    masked = MASK == 0
    for value in GARBAGE:
        for poisoned in range(6):  # each input in turn, then all at once
            inputs = [x.copy() for x in (LOGP, OLD, REF, ADV, entropy)]
            for i in ([poisoned] if poisoned < 5 else range(5)):
                inputs[i][masked] = value
            dirty = _loss_and_grads(*inputs, mode, kl_estimator, clip_ratio_c)
            np.testing.assert_array_equal(float(dirty[0]), float(clean[0]), err_msg=f"{value} in input {poisoned}")
            for key in clean[1]:
                np.testing.assert_array_equal(float(dirty[1][key]), float(clean[1][key]), err_msg=key)
            for g_dirty, g_clean in zip(dirty[2], clean[2]):
                np.testing.assert_array_equal(np.asarray(g_dirty), np.asarray(g_clean))


def test_log_ratios_clamped_before_exp():
    # Unmasked extreme log-ratios: finite loss and gradient, ratio and k3 capped at exp(20).
    logp = np.array([[-0.5, -200.0, -1.0]], np.float32)
    old = np.array([[-0.4, -1.0, -150.0]], np.float32)
    ref = np.array([[150.0, -1.0, -250.0]], np.float32)
    d = np.clip(ref.astype(np.float64) - logp, -20, 20)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k3"), np.exp(d) - d - 1, rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "low_var_kl"), np.clip(np.exp(d) - d - 1, -10, 10), rtol=1e-6)
    ratio = np.exp(np.clip(logp.astype(np.float64) - old, -20, 20))
    adv = np.array([[1.0, -1.0, -1.0]], np.float32)
    pg, _, _ = clipped_surrogate(logp, old, adv, clip_low=0.2, clip_high=0.2, clip_ratio_c=0.0)
    np.testing.assert_allclose(pg, np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)), rtol=1e-6)
    mask = np.ones((1, 3), np.int32)
    norm = Normalisers(num_tokens=np.float32(3), num_seqs=np.float32(1), max_len=np.float32(3))
    for estimator in ("k3", "low_var_kl"):
        grad = jax.grad(lambda lp: policy_loss(lp, old, ref, adv, mask, np.zeros((1, 3), np.float32), norm,
                                               clip_low=0.2, clip_high=0.2, clip_ratio_c=0.0, kl_coef=0.1,
                                               kl_estimator=estimator, entropy_coef=0.0, loss_agg="token-mean")[0])(logp)
        assert np.all(np.isfinite(np.asarray(grad)))
