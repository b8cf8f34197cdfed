"""Reward functions: from per-response correctness (and lengths) to the reward RL trains on.

    reward = base(correct) + overlong_penalty(length) + format_weight * has_boxed_answer

* base: "correctness" gives 1/0; "dapo" gives +1/-1 (DAPO's rule-based reward); a user
  function named by import path ("pkg.module:function") replaces the base.
* DAPO's soft overlong punishment, with L = max_response_len and B = overlong_buffer:
      0                          if length <= L - B
      -factor * (length - (L - B)) / B   if L - B < length <= L
      -factor                    if length > L
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from ktae_jax.rewards.extract import extract_boxed

# custom(responses, references, correct_N) -> N floats, replacing the base reward.
CustomRewardFn = Callable[[Sequence[str], Sequence[object], np.ndarray], Sequence[float]]


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How graded responses become rewards."""

    kind: Literal["correctness", "dapo"] = "correctness"  # 1/0 or DAPO's +1/-1
    overlong_buffer: int = 0  # B: tokens before max_response_len where the penalty ramps; 0 = off
    overlong_factor: float = 1.0  # the penalty's value at (and past) max_response_len
    max_response_len: int | None = None  # L: the rollout's generation limit (needed if B > 0)
    format_weight: float = 0.0  # added when the response has a \boxed{} answer
    custom_fn: str | None = None  # "pkg.module:function" replacing the base reward

    def __post_init__(self) -> None:
        if self.kind not in ("correctness", "dapo"):
            raise ValueError(f"reward.kind must be 'correctness' or 'dapo', got {self.kind!r}")
        if self.overlong_buffer < 0:
            raise ValueError(f"reward.overlong_buffer must be >= 0, got {self.overlong_buffer}")
        if self.overlong_buffer > 0:
            if self.max_response_len is None:
                raise ValueError("reward.max_response_len is required when overlong_buffer > 0")
            if self.overlong_buffer > self.max_response_len:
                raise ValueError(
                    f"reward.overlong_buffer ({self.overlong_buffer}) exceeds "
                    f"reward.max_response_len ({self.max_response_len})"
                )
        if self.custom_fn is not None and ":" not in self.custom_fn:
            raise ValueError(
                f"reward.custom_fn must look like 'pkg.module:function', got {self.custom_fn!r}"
            )


def load_custom_fn(path: str) -> CustomRewardFn:
    """Import `pkg.module:function`, with an error naming what is missing."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"reward.custom_fn {path!r}: cannot import {module_name!r}: {exc}")
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise AttributeError(f"reward.custom_fn {path!r}: {module_name} has no function {attr!r}")
    return fn


def overlong_penalty(lengths_N: np.ndarray, config: RewardConfig) -> np.ndarray:
    """DAPO's soft overlong punishment per response (0 when the buffer is off)."""
    lengths_N = np.asarray(lengths_N, dtype=np.float64)
    if config.overlong_buffer == 0:
        return np.zeros_like(lengths_N)
    limit, buffer = float(config.max_response_len), float(config.overlong_buffer)
    excess_N = np.clip(lengths_N - (limit - buffer), 0.0, buffer)
    return -config.overlong_factor * excess_N / buffer


def reward_parts(
    correct_N: Sequence[float],
    lengths_N: Sequence[int],
    config: RewardConfig,
    *,
    responses: Sequence[str] | None = None,
    references: Sequence[object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(base reward, final reward), float32 each: the base before any shaping term, and the final.

    KTAE's correct/wrong split reads the base (`base > 0`): for the built-in kinds that is the
    grader's verdict exactly; with `custom_fn` it is the user's own reward, and in every case a
    format bonus or an overlong penalty cannot move a response across the split."""
    correct_N = np.asarray(correct_N, dtype=np.float64)
    lengths_N = np.asarray(lengths_N)
    if correct_N.shape != lengths_N.shape or correct_N.ndim != 1:
        raise ValueError(
            f"correct and lengths must be 1-D of one length, got {correct_N.shape}"
            f" and {lengths_N.shape}"
        )
    needs_text = config.custom_fn is not None or config.format_weight != 0.0
    if needs_text and (responses is None or len(responses) != len(correct_N)):
        raise ValueError("reward.custom_fn / reward.format_weight need the response texts")

    # BASE REWARD
    if config.custom_fn is not None:
        fn = load_custom_fn(config.custom_fn)
        refs = references if references is not None else [None] * len(correct_N)
        base_N = np.asarray(fn(responses, refs, correct_N), dtype=np.float64)
        if base_N.shape != correct_N.shape:
            raise ValueError(
                f"reward.custom_fn {config.custom_fn!r} returned shape {base_N.shape},"
                f" expected {correct_N.shape}"
            )
    elif config.kind == "dapo":
        base_N = np.where(correct_N > 0, 1.0, -1.0)
    else:
        base_N = (correct_N > 0).astype(np.float64)

    # SHAPING TERMS
    reward_N = base_N + overlong_penalty(lengths_N, config)
    if config.format_weight != 0.0:
        has_box_N = np.array([extract_boxed(r) is not None for r in responses], dtype=np.float64)
        reward_N = reward_N + config.format_weight * has_box_N
    return base_N.astype(np.float32), reward_N.astype(np.float32)
