"""Rewards: answer extraction, equivalence grading in a bounded process pool, reward shaping.

Host side (any answer):   `grade_batch`, `GraderPool` (+ `GradeResult`), then
                          `compute_rewards(correct, lengths, RewardConfig(...))`.
Device side (exact-token answers, inside jit): `exact_match_reward`.
"""

from ktae_jax.rewards.equivalence import (
    answer_matches_any,
    grade_response,
    reference_candidates,
)
from ktae_jax.rewards.extract import extract_boxed
from ktae_jax.rewards.functions import RewardConfig, compute_rewards, overlong_penalty, reward_parts
from ktae_jax.rewards.pool import GradeResult, GraderPool, grade_batch, shared_pool


def __getattr__(name: str):
    # Lazy: grading workers import this package and must not pay for (or run) jax.
    if name == "exact_match_reward":
        from ktae_jax.rewards.device import exact_match_reward

        return exact_match_reward
    raise AttributeError(f"module 'ktae_jax.rewards' has no attribute {name!r}")


__all__ = [
    "GradeResult",
    "GraderPool",
    "RewardConfig",
    "answer_matches_any",
    "compute_rewards",
    "reward_parts",
    "exact_match_reward",
    "extract_boxed",
    "grade_batch",
    "grade_response",
    "overlong_penalty",
    "reference_candidates",
    "shared_pool",
]
