"""The sampler as it was before the decode engine (commit 85e5139), kept as the benchmark's baseline.

One static batch of all P x G rows, decoded in a `lax.while_loop` until the longest row stops,
each step attending over every slot of a Tp + R cache (a shared scalar cache index).
`stop_lengths_N` forces row n to stop after that many tokens, as in `ktae_jax.sample`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ktae_jax.models.kv_cache import KVCache, init_cache
from ktae_jax.sample import Rollout, SamplingConfig, choose_tokens

Array = jax.Array


class _Loop(NamedTuple):
    step: Array
    logits: Array
    cache: KVCache
    done: Array
    tokens: Array
    mask: Array
    logp: Array
    policy_logp: Array


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def baseline_sample(graphdef, state, prompt_ids_PxT, prompt_mask_PxT, key, stop_lengths_N, *,
                    config: SamplingConfig) -> Rollout:
    model = nnx.merge(graphdef, state)
    p, tp = prompt_ids_PxT.shape
    g, r = config.num_samples, config.max_new_tokens
    n = p * g
    eos = jnp.asarray(config.eos_ids or (-1,), jnp.int32)
    cache = init_cache(model.config, p, tp + r, model.dtype)
    hidden, cache = model.hidden(prompt_ids_PxT, prompt_mask_PxT, cache=cache)
    cache = cache.repeat_rows(g)
    logits = jnp.repeat(model.logits(hidden[:, -1:])[:, 0], g, axis=0)

    def pick(loop: _Loop) -> _Loop:
        tok, lp, plp = choose_tokens(loop.logits, jax.random.fold_in(key, loop.step), config)
        live = ~loop.done
        tok = jnp.where(live, tok, config.pad_id)
        col = lambda buf, val: jax.lax.dynamic_update_slice(buf, val[:, None], (0, loop.step))  # noqa: E731
        stop = jnp.any(tok[:, None] == eos[None, :], axis=-1) | (loop.step + 1 >= stop_lengths_N)
        return loop._replace(
            step=loop.step + 1, done=loop.done | stop, tokens=col(loop.tokens, tok),
            mask=col(loop.mask, live.astype(jnp.int32)), logp=col(loop.logp, jnp.where(live, lp, 0.0)),
            policy_logp=col(loop.policy_logp, jnp.where(live, plp, 0.0)))

    def body(loop: _Loop) -> _Loop:
        last = jax.lax.dynamic_slice_in_dim(loop.tokens, loop.step - 1, 1, axis=1)
        step_logits, new_cache = model(last, jnp.ones_like(last), cache=loop.cache)
        return pick(loop._replace(logits=step_logits[:, 0], cache=new_cache))

    zeros = lambda dtype: jnp.zeros((n, r), dtype)  # noqa: E731
    loop = _Loop(jnp.zeros((), jnp.int32), logits, cache, jnp.zeros((n,), bool), zeros(jnp.int32) + config.pad_id,
                 zeros(jnp.int32), zeros(jnp.float32), zeros(jnp.float32))
    loop = jax.lax.while_loop(lambda l: (l.step < r) & ~jnp.all(l.done), body, pick(loop))
    steps = loop.step - 1
    return Rollout(loop.tokens, loop.mask, loop.logp, loop.policy_logp, loop.mask.sum(-1).astype(jnp.int32),
                   n * loop.step, steps)
