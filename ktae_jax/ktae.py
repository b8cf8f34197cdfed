"""KTAE: key-token advantage estimation (Sun et al., 2025), exactly as `shared/KTAE_SPEC.md` states it.

Within one group of G rollouts of a prompt, every token id v gets a key score from a 2x2
contingency table (does v occur in the rollout / is the rollout correct):

  1. split:   C = {g : rollout g is correct}, W = the rest; n_c, n_w; a group with n_c = 0 or
              n_w = 0 scores 0 everywhere. "Correct" is the grader's verdict where the caller has
              it (`correct`); the functions here read it as `value > 0`, so the paper's 0/1 and
              +-1 rewards can stand in for it, but shaped rewards (a format bonus, an overlong
              penalty) cannot: pass the verdicts.
  2. table:   a = #rollouts in C containing v, b = same over W (masked positions only).
  3. stats:   F   = exp(-2 p), p the two-sided Fisher exact p-value (F = 0 at p = 1 when
                    `zero_fisher_at_p1`);
              IG  = H(Y) - H(Y | X) in bits;
              dir = asin(sqrt(a / n_c)) - asin(sqrt(b / n_w));
              x   = dir + gamma (tf_c / (tf_w + 1e-5) - tf_w / (tf_c + 1e-5)), tf BM25-saturated
                    term frequencies of v in C and in W.
  4. key:     s = (alpha F + beta IG) x / (alpha + beta);  key = top * 2 (sigmoid(s) - 1/2).
  5. advantage: adv[g, t] = mask[g, t] (A[g] + key(tokens[g, t])), A the GRPO z-score of the
              (shaped) rewards, computed in `advantages.py` with every other rollout estimator;
              a group whose rewards are all equal gets 0 there, key included.

How it is made fast (the paper's step: 1,024 groups x 16 rollouts x 3,072 tokens, V = 151,936):
  * F, IG and dir depend only on the small integers (n_c, a, b) (n_w = G - n_c), so they are
    tabulated once per group size in float64 on the host at trace time ([G+1]^3 entries, a
    compile-time constant) and looked up on device: no Fisher sums on device.
  * The per-id counts come from scatters into one vocabulary-sized table per group (cheap: a
    memset and O(G R) scattered writes; sorting is ~15x slower in XLA on CPU). Rollout presence
    (a, b) is deduplicated without sorting: rollouts are visited one at a time and every
    occurrence of v in rollout g writes the same value `count[v] + inc[g]`, so duplicates
    within a rollout collapse and each (v, g) pair counts once.
  * Groups are `vmap`ped in chunks with `lax.map(batch_size=...)`, so only a few
    vocabulary-sized tables are alive at once; nothing of shape [N, R, V] or [P, V] exists.

Letters: N rollouts (rows of a batch), P groups (one per prompt) of G rollouts, R response
tokens, V the vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Fisher tables are "not larger" than the observed one's probability up to this relative slack.
_FISHER_TIE_RTOL = 1e-6
# Smoothing constant of the TF ratio, fixed by the released code.
_TF_SMOOTH = 1e-5
# Table size grows as (G + 1)^3; beyond this the host tables would not be small constants.
MAX_GROUP_SIZE = 256
# Rollouts per iteration of the presence loop: unrolling a little saves loop overhead on CPU.
_UNROLL = 4


@dataclasses.dataclass(frozen=True)
class KTAEConfig:
    """Hyper-parameters of KTAE (defaults: what the paper's released runs used)."""

    alpha: float = 1.0  # weight of the Fisher score F
    beta: float = 1.0  # weight of the information gain IG
    gamma: float = 1.0  # weight of the term-frequency contrast in x
    top: float = 1.0  # scale: key scores lie in (-top, top)
    k1: float = 2.0  # BM25 saturation constant
    b: float = 0.5  # BM25 length normalisation
    eps: float = 1e-6  # added to the std of the GRPO z-score
    zero_fisher_at_p1: bool = True  # F = 0 where p = 1 (the released code's intent)
    ignore_token_ids: tuple[int, ...] = ()  # ids that always score 0 (pad, EOS)

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta <= 0:
            raise ValueError(
                f"KTAEConfig: alpha and beta must be >= 0 with alpha + beta > 0, got alpha={self.alpha}, beta={self.beta}"
            )
        if self.k1 < 0 or not 0.0 <= self.b <= 1.0:
            raise ValueError(f"KTAEConfig: need k1 >= 0 and 0 <= b <= 1, got k1={self.k1}, b={self.b}")
        if self.eps < 0 or self.top < 0:
            raise ValueError(f"KTAEConfig: need eps >= 0 and top >= 0, got eps={self.eps}, top={self.top}")
        # Normalise so that configs built from lists (YAML) stay hashable: jit needs them static.
        object.__setattr__(self, "ignore_token_ids", tuple(int(i) for i in self.ignore_token_ids))


# ---------------------------------------------------------------------------------------------
# Host-side tables of the statistics that depend only on (n_c, a, b), in float64.
# ---------------------------------------------------------------------------------------------


def _log_comb(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln  # scipy is a jax dependency; only used at trace time

    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def fisher_p_table(group_size: int) -> np.ndarray:
    """Two-sided Fisher exact p-values, `p[n_c, a, b]` for a G-rollout group (n_w = G - n_c).

    Entries with a > n_c or b > n_w are not tables and hold 1.
    """
    G = group_size
    p = np.ones((G + 1, G + 1, G + 1))
    for n_c in range(G + 1):
        n_w = G - n_c
        a = np.arange(n_c + 1)[:, None, None]
        b = np.arange(n_w + 1)[None, :, None]
        x = np.arange(G + 1)[None, None, :]  # candidate top-left cells with the same margins
        row = a + b
        valid = (x <= n_c) & (row - x >= 0) & (row - x <= n_w)
        log_pmf = np.where(
            valid,
            _log_comb(n_c, np.clip(x, 0, n_c)) + _log_comb(n_w, np.clip(row - x, 0, n_w)) - _log_comb(G, row),
            -np.inf,
        )
        pmf = np.exp(log_pmf)
        observed = np.take_along_axis(pmf, np.broadcast_to(a, pmf.shape[:2] + (1,)), axis=2)
        p[n_c, : n_c + 1, : n_w + 1] = np.where(pmf <= observed * (1 + _FISHER_TIE_RTOL), pmf, 0).sum(-1)
    return np.clip(p, 0.0, 1.0)


def _binary_entropy(q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(q * np.log2(q) + (1 - q) * np.log2(1 - q))
    return np.where((q <= 0) | (q >= 1), 0.0, h)


@functools.lru_cache(maxsize=64)
def _stat_tables(group_size: int, alpha: float, beta: float, zero_fisher_at_p1: bool):
    """`weight[n_c, a, b] = (alpha F + beta IG) / (alpha + beta)` and `direction[n_c, a, b]`.

    Both are 0 where the group is not mixed or the id is absent (key 0 there), and for
    impossible (a, b).
    """
    G = group_size
    n_c = np.arange(G + 1)[:, None, None].astype(np.float64)
    a = np.arange(G + 1)[None, :, None].astype(np.float64)
    b = np.arange(G + 1)[None, None, :].astype(np.float64)
    n_w = G - n_c
    c, d = n_c - a, n_w - b

    p = fisher_p_table(G)
    fisher = np.exp(-2.0 * p)
    if zero_fisher_at_p1:
        fisher = np.where(p > 1 - _FISHER_TIE_RTOL, 0.0, fisher)

    with np.errstate(divide="ignore", invalid="ignore"):
        present, absent = a + b, c + d
        h_cond = (present / G) * _binary_entropy(np.where(present > 0, a / present, 0)) + (
            absent / G
        ) * _binary_entropy(np.where(absent > 0, c / absent, 0))
        info_gain = _binary_entropy(n_c / G) - h_cond
        direction = np.arcsin(np.sqrt(np.where(n_c > 0, a / n_c, 0))) - np.arcsin(
            np.sqrt(np.where(n_w > 0, b / n_w, 0))
        )

    weight = (alpha * fisher + beta * info_gain) / (alpha + beta)
    live = (n_c > 0) & (n_w > 0) & (a + b > 0) & (a <= n_c) & (b <= n_w)
    weight = np.where(live, weight, 0.0)
    direction = np.where(live, direction, 0.0)
    return weight.astype(np.float32), direction.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Device side: one group.
# ---------------------------------------------------------------------------------------------


class _GroupCounts:
    """Per-id counts of one group, as vocabulary-sized tables (plus one dump slot at index V)."""

    def __init__(self, tokens_GxR, mask_GxR, correct_G, vocab_size: int):
        G, _ = tokens_GxR.shape
        valid_GxR = mask_GxR.astype(bool) & (tokens_GxR >= 0) & (tokens_GxR < vocab_size)
        # Masked-out positions point at the dump slot V, which nothing reads.
        self.ids_GxR = jnp.where(valid_GxR, tokens_GxR, vocab_size).astype(jnp.int32)
        self.valid_GxR = valid_GxR
        self.vocab_size = vocab_size
        self.group_size = G
        self.n_c = jnp.sum(correct_G.astype(jnp.int32))

        # 2. Presence: count[v] = a + (G + 1) b, one rollout at a time (see module docstring).
        increment_G = jnp.where(correct_G, 1, G + 1).astype(jnp.int32)

        def add_rollout(g, presence_V):
            ids_R = self.ids_GxR[g]
            return presence_V.at[ids_R].set(presence_V[ids_R] + increment_G[g])

        # Zeros derived from the inputs, so that under shard_map the loop carry has the inputs'
        # (device-varying) type.
        zeros_V = jnp.zeros(vocab_size + 1, jnp.int32) + 0 * self.ids_GxR[0, 0]
        self.presence_V = lax.fori_loop(0, G, add_rollout, zeros_V, unroll=_UNROLL)

        # Term frequencies: masked occurrences of v in C, and over the whole group.
        correct_GxR = jnp.broadcast_to(correct_G[:, None], tokens_GxR.shape) & valid_GxR
        flat_ids = self.ids_GxR.reshape(-1)
        self.occ_all_V = jnp.zeros(vocab_size + 1, jnp.int32).at[flat_ids].add(1)
        self.occ_c_V = jnp.zeros(vocab_size + 1, jnp.int32).at[flat_ids].add(correct_GxR.reshape(-1).astype(jnp.int32))
        self.len_c = jnp.sum(correct_GxR).astype(jnp.float32)
        self.len_w = jnp.sum(valid_GxR).astype(jnp.float32) - self.len_c


def _key_from_counts(presence, occ_all, occ_c, counts: _GroupCounts, config: KTAEConfig):
    """Key scores for ids whose counts are given (any shape): step 3 and 4 of the spec."""
    G = counts.group_size
    weight_np, direction_np = _stat_tables(G, config.alpha, config.beta, config.zero_fisher_at_p1)
    a = presence % (G + 1)
    b = presence // (G + 1)
    flat_index = (counts.n_c * (G + 1) + a) * (G + 1) + b
    weight = jnp.asarray(weight_np).reshape(-1)[flat_index]
    direction = jnp.asarray(direction_np).reshape(-1)[flat_index]

    # 3. Term frequency, BM25 saturated; f = 0 where a set has no tokens (no 0/0).
    len_c, len_w = counts.len_c, counts.len_w
    avg = (len_c + len_w) / 2
    safe_avg = jnp.where(avg > 0, avg, 1.0)
    k_c = config.k1 * (1 - config.b + config.b * len_c / safe_avg)
    k_w = config.k1 * (1 - config.b + config.b * len_w / safe_avg)
    f_c = jnp.where(len_c > 0, occ_c / jnp.where(len_c > 0, len_c, 1.0), 0.0)
    f_w = jnp.where(len_w > 0, (occ_all - occ_c) / jnp.where(len_w > 0, len_w, 1.0), 0.0)

    def saturate(f, k):
        return jnp.where(f > 0, f * (config.k1 + 1) / jnp.where(f > 0, f + k, 1.0), 0.0)

    tf_c, tf_w = saturate(f_c, k_c), saturate(f_w, k_w)
    x = direction + config.gamma * (tf_c / (tf_w + _TF_SMOOTH) - tf_w / (tf_c + _TF_SMOOTH))

    # 4. Key score: top * 2 (sigmoid(s) - 1/2) = top * tanh(s / 2).
    return (config.top * jnp.tanh(weight * x / 2)).astype(jnp.float32)


def _zero_ignored(key, ids, config: KTAEConfig):
    for ignored in config.ignore_token_ids:
        key = jnp.where(ids == ignored, 0.0, key)
    return key


def _check_group_size(group_size: int):
    if not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"KTAE group_size must be in 1..{MAX_GROUP_SIZE}, got {group_size}")


@functools.partial(jax.jit, static_argnames=("vocab_size", "config"))
def key_token_scores(tokens, mask, rewards, *, vocab_size: int, config: KTAEConfig = KTAEConfig()):
    """Key score of every token id for one group: `[G, R]`, `[G, R]`, `[G]` -> `[vocab_size]` float32.

    Rollout g counts as correct where `rewards[g] > 0`: pass the grader's verdicts (0/1) when the
    rewards are shaped."""
    tokens_GxR, mask_GxR, rewards_G = jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(rewards)
    _check_group_size(tokens_GxR.shape[0])
    counts = _GroupCounts(tokens_GxR, mask_GxR, rewards_G > 0, vocab_size)
    key_V = _key_from_counts(
        counts.presence_V[:vocab_size], counts.occ_all_V[:vocab_size], counts.occ_c_V[:vocab_size], counts, config
    )
    return _zero_ignored(key_V, jnp.arange(vocab_size), config)


def _group_key_at_tokens(tokens_GxR, mask_GxR, rewards_G, vocab_size: int, config: KTAEConfig):
    """Key score of the token at every position of one group; 0 at masked-out positions."""
    counts = _GroupCounts(tokens_GxR, mask_GxR, rewards_G > 0, vocab_size)
    ids = counts.ids_GxR
    key_GxR = _key_from_counts(counts.presence_V[ids], counts.occ_all_V[ids], counts.occ_c_V[ids], counts, config)
    key_GxR = _zero_ignored(key_GxR, tokens_GxR, config)
    return jnp.where(counts.valid_GxR, key_GxR, 0.0)


@functools.partial(jax.jit, static_argnames=("group_size", "vocab_size", "config", "groups_per_chunk"))
def key_scores_at_tokens(
    tokens,
    mask,
    rewards,
    *,
    group_size: int,
    vocab_size: int,
    config: KTAEConfig = KTAEConfig(),
    groups_per_chunk: int | None = None,
):
    """`[N, R]`, `[N, R]`, `[N]` -> `[N, R]`: each position's key score within its group (0 if masked).

    The third argument decides the split (correct where > 0): the grader's verdicts, or rewards
    that are a function of them alone (0/1, +-1).
    Rows are grouped contiguously (N = P groups x G = group_size). Groups are vmapped in chunks of
    `groups_per_chunk`, which bounds the vocabulary-sized tables alive at once. The default is
    one group at a time on CPU (XLA's batched scatters are slower there than a loop) and 16 at
    a time on accelerators, where the vmapped scatters run in parallel.
    """
    if groups_per_chunk is None:
        groups_per_chunk = 1 if jax.default_backend() == "cpu" else 16
    tokens_NxR, mask_NxR, rewards_N = jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(rewards)
    N, R = tokens_NxR.shape
    _check_group_size(group_size)
    if N % group_size:
        raise ValueError(f"batch of {N} rollouts is not a whole number of groups of {group_size}")
    n_groups = N // group_size
    grouped = (
        tokens_NxR.reshape(n_groups, group_size, R),
        mask_NxR.reshape(n_groups, group_size, R),
        rewards_N.reshape(n_groups, group_size),
    )
    per_group = functools.partial(_group_key_at_tokens, vocab_size=vocab_size, config=config)
    key_PxGxR = lax.map(lambda xs: per_group(*xs), grouped, batch_size=min(groups_per_chunk, n_groups))
    return key_PxGxR.reshape(N, R)


@functools.partial(jax.jit, static_argnames=("group_size", "vocab_size", "config"))
def ktae_advantages(tokens, mask, rewards, *, group_size: int, vocab_size: int, config: KTAEConfig = KTAEConfig(),
                    correct=None):
    """Token-level KTAE advantage `mask * (A_grpo + key)`: `[N, R]`, `[N, R]`, `[N]` -> `[N, R]` float32.

    The correct/wrong split is `correct > 0` when the grader's verdicts are given, else `rewards > 0`;
    the GRPO part (`advantages.rollout_advantages`, eps = `config.eps`) uses `rewards`.
    """
    from ktae_jax.advantages import token_advantages  # advantages builds on this module

    return token_advantages(tokens, mask, rewards, correct, group_size=group_size, vocab_size=vocab_size,
                            estimator="grpo", eps=config.eps, ktae=config).advantages


@functools.partial(jax.jit, static_argnames=("vocab_size", "k"))
def strongest_key_tokens(tokens_NxR, mask_NxR, key_NxR, *, vocab_size: int, k: int):
    """KTAE diagnostics: (ids, mean key) of the k most positive and k most negative token ids of a step."""
    ids = jnp.where(mask_NxR > 0, tokens_NxR, vocab_size).reshape(-1)
    total = jnp.zeros(vocab_size + 1, jnp.float32).at[ids].add(key_NxR.reshape(-1))
    count = jnp.zeros(vocab_size + 1, jnp.float32).at[ids].add(1.0)
    mean = (total / jnp.maximum(count, 1))[:vocab_size]
    seen = count[:vocab_size] > 0
    top_vals, top_ids = jax.lax.top_k(jnp.where(seen, mean, -jnp.inf), k)
    low_vals, low_ids = jax.lax.top_k(jnp.where(seen, -mean, -jnp.inf), k)
    return top_ids, top_vals, low_ids, -low_vals
