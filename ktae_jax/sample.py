"""Rollouts: G sampled responses per prompt in one jitted program (prefill once, decode on device).

Letters: P prompts, Tp prompt columns (left-padded), G samples per prompt, N = P * G rows,
R = max_new_tokens, V vocabulary.

The steps of `sample_from_state`:
  1. PREFILL each distinct prompt once (its keys/values and the logits of its first response token),
     a chunk of prompts at a time, when their rows are about to enter a slot (`engine.Prompts`).
  2. DECODE the N rows (rows i*G .. i*G+G-1 answer prompt i) on `slots` decode slots with
     `ktae_jax.engine`: a row enters a free slot with a copy of its prompt's keys, takes one token
     per loop iteration, and leaves at a stop id or R tokens; its slot then takes the next row.
     Finished rows stop costing, and attention reads only the written part of the cache.
Token choice: temperature, then top-k, then top-p (nucleus), then a categorical draw (inverse CDF, one uniform per row); or argmax
when greedy. `logp` is the log-probability under that processed distribution (0 under greedy,
a point mass); `policy_logp` is under the raw policy (temperature 1, no filtering).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ktae_jax import engine
from ktae_jax.mesh import batch_devices, batch_sharding, constrain_batch, decode_shardings
from ktae_jax.models.transformer import Transformer, has_layer_lists, stack_layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int  # R, the response length limit
    temperature: float = 1.0  # logits are divided by it before filtering and sampling
    top_p: float = 1.0  # nucleus: keep the most likely tokens whose mass reaches top_p (1 = off)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    greedy: bool = False  # argmax instead of sampling (temperature, top-k, top-p ignored)
    eos_ids: tuple[int, ...] = ()  # a row stops after emitting any of these
    pad_id: int = 0  # written after a row has stopped
    num_samples: int = 1  # G, responses per prompt
    slots: int = 0  # rows decoded at once (the KV cache holds this many); 0 = all P x G rows
    # The long tail is decoded on fewer slots, but never fewer than this many per batch device: every
    # narrower width is one more decode loop to compile (half the sampler's compile time at test
    # sizes), and on GPU/TPU a decode step of <= 8 rows costs about the same at any width (reading
    # the weights dominates). On a CPU narrower is faster (28M Qwen2: 2 rows 1.5x faster than 8);
    # 1 narrows as far as a quarter of the slots.
    min_slots_per_device: int = 8
    # Let prompt + response run past the model's max_position_embeddings (rotary positions extrapolate;
    # ktae-eval warns instead of refusing, so one long benchmark prompt does not stop an evaluation).
    beyond_positions: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 (use greedy=True for argmax)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: must be >= 1")
        if self.slots < 0:
            raise ValueError(f"slots={self.slots}: must be >= 0 (0 = every row at once)")
        if self.min_slots_per_device < 1:
            raise ValueError(f"min_slots_per_device={self.min_slots_per_device}: must be >= 1")
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))


class Rollout(NamedTuple):
    tokens: Array  # [N, R] int32 response ids, pad_id after the stop
    mask: Array  # [N, R] int32, 1 up to and including the first stop id
    logp: Array  # [N, R] float32 log-prob under the sampling distribution (0 where mask is 0)
    policy_logp: Array  # [N, R] float32 log-prob under the raw policy (0 where mask is 0)
    lengths: Array  # [N] int32 = mask.sum(-1)
    slot_steps: Array  # int32 scalar: decode slot-iterations spent (lengths.sum() of them made a token)
    decode_steps: Array  # int32 scalar: decode loop iterations


def slot_efficiency(rollout: Rollout) -> float:
    """The fraction of decode slot-steps that produced a live token (host)."""
    return float(np.sum(rollout.lengths)) / max(1, int(rollout.slot_steps))


# ---------------------------------------------------------------------- token choice
def process_logits(logits_NxV: Array, config: SamplingConfig) -> Array:
    """Temperature, then top-k, then top-p; filtered tokens get -inf. float32 [N, V]."""
    x = logits_NxV.astype(jnp.float32) / config.temperature
    v = x.shape[-1]
    k = config.top_k if 0 < config.top_k < v else 0
    if config.top_p >= 1.0:
        if k:
            kth = jax.lax.top_k(x, k)[0][:, -1:]
            x = jnp.where(x < kth, -jnp.inf, x)
        return x
    # Sorted candidates (only the top k when top-k is on: a cheaper sort).
    sorted_desc = jax.lax.top_k(x, k)[0] if k else -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep a candidate while the mass of the ones before it is below top_p (the first always stays).
    keep = mass_before < config.top_p
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x < threshold, -jnp.inf, x)


_CDF_BLOCK = 256


def categorical_inverse_cdf(key: Array, logits_NxV: Array, uniform_Nx1: Array | None = None) -> Array:
    """One draw per row from softmax(logits), by inverting the CDF with a single uniform per row.

    Same distribution as `jax.random.categorical`, which draws V Gumbel variates per row; with
    V = 32000 that cost ~60 ms per decode step on this CPU against ~5 ms here. The CDF is taken
    in two levels (block sums, then within the chosen block) so no V-long scan is needed.
    Tokens of zero probability (filtered to -inf) are never chosen. `uniform_Nx1`: the uniforms
    to use instead of drawing them from `key`.
    """
    n, v = logits_NxV.shape
    blocks = -(-v // _CDF_BLOCK)
    x = jnp.pad(logits_NxV, ((0, 0), (0, blocks * _CDF_BLOCK - v)), constant_values=-jnp.inf)
    probs = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)).reshape(n, blocks, _CDF_BLOCK)
    block_mass = probs.sum(-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    total = block_cdf[:, -1:]
    u = jax.random.uniform(key, (n, 1)) if uniform_Nx1 is None else uniform_Nx1
    u = jnp.minimum(u * total, jnp.nextafter(total, 0.0))
    # The first block whose CDF exceeds u (it has positive mass), then the first token inside it.
    j = jnp.minimum(jnp.sum(block_cdf <= u, axis=-1), blocks - 1)
    before = jnp.take_along_axis(block_cdf - block_mass, j[:, None], -1)
    inner_cdf = jnp.cumsum(jnp.take_along_axis(probs, j[:, None, None], 1)[:, 0], axis=-1)
    u_in = jnp.clip(u - before, 0.0, jnp.nextafter(inner_cdf[:, -1:], 0.0))
    i = jnp.sum(inner_cdf <= u_in, axis=-1)
    return (j * _CDF_BLOCK + i).astype(jnp.int32)


def choose_tokens(logits_NxV: Array, key: Array | None, config: SamplingConfig,
                  uniform_Nx1: Array | None = None) -> tuple[Array, Array, Array]:
    """(tokens [N], logp under the sampling distribution [N], logp under the raw policy [N])."""
    policy = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1)
    if config.greedy:
        tokens = jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
        return tokens, jnp.zeros(tokens.shape, jnp.float32), jnp.take_along_axis(policy, tokens[:, None], -1)[:, 0]
    processed = process_logits(logits_NxV, config)
    tokens = categorical_inverse_cdf(key, processed, uniform_Nx1)
    sampling = jax.nn.log_softmax(processed, axis=-1)
    pick = lambda lp: jnp.take_along_axis(lp, tokens[:, None], -1)[:, 0]  # noqa: E731
    return tokens, pick(sampling), pick(policy)


# ---------------------------------------------------------------------- the sampler
def check_shapes(model: Transformer, num_prompts: int, prompt_len: int, config: SamplingConfig,
                 devices: int = 1) -> int:
    """Raise a ValueError naming the limit a call would break; returns the slot count."""
    if num_prompts < 1:
        raise ValueError("no prompts: the prompt list is empty")
    limit = model.config.max_position_embeddings
    if config.beyond_positions:
        return _slot_count(num_prompts, config, devices)
    if prompt_len >= limit:
        raise ValueError(f"prompts of {prompt_len} columns leave no room for a response: the model has "
                         f"max_position_embeddings={limit}")
    if prompt_len + config.max_new_tokens > limit:
        raise ValueError(f"max_new_tokens={config.max_new_tokens} after prompts of {prompt_len} columns exceeds the "
                         f"model's max_position_embeddings={limit} (at most {limit - prompt_len} new tokens)")
    return _slot_count(num_prompts, config, devices)


def _slot_count(num_prompts: int, config: SamplingConfig, devices: int) -> int:
    rows = num_prompts * config.num_samples
    slots = min(config.slots or rows, rows)
    return -(-slots // devices) * devices  # a multiple of the devices the batch is split over


def sample_from_state(
    graphdef: nnx.GraphDef, state: nnx.State, prompt_ids_PxTp: Array, prompt_mask_PxTp: Array, key: Array,
    *, config: SamplingConfig, mesh: Mesh | None = None, stop_lengths_N: Array | None = None,
) -> Rollout:
    """The pure sampler (see the module docstring); jit it with `config`, `graphdef`, `mesh` static.

    `stop_lengths_N` forces row n to stop after that many tokens (benchmarks with random models)."""
    model: Transformer = nnx.merge(graphdef, state)
    p, tp = prompt_ids_PxTp.shape
    devices = batch_devices(mesh)
    slots = check_shapes(model, p, tp, config, devices)
    place = functools.partial(constrain_batch, mesh=mesh)
    lim = engine.Limits(p * config.num_samples, config.max_new_tokens, config.num_samples, config.eos_ids,
                        config.pad_id)
    choose = lambda logits, u: choose_tokens(logits, None, config, u)  # noqa: E731
    out, slot_steps, steps = engine.decode(model, prompt_ids_PxTp, prompt_mask_PxTp, key, choose, lim, slots=slots, batch_devices=devices,
                                           min_slots_per_device=config.min_slots_per_device,
                                           stop_len_N=stop_lengths_N, place=place)
    out = jax.tree.map(place, out)
    return Rollout(out.tokens, out.mask, out.logp, out.policy_logp, out.mask.sum(-1).astype(jnp.int32),
                   slot_steps, steps)


sample_jit = jax.jit(sample_from_state, static_argnames=("graphdef", "config", "mesh"))


def decode_params(params: nnx.State, mesh: Mesh | None, dtype) -> nnx.State:
    """The rollout copy of the policy: floating parameters cast to the compute `dtype` and laid out
    for decoding (`mesh.decode_shardings`: no FSDP split, so no weight gathers per decode step).
    The model casts every weight to its compute dtype before use, so the sampler computes the same
    numbers from this copy as from `params`. Refresh it after every update (`RolloutCopy`).
    Parameters already in that dtype and layout (float32 compute, no FSDP split) are returned as
    they are: a copy would only cost memory and a pass over the weights per step. Weights held
    per layer (`transformer.LayerList`, the train state on CPU) are stacked: decoding scans the
    layer stack (`engine._scanned`)."""
    dtype = jnp.dtype(dtype)
    if not has_layer_lists(params) and _in_decode_layout(params, mesh, dtype):
        return params
    return _decode_copy(params, mesh=mesh, dtype=dtype)


def _in_decode_layout(params: nnx.State, mesh: Mesh | None, dtype) -> bool:
    leaves = jax.tree.leaves(params)
    if any(jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype for x in leaves):
        return False
    if mesh is None:
        return True
    wanted = jax.tree.leaves(decode_shardings(params, mesh))
    return all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(w, x.ndim) for x, w in zip(leaves, wanted))


# One jitted function (cached per mesh, dtype and parameter shapes): a new `jax.jit(lambda ...)` per
# call compiled the copy again at every update (bench_step's 4M model at load 12: ~0.85 s of a 1.9 s step).
@functools.partial(jax.jit, static_argnames=("mesh", "dtype"))
def _decode_copy(params: nnx.State, *, mesh: Mesh | None, dtype) -> nnx.State:
    out = cast_floating(stack_layers(params), dtype)
    return out if mesh is None else jax.lax.with_sharding_constraint(out, decode_shardings(out, mesh))


def cast_floating(tree, dtype):
    """Every floating leaf of `tree` cast to `dtype` (integer leaves, e.g. step counters, kept)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def sample(
    model: Transformer, prompt_ids_PxTp, prompt_mask_PxTp, key: Array, config: SamplingConfig,
    *, mesh: Mesh | None = None, stop_lengths_N=None,
) -> Rollout:
    """Convenience wrapper: checks the prompts, places them on `mesh`, calls the jitted sampler."""
    ids, mask = np.asarray(prompt_ids_PxTp), np.asarray(prompt_mask_PxTp)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"prompt ids {ids.shape} and mask {mask.shape} must be the same [P, T] shape")
    if not np.all(mask[:, -1]):
        raise ValueError("prompts must be left-padded: the last column of the mask must be all 1")
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    if mesh is not None:
        ids = jax.device_put(ids, batch_sharding(mesh, ids.shape))
        mask = jax.device_put(mask, batch_sharding(mesh, mask.shape))
    if ids.shape[0] == 0:
        raise ValueError("no prompts: the prompt list is empty")
    graphdef, state = nnx.split(model)
    stops = None if stop_lengths_N is None else jnp.asarray(stop_lengths_N, jnp.int32)
    return sample_jit(graphdef, state, ids, mask, key, config=config, mesh=mesh, stop_lengths_N=stops)
