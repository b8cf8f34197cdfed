"""The decode engine behind `ktae_jax.sample`: continuous batching of response rows over decode slots.

Letters: P prompts, Tp prompt columns (left-padded), N rows (P x G, row n answers prompt n // G),
R = max_new_tokens, W decode slots (the current width), V vocabulary, S = Tp + R cache slots.

A slot holds one row at a time; every loop iteration gives each live slot one token:
  1. CHOOSE   a token from the slot's logits (uniform draw keyed by (row, position), so the draw of
              a row does not depend on which slot serves it or when); write it to the row's output.
  2. FORWARD  the chosen tokens one position (`KVCache` with per-row indices: each slot writes at
              its own position; attention reads only the written prefix of the cache).
  3. REFILL   slots whose row stopped take the next waiting rows: the prompt's prefilled keys are
              copied into the slot's first Tp cache slots and its first logits are the prompt's.
The program runs in phases of fixed shapes. The cache starts with room for 64 response tokens
and grows 2x (to R) only when a live row needs it, so short responses never pay for a long R.
Then, when no rows wait and at most half the slots are live, the live slots are packed into a
batch of half the width (down to a quarter), so the long tail of a long-tailed length
distribution runs on a smaller batch. Everything runs in one jitted program.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ktae_jax.models.transformer import KVCache, Transformer, init_cache

Array = jax.Array
# (logits [W, V], uniforms [W, 1]) -> (tokens [W], sampling logp [W], policy logp [W])
Choose = Callable[[Array, Array], tuple[Array, Array, Array]]
Place = Callable[[Array], Array]


class Prompts(NamedTuple):
    """Each distinct prompt prefilled once; rows copy from here when they enter a slot."""

    k: Array  # [L, P, KV, Tp, D]
    v: Array
    mask: Array  # [P, Tp] bool
    length: Array  # [P] int32 real tokens (the rotary position of the first response token)
    logits: Array  # [P, V] float32 logits of the first response token


class Outputs(NamedTuple):
    tokens: Array  # [N, R] int32
    mask: Array  # [N, R] int32
    logp: Array  # [N, R] float32
    policy_logp: Array  # [N, R] float32


class Slots(NamedTuple):
    cache: KVCache  # k/v [L, W, KV, S, D]; index [W] = Tp + j
    row: Array  # [W] int32 row served (meaningless where not live)
    j: Array  # [W] int32 tokens the row has so far
    logits: Array  # [W, V] logits for the row's token j
    live: Array  # [W] bool


class Loop(NamedTuple):
    slots: Slots
    out: Outputs
    next_row: Array  # int32: rows below it have entered a slot
    slot_steps: Array  # int32: sum over iterations of the width
    steps: Array  # int32: iterations


class Limits(NamedTuple):
    """Static facts of a call: rows, R, group size, stop ids, pad id."""

    rows: int
    max_new: int
    group: int
    eos: tuple[int, ...]
    pad_id: int


def prefill(model: Transformer, ids_PxTp: Array, mask_PxTp: Array) -> Prompts:
    """PREFILL each prompt once into a cache of exactly Tp slots."""
    p, tp = ids_PxTp.shape
    hidden, cache = model.hidden(ids_PxTp, mask_PxTp, cache=init_cache(model.config, p, tp, model.dtype))
    # Left padding: the last column is each prompt's last token; only its logits are needed.
    logits = model.logits(hidden[:, -1:])[:, 0]
    return Prompts(cache.k, cache.v, mask_PxTp.astype(bool), mask_PxTp.sum(-1).astype(jnp.int32), logits)


def _refill(slots: Slots, prompts: Prompts, next_row: Array, lim: Limits, place: Place) -> tuple[Slots, Array]:
    """REFILL free slots with the next waiting rows, in row order."""
    free = ~slots.live
    rank = jnp.cumsum(free, dtype=jnp.int32) - 1
    take = free & (next_row + rank < lim.rows)
    row = jnp.where(take, next_row + rank, slots.row)
    p = jnp.clip(row // lim.group, 0, prompts.mask.shape[0] - 1)
    tp = prompts.mask.shape[1]

    place_l = jax.vmap(place)  # rows are axis 1 of [L, W, ...]

    def into(buf_LxWxKVxSxD: Array, prompt_LxPxKVxTpxD: Array) -> Array:
        # Pinned to the slots' split, so that only the gathered prompts move, not the slots' cache.
        gathered = place_l(prompt_LxPxKVxTpxD[:, p].astype(buf_LxWxKVxSxD.dtype))
        head = place_l(jnp.where(take[None, :, None, None, None], gathered, buf_LxWxKVxSxD[:, :, :, :tp]))
        return place_l(jax.lax.dynamic_update_slice(buf_LxWxKVxSxD, head, (0, 0, 0, 0, 0)))

    c = slots.cache
    key_head = jnp.where(take[:, None], prompts.mask[p], c.key_mask[:, :tp])
    cache = KVCache(into(c.k, prompts.k), into(c.v, prompts.v),
                    jax.lax.dynamic_update_slice(c.key_mask, key_head, (0, 0)), jnp.where(take, tp, c.index))
    slots = Slots(cache, row, jnp.where(take, 0, slots.j), jnp.where(take[:, None], prompts.logits[p], slots.logits),
                  slots.live | take)
    return slots, next_row + jnp.sum(take, dtype=jnp.int32)


def _iteration(model: Transformer, choose: Choose, key: Array, prompts: Prompts, stop_len_N: Array,
               lim: Limits, place: Place, loop: Loop) -> Loop:
    s, out = loop.slots, loop.out
    # 1. CHOOSE
    keys = jax.vmap(lambda r, j: jax.random.fold_in(jax.random.fold_in(key, r), j))(s.row, s.j)
    u = jax.vmap(lambda k: jax.random.uniform(k, (1,)))(keys)
    tok, lp, plp = choose(s.logits, u)
    tok = jnp.where(s.live, tok, lim.pad_id)
    at = (jnp.where(s.live, s.row, lim.rows), s.j)  # row N: out of bounds, dropped
    put = lambda buf, val: buf.at[at].set(val.astype(buf.dtype), mode="drop")  # noqa: E731
    out = Outputs(put(out.tokens, tok), put(out.mask, jnp.ones_like(tok)), put(out.logp, lp), put(out.policy_logp, plp))
    j = s.j + 1
    stop = (jnp.isin(tok, jnp.asarray(lim.eos or (-1,), jnp.int32)) | (j >= lim.max_new)
            | (j >= stop_len_N[jnp.clip(s.row, 0, lim.rows - 1)]))
    live = s.live & ~stop
    # 2. FORWARD (every slot: a batch of fixed width; stopped slots' results are never read)
    positions = (prompts.length[jnp.clip(s.row // lim.group, 0, prompts.length.shape[0] - 1)] + s.j)[:, None]
    logits, cache = model(tok[:, None], jnp.ones_like(tok)[:, None], positions=positions, cache=s.cache)
    slots = Slots(cache, s.row, j, place(logits[:, 0]), live)
    # 3. REFILL (only when a slot is free and a row waits)
    slots, next_row = jax.lax.cond(
        jnp.any(~live) & (loop.next_row < lim.rows),
        lambda sl, nr: _refill(sl, prompts, nr, lim, place), lambda sl, nr: (sl, nr), slots, loop.next_row)
    return Loop(slots, out, next_row, loop.slot_steps + live.shape[0], loop.steps + 1)


def _pack(slots: Slots, width: int, place: Place) -> Slots:
    """The live slots first, cut to `width` (the caller checked that they fit)."""
    order = jnp.argsort(~slots.live, stable=True)[:width]
    take = lambda x: place(x[order])  # noqa: E731
    take_l = lambda x: jax.vmap(place)(x[:, order])  # noqa: E731  (rows are axis 1 of [L, W, ...])
    c = slots.cache
    cache = KVCache(take_l(c.k), take_l(c.v), take(c.key_mask), take(c.index))
    return Slots(cache, take(slots.row), take(slots.j), take(slots.logits), take(slots.live))


def widths(slots: int, batch_devices: int) -> list[int]:
    """The widths the engine runs at: halving from `slots` to a quarter, each a multiple of the devices."""
    out = [slots]
    while len(out) < 3 and out[-1] % 2 == 0 and (out[-1] // 2) % batch_devices == 0:
        out.append(out[-1] // 2)
    return out


def cache_lengths(prompt_len: int, max_new: int) -> list[int]:
    """The cache lengths the engine grows through: room for 64, 128, 256, ... response tokens, then R.

    A cache is only as long as the longest live row needs (within 2x), and attention reads the
    whole cache: a step's cost follows the longest live row, not R, and a call whose responses
    stop early never allocates, zeroes or reads a cache for R tokens."""
    out, room = [], _FIRST_ROOM
    while room < max_new:
        out.append(prompt_len + room)
        room *= 2
    return out + [prompt_len + max_new]


_FIRST_ROOM = 64


class Phase(NamedTuple):
    width: int  # W
    length: int  # cache slots


def _grow(slots: Slots, length: int, place: Place) -> Slots:
    """The same slots with a cache of `length` slots (the new ones empty)."""
    c = slots.cache
    pad = lambda x: jax.vmap(place)(jnp.pad(x, [(0, 0), (0, 0), (0, 0), (0, length - x.shape[3]), (0, 0)]))  # noqa: E731
    key_mask = place(jnp.pad(c.key_mask, [(0, 0), (0, length - c.key_mask.shape[1])]))
    return slots._replace(cache=KVCache(pad(c.k), pad(c.v), key_mask, c.index))


def _run(phases: list[Phase], body: Callable[[Loop], Loop], rows: int, tp: int, place: Place, loop: Loop) -> Loop:
    """Phase 0's loop, then (only while rows remain) the next phase's, recursively.

    A phase ends when a live row needs a longer cache than the phase has, or when no row waits
    and the live rows fit the next phase's smaller width."""
    (width, length), rest = phases[0], phases[1:]
    grows = bool(rest) and rest[0].length > length
    shrinks = bool(rest) and rest[0].width < width

    def more(l: Loop) -> Array:
        live = l.slots.live
        go = jnp.any(live)
        if grows:
            go &= ~jnp.any(live & (tp + l.slots.j >= length))
        if shrinks:
            go &= (l.next_row < rows) | (jnp.sum(live) > rest[0].width)
        return go

    loop = jax.lax.while_loop(more, body, loop)
    if not rest:
        return loop

    def next_phase(l: Loop) -> Loop:
        slots = _grow(l.slots, rest[0].length, place) if grows else _pack(l.slots, rest[0].width, place)
        return _finished(_run(rest, body, rows, tp, place, l._replace(slots=slots)))

    return jax.lax.cond(jnp.any(loop.slots.live), next_phase, _finished, loop)


def _finished(loop: Loop) -> Loop:
    """What a phase hands back: the outputs and counters (the slots' shapes differ between phases)."""
    return loop._replace(slots=None)


def decode(
    model: Transformer, prompts: Prompts, key: Array, choose: Choose, lim: Limits, *,
    slots: int, batch_devices: int = 1, stop_len_N: Array | None = None, place: Place = lambda x: x,
) -> tuple[Outputs, Array, Array]:
    """All N rows decoded over `slots` slots. Returns the outputs, the slot-steps and iterations spent.

    `stop_len_N` forces row n to stop after that many tokens (benchmarks: a random model never
    emits a stop id of its own); None: only stop ids and R stop a row."""
    n, r = lim.rows, lim.max_new
    tp = prompts.mask.shape[1]
    lengths = cache_lengths(tp, r)
    phases = [Phase(slots, length) for length in lengths] + [Phase(w, lengths[-1]) for w in widths(slots, batch_devices)[1:]]
    stop_len_N = jnp.full((n,), r, jnp.int32) if stop_len_N is None else stop_len_N.astype(jnp.int32)
    cache = init_cache(model.config, slots, lengths[0], model.dtype)
    cache = KVCache(jax.vmap(place)(cache.k), jax.vmap(place)(cache.v), place(cache.key_mask),
                    place(jnp.full((slots,), tp, jnp.int32)))
    zeros_W = place(jnp.zeros((slots,), jnp.int32))
    empty = Slots(cache, zeros_W, zeros_W, place(jnp.zeros((slots, prompts.logits.shape[1]), jnp.float32)),
                  zeros_W.astype(bool))
    out = Outputs(jnp.full((n, r), lim.pad_id, jnp.int32), jnp.zeros((n, r), jnp.int32),
                  jnp.zeros((n, r), jnp.float32), jnp.zeros((n, r), jnp.float32))
    first, next_row = _refill(empty, prompts, jnp.zeros((), jnp.int32), lim, place)
    zero = jnp.zeros((), jnp.int32)
    body = functools.partial(_iteration, model, choose, key, prompts, stop_len_N, lim, place)
    loop = _run(phases, body, n, tp, place, Loop(first, out, next_row, zero, zero))
    return loop.out, loop.slot_steps, loop.steps
