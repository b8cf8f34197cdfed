"""Rewards: answer extraction, equivalence grading in a bounded process pool, reward shaping.

`grade_batch`, `GraderPool` (+ `GradeResult`) grade on the host (any answer, each within a time
limit); then `reward_parts(correct, lengths, RewardConfig(...))` gives the base and final rewards. The package imports no jax:
grading workers import it.
"""

from ktae_jax.rewards.equivalence import (
    answer_matches_any,
    grade_response,
    reference_candidates,
)
from ktae_jax.rewards.extract import extract_boxed
from ktae_jax.rewards.functions import RewardConfig, overlong_penalty, reward_parts
from ktae_jax.rewards.pool import GradeResult, GraderPool, grade_batch, shared_pool

__all__ = [
    "GradeResult",
    "GraderPool",
    "RewardConfig",
    "answer_matches_any",
    "reward_parts",
    "extract_boxed",
    "grade_batch",
    "grade_response",
    "overlong_penalty",
    "reference_candidates",
    "shared_pool",
]
