"""Advantage estimators the trainer chooses from: pure functions of rewards (and tokens) over groups.

Rows are grouped contiguously: the G rollouts of prompt i are rows i*G .. i*G + G - 1.
Letters: N rollouts (rows), P groups (one per prompt) of G rollouts, R response columns.

Rollout-level estimators (one number per rollout), every one of them in this module only:
  * ``grpo``:    (r - mean_group) / (std_group + eps), unbiased std (ddof = 1) as the paper's code;
  * ``drgrpo``:  r - mean_group (Dr.GRPO: no division by the std);
  * ``rloo``:    r - mean of the *other* rollouts of the group = G / (G - 1) (r - mean_group).
A group of one rollout has no baseline: advantage 0.

Uniform and near-uniform groups. A group whose rewards are all equal carries no signal: its
advantage is exactly 0 for every estimator (and KTAE adds nothing to it), whatever the value and
G, jitted or not. Computing the mean naively does not give that: under `jit` XLA turns "divide by
G" into "multiply by 1/G", the mean of G equal floats lands one rounding step off, and dividing
that residue by `std + eps` ~ eps makes it large (|A| up to 0.26 for G = 64 rewards of -1.3).
So each group is centred on one of its own members first (d = r - r[0], exact) and the mean and
std are taken over d: a uniform group has d = 0 exactly (and is also zeroed explicitly, so no
compiler rewrite can bring the residue back). A near-uniform group's spread may lie far below
the float32 resolution of its mean (rewards 1e6 and 1e6 + 0.0625); differences of nearby floats
are exact (Sterbenz), so that spread is still resolved: the advantages equal a float64
computation on the same float32 rewards up to float32 rounding of the result (tested). When the
std is below eps (1e-6) the division is by ~eps, so GRPO's advantages there are small, (r - mean)
/ eps in size, not amplified noise.

Token-level: ``token_advantages`` broadcasts the rollout advantage over the response mask and,
when a `KTAEConfig` is given, adds each token's KTAE key score (`ktae.key_scores_at_tokens`),
returning both the total and the KTAE part. KTAE splits a group into correct and wrong rollouts
by the grader's verdict (`correct`) while the rollout-level advantage uses the shaped reward;
without a verdict, `reward > 0` stands in (exact for the paper's 0/1 and +-1 rewards). GRPO+KTAE,
DAPO+KTAE (GRPO estimator, DAPO loss and rewards) and Dr.GRPO+KTAE are then one setting each.
"""

from __future__ import annotations

import functools
import typing
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from ktae_jax.ktae import KTAEConfig, key_scores_at_tokens
from ktae_jax.mesh import BATCH_AXES

Estimator = Literal["grpo", "drgrpo", "rloo"]
ESTIMATORS: tuple[str, ...] = typing.get_args(Estimator)


class TokenAdvantages(NamedTuple):
    """What the update trains on, and the KTAE part of it for the diagnostics."""

    advantages: jax.Array  # [N, R] float32: mask * (rollout advantage + key score)
    key_scores: jax.Array | None  # [N, R] float32 KTAE key scores (0 where masked); None without KTAE


def _centred(rewards_PxG):
    """(r - group mean, group is uniform): centred about a member of the group (see the docstring)."""
    shifted_PxG = rewards_PxG - rewards_PxG[:, :1]
    uniform_Px1 = jnp.all(shifted_PxG == 0, axis=1, keepdims=True)
    centred_PxG = shifted_PxG - shifted_PxG.mean(axis=1, keepdims=True)
    return jnp.where(uniform_Px1, 0.0, centred_PxG), uniform_Px1


def rollout_advantages(rewards, *, group_size: int, estimator: Estimator = "grpo", eps: float = 1e-6):
    """`[N]` rewards -> `[N]` float32 rollout-level advantages (exactly 0 for uniform groups)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {ESTIMATORS}")
    rewards_N = jnp.asarray(rewards, jnp.float32)
    if group_size < 1 or rewards_N.ndim != 1 or rewards_N.shape[0] % group_size:
        raise ValueError(f"a batch of {rewards_N.size} rewards (shape {rewards_N.shape}) is not a whole number of groups "
                         f"of {group_size}")
    rewards_PxG = rewards_N.reshape(-1, group_size)
    if group_size == 1:
        return jnp.zeros(rewards_PxG.size, jnp.float32)
    centred_PxG, uniform_Px1 = _centred(rewards_PxG)
    if estimator == "drgrpo":
        return centred_PxG.reshape(-1)
    if estimator == "rloo":
        return (centred_PxG * (group_size / (group_size - 1))).reshape(-1)
    std_Px1 = jnp.sqrt(jnp.sum(centred_PxG**2, axis=1, keepdims=True) / (group_size - 1))
    denominator_Px1 = jnp.where(uniform_Px1, 1.0, std_Px1 + eps)  # eps = 0 and a uniform group: no 0 / 0
    return (centred_PxG / denominator_Px1).reshape(-1)


def uniform_rows(rewards, *, group_size: int):
    """`[N]` bool: the row's group has all rewards equal (no signal: no advantage, no key score)."""
    rewards_PxG = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
    uniform_Px1 = jnp.all(rewards_PxG == rewards_PxG[:, :1], axis=1, keepdims=True)
    return jnp.broadcast_to(uniform_Px1, rewards_PxG.shape).reshape(-1)


@functools.partial(
    jax.jit, static_argnames=("group_size", "vocab_size", "estimator", "eps", "ktae", "mesh", "batch_axes")
)
def token_advantages(
    tokens,
    mask,
    rewards,
    correct=None,
    *,
    group_size: int,
    vocab_size: int,
    estimator: Estimator = "grpo",
    eps: float = 1e-6,
    ktae: KTAEConfig | None = None,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = BATCH_AXES,
) -> TokenAdvantages:
    """`[N, R]` tokens, `[N, R]` mask, `[N]` shaped rewards, `[N]` verdicts (optional) -> `TokenAdvantages`.

    `advantages = mask * (rollout advantage [+ KTAE key score])`. KTAE's correct/wrong split is
    `correct > 0` (the grader's verdict), or `rewards > 0` when no verdict is given. Groups whose
    rewards are all equal get exactly 0, key score included.

    With a mesh, the KTAE statistics run under `shard_map` with the batch split over
    `batch_axes`: each device scores only its own groups, which must therefore be whole
    (rows per device a multiple of `group_size`); no group is ever split across devices.
    """
    mask_NxR = jnp.asarray(mask).astype(bool)
    rollout_N = rollout_advantages(rewards, group_size=group_size, estimator=estimator, eps=eps)
    adv_NxR = jnp.broadcast_to(rollout_N[:, None], mask_NxR.shape)
    key_NxR = None
    if ktae is not None:
        verdict_N = jnp.asarray(rewards if correct is None else correct, jnp.float32)
        score = functools.partial(key_scores_at_tokens, group_size=group_size, vocab_size=vocab_size, config=ktae)
        if mesh is not None:
            score = shard_over_groups(score, mesh, batch_axes, group_size, batch=mask_NxR.shape[0])
        key_NxR = score(tokens, mask_NxR, verdict_N)
        silent_N = uniform_rows(rewards, group_size=group_size)
        key_NxR = jnp.where(mask_NxR & ~silent_N[:, None], key_NxR, 0.0).astype(jnp.float32)
        adv_NxR = adv_NxR + key_NxR
    return TokenAdvantages(jnp.where(mask_NxR, adv_NxR, 0.0).astype(jnp.float32), key_NxR)


def shard_over_groups(fn, mesh: Mesh, batch_axes: tuple[str, ...], group_size: int, *, batch: int):
    """Wrap a per-row function of `[N, ...]` arrays so each device runs it on its own whole groups."""
    axes = tuple(a for a in batch_axes if a in mesh.shape)
    shards = 1
    for axis in axes:
        shards *= mesh.shape[axis]
    if batch % shards or (batch // shards) % group_size:
        raise ValueError(
            f"cannot split {batch} rollouts over {shards} devices ({'x'.join(axes)}) in whole groups of {group_size}"
        )
    spec = PartitionSpec(axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
