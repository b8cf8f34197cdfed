"""On-device exact-match reward: the boxed answer's tokens equal the reference's tokens.

For tasks whose answers are exact strings or integers (the tiny synthetic task), grading can
stay inside the jitted step: no host round trip, no pool. The answer is the tokens after the
*last* occurrence of the `\\boxed{` token sequence up to the first closing token after it
(any of `close_ids`, since BPE vocabularies also have merged tokens like `}$`). Nested
braces and brace-less `\\boxed 5` are not read here: such answers need the host grader.

Shapes: B rows, T response tokens, R reference tokens (padded; `ref_len_B` valid ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def exact_match_reward(
    tokens_BxT: jax.Array,
    mask_BxT: jax.Array,
    ref_BxR: jax.Array,
    ref_len_B: jax.Array,
    open_ids: Sequence[int],
    close_ids: Sequence[int],
) -> jax.Array:
    """1.0 where the last boxed answer's tokens equal the reference's, else 0.0 (float32 [B]).

    `open_ids` and `close_ids` are static (Python ints); wrap with `functools.partial` before
    `jax.jit`, or call from inside a jitted function.
    """
    open_ids, close_ids = tuple(int(i) for i in open_ids), tuple(int(i) for i in close_ids)
    if not open_ids or not close_ids:
        raise ValueError("open_ids and close_ids must each hold at least one token id")
    B, T = tokens_BxT.shape
    R = ref_BxR.shape[1]
    K = len(open_ids)
    valid_BxT = mask_BxT.astype(bool)
    t_T = jnp.arange(T)

    # 1. Where does the opening sequence start? (all K tokens present and unmasked)
    pad = jnp.full((B, K), -1, tokens_BxT.dtype)
    tok_pad_BxTK = jnp.concatenate([jnp.where(valid_BxT, tokens_BxT, -1), pad], axis=1)
    opens_BxT = jnp.ones((B, T), bool)
    for k, oid in enumerate(open_ids):
        opens_BxT &= tok_pad_BxTK[:, k : k + T] == oid
    last_open_B = jnp.max(jnp.where(opens_BxT, t_T, -1), axis=1)
    start_B = last_open_B + K

    # 2. The first closing token after it.
    closes_BxT = jnp.isin(tokens_BxT, jnp.asarray(close_ids)) & valid_BxT
    after_BxT = t_T[None, :] >= start_B[:, None]
    close_B = jnp.min(jnp.where(closes_BxT & after_BxT, t_T, T), axis=1)
    found_B = (last_open_B >= 0) & (close_B < T)

    # 3. Same length, same tokens.
    idx_BxR = jnp.clip(start_B[:, None] + jnp.arange(R)[None, :], 0, T - 1)
    answer_BxR = jnp.take_along_axis(tokens_BxT, idx_BxR, axis=1)
    in_ref_BxR = jnp.arange(R)[None, :] < ref_len_B[:, None]
    same_B = jnp.all((answer_BxR == ref_BxR) | ~in_ref_BxR, axis=1)
    return (found_B & (close_B - start_B == ref_len_B) & same_B).astype(jnp.float32)
