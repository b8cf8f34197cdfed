"""The policy loss: clipped surrogate, KL to the reference policy, entropy bonus, aggregation.

Per response token t (mask 1), with ratio r = exp(clamp(logp - old_logp, -20, 20)) and advantage A:
  1. surrogate:  pg = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))      (PPO; DAPO clip-higher)
  2. dual clip:  for A < 0, pg = min(pg, -A c) with c = clip_ratio_c > 1       (bounds huge ratios)
  3. KL to the frozen initial policy, with d = ref_logp - logp:
                 k1 = -d,  k2 = d^2 / 2,  k3 = exp(d') - d' - 1 with d' = clamp(d, -20, 20)
                 (low_var_kl: k3 further clamped to [-10, 10])
  4. token loss: pg + kl_coef * kl - entropy_coef * entropy
  5. aggregate over the mini-batch (normalisers are the mini-batch's, so gradient accumulation
     over micro-batches sums to exactly the mini-batch loss):
       token-mean               sum(loss) / #tokens
       seq-mean-token-mean      mean over sequences of (sum_t loss / #tokens of that sequence)
       seq-mean-token-sum       mean over sequences of sum_t loss
       seq-mean-token-sum-norm  sum(loss) / (#sequences x max response length)   (Dr.GRPO)

Masked positions (mask 0: padding, prompt-side columns) never reach the loss or its gradient,
whatever they hold (inf, NaN, 1e30): every input is replaced there by a harmless 0 with `where`
before any arithmetic, and aggregation selects with `where` too. Multiplying by the mask would
not do: inf x 0 = NaN, and one such position would poison the whole mini-batch. The log-ratios
are clamped to +-20 before `exp` (as verl does) so that an extreme but unmasked value cannot
overflow float32 (exp overflows past ~88.7); beyond the clamp that token's ratio and k3 stop
growing and carry no gradient, which the PPO clip and low_var_kl's clamp would mostly do anyway.

Knows nothing of models: every input is an array of per-token numbers, `[N, R]` (N rollouts of
the micro-batch, R response columns).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

KL_CLAMP = 10.0  # low_var_kl: k3 clamped to [-KL_CLAMP, KL_CLAMP]
LOG_RATIO_CLAMP = 20.0  # |log-ratio| before exp (ratio and k3); exp(20) ~ 4.9e8


class Normalisers(NamedTuple):
    """The mini-batch quantities aggregation divides by (computed over the whole mini-batch)."""

    num_tokens: jnp.ndarray  # masked tokens in the mini-batch
    num_seqs: jnp.ndarray  # sequences in the mini-batch
    max_len: jnp.ndarray  # response length limit (columns)


def kl_penalty(logp, ref_logp, estimator: str):
    """Per-token KL estimate of KL(pi || pi_ref) from sampled tokens (step 3)."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator in ("k3", "low_var_kl"):
        d = jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        k3 = jnp.exp(d) - d - 1
        return jnp.clip(k3, -KL_CLAMP, KL_CLAMP) if estimator == "low_var_kl" else k3
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2, k3 or low_var_kl")


def policy_ratio(logp, old_logp):
    """exp(logp - old_logp), the log-ratio clamped to +-LOG_RATIO_CLAMP first."""
    return jnp.exp(jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def clipped_surrogate(logp, old_logp, adv, *, clip_low: float, clip_high: float, clip_ratio_c: float):
    """(token loss, clipped-by-PPO indicator, clipped-by-dual-clip indicator): steps 1 and 2."""
    ratio = policy_ratio(logp, old_logp)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1 - clip_low, 1 + clip_high)
    pg = jnp.maximum(unclipped, clipped)
    ppo_clipped = clipped > unclipped
    if clip_ratio_c:
        dual = jnp.minimum(pg, -adv * clip_ratio_c)
        dual_clipped = (adv < 0) & (dual < pg)
        pg = jnp.where(adv < 0, dual, pg)
    else:
        dual_clipped = jnp.zeros_like(ppo_clipped)
    return pg, ppo_clipped, dual_clipped


def aggregate(loss_NxR, mask_NxR, mode: str, norm: Normalisers):
    """Step 5: this slice's share of the mini-batch loss."""
    keep = mask_NxR.astype(bool)
    mask = keep.astype(loss_NxR.dtype)
    masked = jnp.where(keep, loss_NxR, 0)
    if mode == "token-mean":
        return masked.sum() / jnp.maximum(norm.num_tokens, 1)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / jnp.maximum(mask.sum(-1), 1)
        return per_seq.sum() / norm.num_seqs
    if mode == "seq-mean-token-sum":
        return masked.sum() / norm.num_seqs
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (norm.num_seqs * norm.max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def policy_loss(logp, old_logp, ref_logp, adv, mask, entropy, norm: Normalisers, *, clip_low: float, clip_high: float,
                clip_ratio_c: float, kl_coef: float, kl_estimator: str, entropy_coef: float, loss_agg: str):
    """(loss, metrics) for one slice of response tokens; every array is [B, T]."""
    keep = jnp.asarray(mask).astype(bool)
    # Masked positions hold 0 from here on (see the module docstring); `where` passes no gradient there.
    logp, old_logp, ref_logp, adv, entropy = (jnp.where(keep, x, 0) for x in (logp, old_logp, ref_logp, adv, entropy))
    pg, ppo_clipped, dual_clipped = clipped_surrogate(
        logp, old_logp, adv, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c)
    token_loss = pg
    mean = lambda x: aggregate(x.astype(jnp.float32), mask, "token-mean", norm)  # noqa: E731
    metrics = {"loss/pg": aggregate(pg, mask, loss_agg, norm), "loss/clip_frac": mean(ppo_clipped),
               "loss/dual_clip_frac": mean(dual_clipped), "loss/entropy": mean(entropy),
               "loss/ratio_mean": mean(policy_ratio(logp, old_logp))}
    if kl_coef:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        token_loss = token_loss + kl_coef * kl
        metrics["loss/kl"] = mean(kl)
    if entropy_coef:
        token_loss = token_loss - entropy_coef * entropy
    loss = aggregate(token_loss, mask, loss_agg, norm)
    metrics["loss/total"] = loss
    return loss, metrics
