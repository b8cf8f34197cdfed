"""Independent NumPy implementations of `shared/KTAE_SPEC.md`, used as references by the tests and
as baselines by `benchmarks/bench_ktae.py`.

* `naive_ktae_advantages`: float64, a Python loop over groups and over the distinct ids of each
  group, Fisher p-values from `scipy.stats.fisher_exact` -- the straightforward reading of the spec.
* `vectorised_ktae_advantages`: float64 NumPy done well: per group, one sort of (id, rollout)
  keys for presence, `bincount`s for the counts, the Fisher p-values looked up in a table of the
  small integers (n_c, a, b) computed once per group size (from scipy's hypergeometric law), and
  every statistic evaluated at the masked positions at once.

Neither shares code with `ktae_jax.ktae`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import stats

TF_SMOOTH = 1e-5


def _h(q: float) -> float:
    if q <= 0 or q >= 1:
        return 0.0
    return -(q * math.log2(q) + (1 - q) * math.log2(1 - q))


def _sigmoid(s: float) -> float:
    return 1 / (1 + math.exp(-s)) if s >= 0 else math.exp(s) / (1 + math.exp(s))


def naive_group_scores(tokens, mask, rewards, *, alpha=1.0, beta=1.0, gamma=1.0, top=1.0, k1=2.0, b=0.5,
                       zero_fisher_at_p1=True, ignore_ids=()) -> dict[int, float]:
    """{token id: key score} for every id at a masked position of one group."""
    G = len(rewards)
    correct = [float(r) > 0 for r in rewards]
    n_c = sum(correct)
    n_w = G - n_c
    present = [set(int(t) for t, m in zip(tokens[g], mask[g]) if m) for g in range(G)]
    ids = sorted(set().union(*present)) if G else []
    if n_c == 0 or n_w == 0:
        return {v: 0.0 for v in ids}
    len_c = sum(int(np.sum(mask[g])) for g in range(G) if correct[g])
    len_w = sum(int(np.sum(mask[g])) for g in range(G) if not correct[g])
    avg = (len_c + len_w) / 2
    scores = {}
    for v in ids:
        if v in ignore_ids:
            scores[v] = 0.0
            continue
        a = sum(1 for g in range(G) if correct[g] and v in present[g])
        bb = sum(1 for g in range(G) if not correct[g] and v in present[g])
        c, d = n_c - a, n_w - bb
        p = float(np.clip(stats.fisher_exact([[a, bb], [c, d]]).pvalue, 0, 1))
        fisher = 0.0 if (zero_fisher_at_p1 and p > 1 - 1e-6) else math.exp(-2 * p)
        h_cond = ((a + bb) / G) * (_h(a / (a + bb)) if a + bb else 0.0) + ((c + d) / G) * (
            _h(c / (c + d)) if c + d else 0.0
        )
        info_gain = _h(n_c / G) - h_cond
        direction = math.asin(math.sqrt(a / n_c)) - math.asin(math.sqrt(bb / n_w))
        occ_c = sum(int(np.sum((np.asarray(tokens[g]) == v) & (np.asarray(mask[g]) > 0))) for g in range(G) if correct[g])
        occ_w = sum(int(np.sum((np.asarray(tokens[g]) == v) & (np.asarray(mask[g]) > 0))) for g in range(G) if not correct[g])
        f_c = occ_c / len_c if len_c else 0.0
        f_w = occ_w / len_w if len_w else 0.0
        k_c = k1 * (1 - b + b * len_c / avg)
        k_w = k1 * (1 - b + b * len_w / avg)
        tf_c = f_c * (k1 + 1) / (f_c + k_c) if f_c else 0.0
        tf_w = f_w * (k1 + 1) / (f_w + k_w) if f_w else 0.0
        x = direction + gamma * (tf_c / (tf_w + TF_SMOOTH) - tf_w / (tf_c + TF_SMOOTH))
        s = (alpha * fisher + beta * info_gain) * x / (alpha + beta)
        scores[v] = top * 2 * (_sigmoid(s) - 0.5)
    return scores


def grpo_advantages(rewards, group_size, eps=1e-6) -> np.ndarray:
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    if group_size == 1:
        return np.zeros(r.size)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)).reshape(-1)


def naive_ktae_advantages(tokens, mask, rewards, *, group_size, eps=1e-6, **hyper) -> np.ndarray:
    tokens, mask, rewards = np.asarray(tokens), np.asarray(mask), np.asarray(rewards, np.float64)
    rollout = grpo_advantages(rewards, group_size, eps)
    adv = np.zeros(tokens.shape)
    for start in range(0, len(rewards), group_size):
        rows = slice(start, start + group_size)
        scores = naive_group_scores(tokens[rows], mask[rows], rewards[rows], **hyper)
        for g in range(start, start + group_size):
            for t in range(tokens.shape[1]):
                if mask[g, t]:
                    adv[g, t] = rollout[g] + scores[int(tokens[g, t])]
    return adv


@functools.lru_cache(maxsize=None)
def _fisher_table(G: int) -> np.ndarray:
    """p[n_c, a, b] from the hypergeometric pmf (scipy), ties within a relative 1e-6."""
    p = np.ones((G + 1, G + 1, G + 1))
    for n_c in range(G + 1):
        n_w = G - n_c
        for row in range(G + 1):
            xs = np.arange(max(0, row - n_w), min(row, n_c) + 1)
            pmf = stats.hypergeom(G, n_c, row).pmf(xs)
            for i, a in enumerate(xs):
                p[n_c, a, row - a] = min(1.0, pmf[pmf <= pmf[i] * (1 + 1e-6)].sum())
    return p


def _entropy(q):
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(q * np.log2(q) + (1 - q) * np.log2(1 - q))
    return np.where((q <= 0) | (q >= 1), 0.0, h)


def vectorised_group_key_at_tokens(tokens, mask, rewards, *, vocab_size, alpha=1.0, beta=1.0, gamma=1.0, top=1.0,
                                   k1=2.0, b=0.5, zero_fisher_at_p1=True, ignore_ids=()) -> np.ndarray:
    """[G, L] key score at every position of one group (0 where masked out)."""
    G, L = tokens.shape
    correct = np.asarray(rewards) > 0
    n_c = int(correct.sum())
    n_w = G - n_c
    out = np.zeros((G, L))
    if n_c == 0 or n_w == 0:
        return out
    on = np.asarray(mask) > 0
    rows, cols = np.nonzero(on)
    ids = tokens[rows, cols].astype(np.int64)
    pos_correct = correct[rows]
    # Presence: each distinct (id, rollout) pair once.
    pairs = np.unique(ids * G + rows)
    pair_ids, pair_rows = pairs // G, pairs % G
    a_V = np.bincount(pair_ids[correct[pair_rows]], minlength=vocab_size)
    b_V = np.bincount(pair_ids[~correct[pair_rows]], minlength=vocab_size)
    occ_c_V = np.bincount(ids[pos_correct], minlength=vocab_size)
    occ_w_V = np.bincount(ids[~pos_correct], minlength=vocab_size)
    a, bb, occ_c, occ_w = a_V[ids], b_V[ids], occ_c_V[ids], occ_w_V[ids]

    p = _fisher_table(G)[n_c, a, bb]
    fisher = np.exp(-2 * p)
    if zero_fisher_at_p1:
        fisher = np.where(p > 1 - 1e-6, 0.0, fisher)
    present, absent = a + bb, G - a - bb
    with np.errstate(divide="ignore", invalid="ignore"):
        h_cond = present / G * _entropy(np.where(present > 0, a / np.maximum(present, 1), 0)) + absent / G * _entropy(
            np.where(absent > 0, (n_c - a) / np.maximum(absent, 1), 0)
        )
    info_gain = _entropy(np.float64(n_c / G)) - h_cond
    direction = np.arcsin(np.sqrt(a / n_c)) - np.arcsin(np.sqrt(bb / n_w))
    len_c, len_w = int(on[correct].sum()), int(on[~correct].sum())
    if len_c + len_w == 0:
        return out
    avg = (len_c + len_w) / 2
    k_c, k_w = k1 * (1 - b + b * len_c / avg), k1 * (1 - b + b * len_w / avg)
    f_c = occ_c / len_c if len_c else np.zeros(len(ids))
    f_w = occ_w / len_w if len_w else np.zeros(len(ids))
    with np.errstate(divide="ignore", invalid="ignore"):
        tf_c = np.where(f_c > 0, f_c * (k1 + 1) / (f_c + k_c), 0.0)
        tf_w = np.where(f_w > 0, f_w * (k1 + 1) / (f_w + k_w), 0.0)
    x = direction + gamma * (tf_c / (tf_w + TF_SMOOTH) - tf_w / (tf_c + TF_SMOOTH))
    s = (alpha * fisher + beta * info_gain) * x / (alpha + beta)
    key = top * np.tanh(s / 2)
    if len(ignore_ids):
        key = np.where(np.isin(ids, np.asarray(ignore_ids)), 0.0, key)
    out[rows, cols] = key
    return out


def vectorised_ktae_advantages(tokens, mask, rewards, *, group_size, vocab_size, eps=1e-6, **hyper) -> np.ndarray:
    tokens, mask, rewards = np.asarray(tokens), np.asarray(mask), np.asarray(rewards, np.float64)
    rollout = grpo_advantages(rewards, group_size, eps)
    adv = np.zeros(tokens.shape)
    for start in range(0, len(rewards), group_size):
        rows = slice(start, start + group_size)
        adv[rows] = vectorised_group_key_at_tokens(tokens[rows], mask[rows], rewards[rows], vocab_size=vocab_size, **hyper)
    return np.where(np.asarray(mask) > 0, adv + rollout[:, None], 0.0)
