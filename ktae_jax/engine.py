"""The decode engine behind `ktae_jax.sample`: continuous batching of response rows over decode slots.

Letters: P prompts, Tp prompt columns (left-padded), N rows (P x G, row n answers prompt n // G),
R = max_new_tokens, V vocabulary, S = Tp + R cache slots, Gr groups (the batch devices: 1 without
a mesh), W decode slots in all (Gr x Wg), w the current width (Gr x wg), s the current cache length.

Each group is one device's share of the work: its P / Gr prompts (the prompts' batch split), their
rows and W / Gr slots, so that no step moves keys between devices. A slot holds one row at a time;
every loop iteration gives each live slot one token:
  1. CHOOSE   a token from the slot's logits (uniform draw keyed by (row, position), so the draw of
              a row does not depend on which slot serves it or when); write it to the row's output.
  2. FORWARD  the chosen tokens one position (`KVCache` with per-row indices: each slot writes at
              its own position; attention reads only the current view of the cache, and past its
              first block, on CPU, each row only up to its own position: `ModelOptions.decode_attention`).
  3. REFILL   slots whose row stopped take their group's next waiting rows: the prompt's prefilled
              keys are copied into the slot's first Tp cache slots, its first logits are the prompt's.
The keys and values live in one buffer [L, Gr, Wg, KV, S, D] for the whole call, updated in place,
made in two blocks along S: the first s0 = Tp + 64 slots, and the rest, made only when a row
outgrows the first (rows that all stop within 64 tokens never pay for a cache of Tp + R).
The program runs in phases of static shapes, each a view of that buffer: the first wg slots of
each group and the first s cache slots. The view starts with room for 64 response tokens and grows
2x (to R) only when a live row needs it, so a step's attention cost follows the longest live row
(each row's own length with ragged decode attention), not R. Then, when no rows wait and every
group's live slots fit half the width, each group packs its live slots to the front (in place, one
layer at a time) and the view narrows (down to a quarter, and never below `min_slots_per_device`),
so the long tail of a long-tailed length distribution runs on a smaller batch.
(Phases with their own cache per length or width kept every phase's cache, and gathers of the
slots across devices kept whole copies on every device: 190 GiB per H100 at 7B, issue #14.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ktae_jax.models.kv_cache import Blocks, KVCache, init_cache
from ktae_jax.models.transformer import Transformer

Array = jax.Array
# (logits [B, V], uniforms [B, 1]) -> (tokens [B], sampling logp [B], policy logp [B])
Choose = Callable[[Array, Array], tuple[Array, Array, Array]]
Place = Callable[[Array], Array]


class Prompts(NamedTuple):
    """A call's prompts by group, prefilled a chunk of c prompts per group at a time into a ring of
    Q = c or 2c prompts (rows copy their prompt's keys from the ring when they enter a slot).

    Rows enter in order and a chunk has at least as many rows as a group has slots, so the rows
    that may enter at once span at most two chunks: the ring holds the last two, and the prompts'
    keys take 2c prompts' room per device, not P / Gr (7 GiB per H100 at 7B with 1,024 prompts)."""

    ids: Array  # [Gr, Pc, Tp] int32 the group's prompts, padded with empty ones to whole chunks
    mask: Array  # [Gr, Pc, Tp] bool
    length: Array  # [Gr, Pc] int32 real tokens (the rotary position of the first response token)
    k: Array  # [L, Gr, Q, KV, Tp, D] the ring: local prompt q at (q // c) % (Q // c) * c + q % c
    v: Array
    logits: Array  # [Gr, Q, V] float32 logits of the prompt's first response token
    chunks: Array  # int32: chunks prefilled (prompts [0, chunks * c) of every group)


class Outputs(NamedTuple):
    tokens: Array  # [N, R] int32 ([Gr, N / Gr, R] inside the engine)
    mask: Array  # [N, R] int32
    logp: Array  # [N, R] float32
    policy_logp: Array  # [N, R] float32


class Slots(NamedTuple):
    """The slots of the current view; every per-slot array is [Gr, wg, ...]."""

    k: Blocks  # [L, Gr, Wg, KV, S, D] the one buffer in blocks along S (the view: [:, :, :wg, :, :s])
    v: Blocks
    key_mask: Array  # [Gr, wg, s] bool
    index: Array  # [Gr, wg] int32 next cache slot (Tp + j)
    row: Array  # [Gr, wg] int32 row of the group served (meaningless where not live)
    j: Array  # [Gr, wg] int32 tokens the row has so far
    logits: Array  # [Gr, wg, V] logits for the row's token j
    live: Array  # [Gr, wg] bool


class Loop(NamedTuple):
    slots: Slots
    prompts: Prompts
    out: Outputs
    next_row: Array  # [Gr] int32: the group's rows below it have entered a slot
    slot_steps: Array  # int32: sum over iterations of the width
    steps: Array  # int32: iterations


class Limits(NamedTuple):
    """Static facts of a call: rows, R, group size, stop ids, pad id."""

    rows: int
    max_new: int
    group: int
    eos: tuple[int, ...]
    pad_id: int
    chunk: int = 0  # c: prompts per group prefilled at once (set by `decode`)


def prefill(model: Transformer, ids_PxTp: Array, mask_PxTp: Array) -> tuple[KVCache, Array]:
    """PREFILL prompts into a cache of exactly Tp slots; the logits [P, V] of their first response token."""
    p, tp = ids_PxTp.shape
    hidden, cache = model.hidden(ids_PxTp, mask_PxTp, cache=init_cache(model.config, p, tp, model.dtype))
    # Left padding: the last column is each prompt's last token; only its logits are needed.
    return cache, model.logits(hidden[:, -1:])[:, 0]


def _prefill_chunk(model: Transformer, pr: Prompts, c: int, place: Place) -> Prompts:
    """The next chunk of every group's prompts prefilled into the ring (over the oldest chunk)."""
    groups, tp = pr.ids.shape[0], pr.ids.shape[2]
    cut = lambda x: place(jax.lax.dynamic_slice_in_dim(x, pr.chunks * c, c, axis=1).reshape(groups * c, tp))  # noqa: E731
    cache, logits = prefill(model, cut(pr.ids), cut(pr.mask).astype(jnp.int32))
    at = pr.chunks % (pr.logits.shape[1] // c) * c
    put = lambda ring, new: jax.lax.dynamic_update_slice(  # noqa: E731
        ring, jax.vmap(place)(_by_group(new, groups, 1)).astype(ring.dtype), (0, 0, at, 0, 0, 0))
    logits = jax.lax.dynamic_update_slice(pr.logits, place(_by_group(logits, groups)), (0, at, 0))
    return pr._replace(k=put(pr.k, cache.k), v=put(pr.v, cache.v), logits=logits, chunks=pr.chunks + 1)


def _prompts(model: Transformer, ids_PxTp: Array, mask_PxTp: Array, groups: int, c: int, place: Place) -> Prompts:
    """The empty ring and the prompts by group, padded to whole chunks."""
    cfg = model.config
    p, tp = ids_PxTp.shape
    chunks = -(-(p // groups) // c)
    pad = lambda x: place(jnp.pad(_by_group(x, groups), [(0, 0), (0, chunks * c - p // groups), (0, 0)]))  # noqa: E731
    mask = pad(mask_PxTp.astype(bool))
    q = c * min(2, chunks)
    ring = lambda: jax.vmap(place)(jnp.zeros((cfg.num_layers, groups, q, cfg.num_kv_heads, tp, cfg.head_dim),  # noqa: E731
                                             model.dtype))
    return Prompts(pad(ids_PxTp.astype(jnp.int32)), mask, mask.sum(-1, dtype=jnp.int32), ring(), ring(),
                   place(jnp.zeros((groups, q, cfg.vocab_size), jnp.float32)), jnp.zeros((), jnp.int32))


def _by_group(x: Array, groups: int, axis: int = 0) -> Array:
    """[.., B, ..] -> [.., Gr, B / Gr, ..]: the batch split into its groups (a device's rows are contiguous)."""
    return x.reshape(*x.shape[:axis], groups, x.shape[axis] // groups, *x.shape[axis + 1:])


def _per_layer(buf: Array, fn: Callable[[Array, Array], Array], region: tuple[int, ...],
               count: Array | int | None = None) -> Array:
    """buf [L, ...] with the leading `region` of each layer l overwritten from its front by fn(l, that
    region), one layer at a time: in place, reading and writing only the region (the refill: a
    prompt's Tp slots, not the whole Tp + R)."""
    def body(l, b):
        at = (l,) + (0,) * (b.ndim - 1)
        new = fn(l, jax.lax.dynamic_slice(b, at, (1,) + tuple(region))[0])
        return jax.lax.dynamic_update_slice(b, new[None].astype(b.dtype), at)
    return jax.lax.fori_loop(0, buf.shape[0] if count is None else count, body, buf)


def _refill(model: Transformer, slots: Slots, prompts: Prompts, next_row: Array, lim: Limits,
            place: Place) -> tuple[Slots, Prompts, Array]:
    """REFILL each group's free slots with its next waiting rows, in row order (first the next chunk
    of prompts prefilled if one of those rows needs it)."""
    groups, wg = slots.live.shape
    rows, c = lim.rows // groups, lim.chunk
    tp = prompts.mask.shape[2]
    free = ~slots.live
    rank = jnp.cumsum(free, axis=1, dtype=jnp.int32) - 1
    last = jnp.minimum(next_row + jnp.sum(free, axis=1, dtype=jnp.int32), rows) - 1  # the last row that may enter
    need = jnp.any((last >= next_row) & (last // lim.group >= prompts.chunks * c))
    prompts = jax.lax.fori_loop(0, need.astype(jnp.int32), lambda _, pr: _prefill_chunk(model, pr, c, place), prompts)
    take = free & (next_row[:, None] + rank < jnp.minimum(rows, prompts.chunks * c * lim.group))
    row = jnp.where(take, next_row[:, None] + rank, slots.row)
    q = jnp.clip(row // lim.group, 0, prompts.mask.shape[1] - 1)  # [Gr, wg] the group's own prompts
    ring_q = q // c % (prompts.logits.shape[1] // c) * c + q % c
    local = lambda x, i, g_axis=0: jax.vmap(lambda xg, ig: xg[ig], in_axes=(g_axis, 0), out_axes=g_axis)(x, i)  # noqa: E731
    mask_head = jnp.where(take[..., None], local(prompts.mask, q), slots.key_mask[:, :, :tp])
    key_mask = place(slots.key_mask.at[:, :, :tp].set(mask_head))
    logits = place(jnp.where(take[..., None], local(prompts.logits, ring_q), slots.logits))

    def head(src_LxGrxPgxKVxTpxD: Array) -> Callable[[Array, Array], Array]:
        def one(l: Array, old_GrxwgxKVxTpxD: Array) -> Array:  # the layer's first Tp slots of the view
            gathered = local(jax.lax.dynamic_index_in_dim(src_LxGrxPgxKVxTpxD, l, 0, keepdims=False), ring_q)
            return place(jnp.where(take[:, :, None, None, None], gathered.astype(old_GrxwgxKVxTpxD.dtype),
                                   old_GrxwgxKVxTpxD))
        return one

    # Only when a slot takes a row (a loop of no layers otherwise: a `cond` around the buffers made XLA copy them).
    # The prompt's Tp slots are in the first block.
    first_k, first_v = slots.k[0], slots.v[0]
    count = jnp.where(jnp.any(take), first_k.shape[0], 0)
    region = (groups, wg, first_k.shape[3], tp, first_k.shape[5])
    k = (_per_layer(first_k, head(prompts.k), region, count),) + slots.k[1:]
    v = (_per_layer(first_v, head(prompts.v), region, count),) + slots.v[1:]
    slots = slots._replace(k=k, v=v, key_mask=key_mask, index=jnp.where(take, tp, slots.index), row=row,
                           j=jnp.where(take, 0, slots.j), logits=logits, live=slots.live | take)
    return slots, prompts, next_row + jnp.sum(take, axis=1, dtype=jnp.int32)


def _iteration(model: Transformer, choose: Choose, key: Array, stop_len: Array, lim: Limits, place: Place,
               loop: Loop) -> Loop:
    s, out, prompts = loop.slots, loop.out, loop.prompts
    groups, wg = s.live.shape
    rows = lim.rows // groups
    flat = lambda x: x.reshape(groups * wg, *x.shape[2:])  # noqa: E731
    # 1. CHOOSE (the draw is keyed by the row's number in the call and its position)
    n = jnp.arange(groups, dtype=jnp.int32)[:, None] * rows + s.row
    keys = jax.vmap(lambda r, j: jax.random.fold_in(jax.random.fold_in(key, r), j))(flat(n), flat(s.j))
    u = jax.vmap(lambda k: jax.random.uniform(k, (1,)))(keys)
    tok, lp, plp = (x.reshape(groups, wg) for x in choose(flat(s.logits), u))
    tok = jnp.where(s.live, tok, lim.pad_id)
    at = jnp.where(s.live, s.row, rows)  # row `rows`: out of bounds, dropped
    put = jax.vmap(lambda buf, r, j, val: buf.at[r, j].set(val.astype(buf.dtype), mode="drop"))  # noqa: E731
    out = Outputs(*(place(put(b, at, s.j, val)) for b, val in zip(out, (tok, jnp.ones_like(tok), lp, plp))))
    j = s.j + 1
    stop = (jnp.isin(tok, jnp.asarray(lim.eos or (-1,), jnp.int32)) | (j >= lim.max_new)
            | (j >= jnp.take_along_axis(stop_len, jnp.clip(s.row, 0, rows - 1), axis=1)))
    live = s.live & ~stop
    # 2. FORWARD (every slot of the view: a batch of fixed width; stopped slots' results are never read)
    length = jnp.take_along_axis(prompts.length, jnp.clip(s.row // lim.group, 0, prompts.length.shape[1] - 1), axis=1)
    # A grouped buffer: the model reads the view. Slots with no live row forward at the response's first
    # slot (their results are never read), so that attention bounded per row spends nothing on them.
    tp = prompts.mask.shape[2]
    cache = KVCache(s.k, s.v, flat(s.key_mask), flat(jnp.where(live, s.index, tp)))
    logits, cache = model(flat(tok)[:, None], jnp.ones((groups * wg, 1), jnp.int32),
                          positions=flat(length + s.j)[:, None], cache=cache)
    regroup = lambda x: place(x.reshape(groups, wg, *x.shape[1:]))  # noqa: E731
    slots = Slots(cache.k, cache.v, regroup(cache.key_mask), regroup(cache.index), s.row, j,
                  regroup(logits[:, 0]), live)
    # 3. REFILL (its cache copy runs only when a slot is free and a row waits)
    slots, prompts, next_row = _refill(model, slots, prompts, loop.next_row, lim, place)
    return Loop(slots, prompts, out, next_row, loop.slot_steps + live.size, loop.steps + 1)


def _pack(slots: Slots, width: int, place: Place) -> Slots:
    """Each group's live slots first, the view cut to `width` slots per group (the caller checked that
    they fit). The buffer is rearranged in place, one layer at a time, and only when a slot is live."""
    order = jnp.argsort(~slots.live, axis=1, stable=True)[:, :width]  # [Gr, width]
    take = lambda x: place(jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1))  # noqa: E731

    def move(l: Array, layer_GrxwgxKVxSxD: Array) -> Array:
        return place(take(layer_GrxwgxKVxSxD))

    count = jnp.where(jnp.any(slots.live), slots.k[0].shape[0], 0)
    pack = lambda blocks: tuple(_per_layer(b, move, slots.live.shape + b.shape[3:], count) for b in blocks)  # noqa: E731
    return Slots(pack(slots.k), pack(slots.v), take(slots.key_mask), take(slots.index), take(slots.row), take(slots.j),
                 take(slots.logits), take(slots.live))


def widths(slots: int, batch_devices: int, min_per_device: int) -> list[int]:
    """The widths the engine runs at: halving from `slots` to a quarter, each a multiple of the
    devices and at least `min_per_device` slots per device."""
    out = [slots]
    while (len(out) < 3 and out[-1] % 2 == 0 and (out[-1] // 2) % batch_devices == 0
           and out[-1] // 2 >= min_per_device * batch_devices):
        out.append(out[-1] // 2)
    return out


def cache_lengths(prompt_len: int, max_new: int) -> list[int]:
    """The cache views the engine grows through: room for 64, 128, 256, ... response tokens, then R.

    A view is only as long as the longest live row needs (within 2x), and dense decode attention
    reads the whole view: a step's cost follows the longest live row, not R (ragged: each row's own)."""
    out, room = [], _FIRST_ROOM
    while room < max_new:
        out.append(prompt_len + room)
        room *= 2
    return out + [prompt_len + max_new]


_FIRST_ROOM = 64


class Phase(NamedTuple):
    width: int  # W (all groups)
    length: int  # cache slots of the view


def _kv_blocks(shape: tuple[int, ...], dtype, place: Place) -> tuple[Array, Array]:
    """A key block and a value block [L, Gr, Wg, KV, S_i, D] (groups are axis 1), filled with 0 and
    -0: two equal zero arrays were merged by XLA into one, then copied into each buffer (the tiny
    base's R = 491 call: 111 vs 89 ms on this CPU). (Keys and values each their own buffer: one
    array for both would make XLA copy it before writing.)"""
    block = lambda fill: jax.vmap(place)(jnp.full(shape, fill, dtype))  # noqa: E731
    return block(0.0), block(-0.0)


def _grow(slots: Slots, length: int, full: int, place: Place) -> Slots:
    """The same slots with a view of `length` cache slots; the buffer's second block (up to `full`
    slots) made on the first growth past the first block."""
    pad = length - slots.key_mask.shape[2]
    slots = slots._replace(key_mask=place(jnp.pad(slots.key_mask, [(0, 0), (0, 0), (0, pad)])))
    have = sum(b.shape[4] for b in slots.k)
    if have < length:
        first = slots.k[0]
        k, v = _kv_blocks(first.shape[:4] + (full - have,) + first.shape[5:], first.dtype, place)
        slots = slots._replace(k=slots.k + (k,), v=slots.v + (v,))
    return slots


def _run(phases: list[Phase], body: Callable[[Loop], Loop], tp: int, rows: int, full: int, place: Place,
         loop: Loop) -> tuple[Outputs, Array, Array]:
    """The phases' loops one after the other (a phase with nothing to do runs no iteration); the
    outputs, slot-steps and iterations.

    A phase ends when a live row needs a longer view than the phase has, or when no row waits
    and every group's live rows fit the next phase's smaller width. Every phase after the first
    runs inside one `cond` that is entered only while a row is live, so a call whose rows all stop
    in the first phase never makes the buffer's second block."""
    groups = loop.next_row.shape[0]

    def run(i: int, l: Loop) -> Loop:
        phase = phases[i]
        nxt = phases[i + 1] if i + 1 < len(phases) else None
        grows = nxt is not None and nxt.length > phase.length
        shrinks = nxt is not None and nxt.width < phase.width

        def more(l: Loop) -> Array:
            live = l.slots.live
            go = jnp.any(live)
            if grows:
                go &= ~jnp.any(live & (tp + l.slots.j >= phase.length))
            if shrinks:
                go &= jnp.any(l.next_row < rows) | jnp.any(jnp.sum(live, axis=1) > nxt.width // groups)
            return go

        return jax.lax.while_loop(more, body, l)

    def enter(i: int, l: Loop) -> Loop:
        """From phase i - 1 into phase i: a longer view, or the live slots packed into fewer."""
        if phases[i].length > phases[i - 1].length:
            return l._replace(slots=_grow(l.slots, phases[i].length, full, place))
        return l._replace(slots=_pack(l.slots, phases[i].width // groups, place))

    def done(l: Loop) -> tuple[Outputs, Array, Array]:
        return l.out, l.slot_steps, l.steps

    def rest(l: Loop) -> tuple[Outputs, Array, Array]:
        for i in range(1, len(phases)):
            l = run(i, enter(i, l))
        return done(l)

    loop = run(0, loop)
    if len(phases) == 1:
        return done(loop)
    return jax.lax.cond(jnp.any(loop.slots.live), rest, done, loop)


def _scanned(model: Transformer) -> Transformer:
    """The model with its layer stack run as a scan (`ModelOptions.scan_layers`, the default off CPU).

    Measured on this CPU: 16 rows, 16 tokens of the 28M Qwen2 of bench_step 315 against 541 ms
    unrolled, a 16-row step of the ~100M one 44 against 80 ms. XLA:CPU copies each layer's slice
    of the stacked weights in both; in the scan the copy comes just before its matmul, which reads
    it from the cache (unrolled, the copies do not depend on the step's input and come early)."""
    if model.options.scan_layers:
        return model
    model = nnx.merge(*nnx.split(model))
    model.options = dataclasses.replace(model.options, scan_layers=True)
    return model


def decode(
    model: Transformer, ids_PxTp: Array, mask_PxTp: Array, key: Array, choose: Choose, lim: Limits, *,
    slots: int, min_slots_per_device: int, batch_devices: int = 1, stop_len_N: Array | None = None,
    place: Place = lambda x: x,
) -> tuple[Outputs, Array, Array]:
    """All N rows of the left-padded prompts decoded over `slots` slots. Returns the outputs, the
    slot-steps and iterations spent.

    `stop_len_N` forces row n to stop after that many tokens (benchmarks: a random model never
    emits a stop id of its own); None: only stop ids and R stop a row. The prompts and rows are
    split into `batch_devices` groups (each a multiple of it), `slots` too. The long tail narrows to
    no fewer than `min_slots_per_device` slots per device."""
    n, r, groups = lim.rows, lim.max_new, batch_devices
    p, tp = ids_PxTp.shape
    model = _scanned(model)
    if p % groups or slots % groups:
        raise ValueError(f"{p} prompts and {slots} slots must split evenly over {groups} batch devices")
    wg = slots // groups
    lim = lim._replace(chunk=min(-(-wg // lim.group), p // groups))  # a chunk's rows fill the group's slots
    lengths = cache_lengths(tp, r)
    phases = ([Phase(slots, length) for length in lengths]
              + [Phase(w, lengths[-1]) for w in widths(slots, groups, min_slots_per_device)[1:]])
    stop_len = jnp.full((n,), r, jnp.int32) if stop_len_N is None else stop_len_N.astype(jnp.int32)
    cfg = model.config
    k, v = _kv_blocks((cfg.num_layers, groups, wg, cfg.num_kv_heads, lengths[0], cfg.head_dim), model.dtype, place)
    zeros = place(jnp.zeros((groups, wg), jnp.int32))
    empty = Slots((k,), (v,), place(jnp.zeros((groups, wg, lengths[0]), bool)), zeros + tp, zeros, zeros,
                  place(jnp.zeros((groups, wg, cfg.vocab_size), jnp.float32)), zeros.astype(bool))
    shape = (groups, n // groups, r)
    out = Outputs(*(place(x) for x in (jnp.full(shape, lim.pad_id, jnp.int32), jnp.zeros(shape, jnp.int32),
                                       jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))))
    prompts = _prompts(model, ids_PxTp, mask_PxTp, groups, lim.chunk, place)
    first, prompts, next_row = _refill(model, empty, prompts, place(jnp.zeros((groups,), jnp.int32)), lim, place)
    zero = jnp.zeros((), jnp.int32)
    body = functools.partial(_iteration, model, choose, key, place(_by_group(stop_len, groups)), lim, place)
    out, slot_steps, steps = _run(phases, body, tp, n // groups, tp + r, place,
                                  Loop(first, prompts, out, next_row, zero, zero))
    return Outputs(*(x.reshape(n, r) for x in out)), slot_steps, steps
