"""Advantage estimators the trainer chooses from: pure functions of rewards (and tokens) over groups.

Rows are grouped contiguously: the G rollouts of prompt i are rows i*G .. i*G + G - 1.

Rollout-level estimators (one number per rollout):
  * ``grpo``:    (r - mean_group) / (std_group + eps), unbiased std (ddof = 1) as the paper's code;
  * ``drgrpo``:  r - mean_group (Dr.GRPO: no division by the std);
  * ``rloo``:    r - mean of the *other* rollouts of the group = G / (G - 1) (r - mean_group).
A group of one rollout has no baseline: advantage 0.

Token-level: ``token_advantages`` broadcasts the rollout advantage over the response mask and,
when a `KTAEConfig` is given, adds each token's KTAE key score. GRPO+KTAE, DAPO+KTAE (GRPO
estimator, DAPO loss and rewards) and Dr.GRPO+KTAE are then one setting each.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from ktae_jax.ktae import KTAEConfig, grpo_advantages, key_scores_at_tokens

Estimator = Literal["grpo", "drgrpo", "rloo"]
ESTIMATORS: tuple[str, ...] = ("grpo", "drgrpo", "rloo")


def rollout_advantages(rewards, *, group_size: int, estimator: Estimator = "grpo", eps: float = 1e-6):
    """`[B]` rewards -> `[B]` float32 rollout-level advantages."""
    if estimator == "grpo":
        return grpo_advantages(rewards, group_size=group_size, eps=eps)
    rewards_NxG = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
    if group_size == 1:
        return jnp.zeros(rewards_NxG.size, jnp.float32)
    centred_NxG = rewards_NxG - rewards_NxG.mean(axis=1, keepdims=True)
    if estimator == "drgrpo":
        return centred_NxG.reshape(-1)
    if estimator == "rloo":
        return (centred_NxG * (group_size / (group_size - 1))).reshape(-1)
    raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {ESTIMATORS}")


@functools.partial(
    jax.jit, static_argnames=("group_size", "vocab_size", "estimator", "eps", "ktae", "mesh", "batch_axes")
)
def token_advantages(
    tokens,
    mask,
    rewards,
    *,
    group_size: int,
    vocab_size: int,
    estimator: Estimator = "grpo",
    eps: float = 1e-6,
    ktae: KTAEConfig | None = None,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
):
    """`[B, L]`, `[B, L]`, `[B]` -> `[B, L]`: mask * (rollout advantage [+ KTAE key score]).

    With a mesh, the KTAE statistics run under `shard_map` with the batch split over
    `batch_axes`: each device scores only its own groups, which must therefore be whole
    (rows per device a multiple of `group_size`); no group is ever split across devices.
    """
    mask_BxL = jnp.asarray(mask)
    rollout_B = rollout_advantages(rewards, group_size=group_size, estimator=estimator, eps=eps)
    adv_BxL = jnp.broadcast_to(rollout_B[:, None], mask_BxL.shape)
    if ktae is not None:
        score = functools.partial(key_scores_at_tokens, group_size=group_size, vocab_size=vocab_size, config=ktae)
        if mesh is not None:
            score = shard_over_groups(score, mesh, batch_axes, group_size, batch=mask_BxL.shape[0])
        adv_BxL = adv_BxL + score(tokens, mask_BxL, rewards)
    return jnp.where(mask_BxL.astype(bool), adv_BxL, 0.0).astype(jnp.float32)


def shard_over_groups(fn, mesh: Mesh, batch_axes: tuple[str, ...], group_size: int, *, batch: int):
    """Wrap a per-row function of `[B, ...]` arrays so each device runs it on its own whole groups."""
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
