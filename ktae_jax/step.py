"""The jitted stages of one RL step, as pure functions of arrays (the host loop is in `train.py`).

  SAMPLE      `sample.sample_jit`: G responses per prompt                         (device)
  GRADE       `rewards.GraderPool`                                                (host, bounded)
  ADVANTAGES  `advantages.token_advantages` (+ KTAE)                              (device)
  LOG-PROBS   `rollout_logprobs`: old policy (recomputed, unless the step makes a single
              update, when old = current) and the frozen reference                 (device)
  UPDATE      `train_step(state, batch) -> (state, metrics)`: `ppo_epochs` passes over
              mini-batches, each one optimizer update from gradients accumulated over
              micro-batches                                                       (device)

Letters: N rollouts in the step, Tp prompt columns, R response columns, T = Tp + R.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ktae_jax.config import AlgoSection, OptimSection, TrainConfig
from ktae_jax.loss import Normalisers, policy_loss
from ktae_jax.mesh import batch_devices, constrain_batch, gathered_over_fsdp
from ktae_jax.models import response_logprobs


class TrainState(struct.PyTreeNode):
    """Everything the update changes: a pytree, jitted and checkpointed as one. The frozen
    parameters (`split_policy`) are not in it: the update reads them, and nothing else sees them."""

    params: Any  # nnx.State of the policy's trainable parameters
    opt_state: Any  # optax state
    step: jax.Array  # int32 optimizer steps taken (training steps, not mini-batch updates)
    rng: jax.Array  # base PRNG key of the run; step keys are folded from it


class UpdateBatch(NamedTuple):
    tokens_NxT: jax.Array  # int32 prompt (left-padded) + response
    attn_NxT: jax.Array  # int32 1 on real prompt and response tokens
    resp_mask_NxR: jax.Array  # int32 1 on response tokens that count in the loss
    adv_NxR: jax.Array  # float32 token-level advantages
    old_logp_NxR: jax.Array  # float32 log-probs under the policy that sampled
    ref_logp_NxR: jax.Array  # float32 log-probs under the frozen reference (zeros when unused)


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """The static (compile-time) shape of the update."""

    algo: AlgoSection
    num_minibatches: int
    num_microbatches: int
    temperature: float
    group_size: int = 1  # consecutive rows that share a prompt (1: assume none do)

    @property
    def on_policy(self) -> bool:
        """One update per step: the old policy is the current one, so no old log-prob pass is needed."""
        return self.algo.ppo_epochs == 1 and self.num_minibatches == 1

    @classmethod
    def for_config(cls, cfg: TrainConfig, num_batch_devices: int) -> "UpdateSettings":
        """The update of a run of `cfg` whose batches split `num_batch_devices` ways."""
        rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
        mini_rows = cfg.mini_batch_prompts * cfg.rollout.group_size
        return cls(algo=cfg.algo, num_minibatches=rows // mini_rows,
                   num_microbatches=mini_rows // cfg.micro_batch_rollouts(num_batch_devices),
                   temperature=cfg.rollout.temperature, group_size=cfg.rollout.group_size)

    def logprob_layout(self, cfg: TrainConfig, mesh=None) -> "Layout":
        """The old / reference log-prob passes' slicing: the update's mini-batches, cut into slices
        of `algo.logprob_micro_batch_per_device` rollouts per device."""
        mini_rows = cfg.mini_batch_prompts * cfg.rollout.group_size
        return dataclasses.replace(self.layout(mesh),
                                   num_microbatches=mini_rows // cfg.logprob_micro_batch_rollouts(batch_devices(mesh)))

    def layout(self, mesh=None) -> "Layout":
        return Layout(self.num_minibatches, self.num_microbatches, self.group_size, batch_devices(mesh))


def split_policy(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable, frozen) parameters of a policy. What trains is chosen by the
    variables' NNX type: the low-rank adapters (`nnx.LoRAParam`, see `models.lora`) when the model
    has any, otherwise every `nnx.Param` (full fine-tuning: `frozen` is then empty). The optimizer,
    the checkpoints and the gradient see only `trainable`; `nnx.merge(graphdef, trainable, frozen)`
    is the policy."""
    adapters = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    return nnx.split(model, nnx.LoRAParam if adapters else nnx.Param, ...)


def make_optimizer(cfg: OptimSection) -> optax.GradientTransformation:
    schedule = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else optax.constant_schedule(cfg.lr)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    return optax.chain(*chain, adamw)


def optimizer_shardings(tx: optax.GradientTransformation, params: Any, mesh) -> Any:
    """Shardings of `tx.init(params)`: each moment laid out like its parameter (FSDP splits the
    optimizer state as it splits the weights), leaves that are not per-parameter (Adam's step
    count) replicated. `params` may be abstract; each leaf must carry its `.sharding`."""
    abstract = jax.eval_shape(tx.init, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return optax.tree_map_params(tx, lambda _, p: p.sharding, abstract, params,
                                 transform_non_params=lambda _: replicated)


def init_optimizer(tx: optax.GradientTransformation, params: Any, mesh) -> Any:
    """`tx.init(params)` made directly in its sharded layout (`optimizer_shardings`)."""
    return jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, mesh))(params)


def learning_rate(cfg: OptimSection, update: int) -> float:
    return cfg.lr * min(1.0, update / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def _split_rollouts(tokens_NxT, attn_NxT, response_len: int, rows_per_prompt: int):
    """(prompt ids, prompt mask) one per `rows_per_prompt` consecutive rows, and (response ids, mask)."""
    n, t = tokens_NxT.shape
    tp = t - response_len
    first_rows = lambda x: x[:, :tp].reshape(n // rows_per_prompt, rows_per_prompt, tp)[:, 0]  # noqa: E731
    return first_rows(tokens_NxT), first_rows(attn_NxT), tokens_NxT[:, tp:], attn_NxT[:, tp:]


def micro_logprobs(graphdef, params, tokens_NxT, attn_NxT, *, response_len: int, rows_per_prompt: int,
                   temperature: float, mesh=None, frozen=None):
    """(logp, entropy) [N, R] of the last `response_len` columns; each prompt (the first Tp columns,
    the same in each run of `rows_per_prompt` rows) is computed once and shared by its rows.
    `params` (+ `frozen`, the parameters that do not train, when split by `split_policy`)."""
    states = (params,) if frozen is None else (params, frozen)
    model = nnx.merge(graphdef, *states, copy=True)  # copies: the embedding is replaced below
    # With FSDP, every activation stays split by rows and the weights are gathered (see
    # `response_logprobs`); the embedding table is gathered for the lookup by hand: otherwise the
    # gradient of the lookup splits the activations along the embedding (a full rematerialisation).
    model.embed[...] = gathered_over_fsdp(model.embed, mesh)
    return response_logprobs(model, *_split_rollouts(tokens_NxT, attn_NxT, response_len, rows_per_prompt),
                             temperature=temperature, constrain=functools.partial(constrain_batch, mesh=mesh))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which rollouts share a mini-batch and a micro-batch, as reshapes of the step's N rows.

    Mini-batches take whole groups, by striding (group g -> mini-batch g mod M): which rollouts
    share a mini-batch depends on neither the micro-batching nor the mesh. Within a mini-batch,
    each batch device's block of rows (whole groups when `mini_batch_prompts` is a multiple of the
    batch devices) is cut into U contiguous micro-batch pieces, so each device keeps its own rows
    and a micro-batch holds runs of rows of one prompt: `rows_per_prompt` of them share its
    computation (`micro_logprobs`). Groups are G consecutive rows, as the sampler makes them.
    """

    num_minibatches: int
    num_microbatches: int
    group_size: int
    batch_devices: int

    def _shape(self, n: int) -> tuple[int, int, int, int, int]:
        m, u, g, d = self.num_minibatches, self.num_microbatches, self.group_size, self.batch_devices
        if n % (g * m) or n % (m * u * d):
            raise ValueError(f"{n} rollouts do not split into {m} mini-batches of whole groups of {g} "
                             f"x {u} micro-batches x {d} batch devices")
        return m, u, d, n // (m * u * d), g

    def split(self, x: jax.Array) -> jax.Array:
        """[N, ...] -> [M, U, N / (M U), ...]"""
        m, u, d, c, g = self._shape(x.shape[0])
        rest = x.shape[1:]
        x = jnp.moveaxis(x.reshape(x.shape[0] // (g * m), m, g, *rest), 1, 0)  # [M, groups, G, ...]
        x = x.reshape(m, d, u, c, *rest).swapaxes(1, 2)  # device blocks, each cut into U pieces
        return x.reshape(m, u, d * c, *rest)

    def merge(self, x: jax.Array) -> jax.Array:
        """The inverse of `split`: [M, U, N / (M U), ...] -> [N, ...]"""
        m, u, d, c, g = self._shape(x.shape[0] * x.shape[1] * x.shape[2])
        rest = x.shape[3:]
        x = x.reshape(m, u, d, c, *rest).swapaxes(1, 2).reshape(m, -1, g, *rest)
        return jnp.moveaxis(x, 0, 1).reshape(-1, *rest)

    def rows_per_prompt(self, n: int) -> int:
        """How many consecutive rows of a micro-batch piece on one device surely share a prompt."""
        return math.gcd(self.group_size, self._shape(n)[3])


def rollout_logprobs(graphdef, params, tokens_NxT, attn_NxT, *, response_len: int, temperature: float,
                     layout: Layout, mesh=None, frozen=None):
    """(logp, entropy) [N, R] of every rollout, one micro-batch at a time (the update's memory bound)."""
    n = tokens_NxT.shape[0]

    def one(micro):
        tokens, attn = (constrain_batch(x, mesh) for x in micro)
        return micro_logprobs(graphdef, params, tokens, attn, response_len=response_len,
                              rows_per_prompt=layout.rows_per_prompt(n), temperature=temperature, mesh=mesh,
                              frozen=frozen)

    micro_batches = lambda x: layout.split(x).reshape(-1, n // (layout.num_minibatches * layout.num_microbatches),  # noqa: E731
                                                      *x.shape[1:])
    logp, entropy = jax.lax.map(one, (micro_batches(tokens_NxT), micro_batches(attn_NxT)))
    shape = (layout.num_minibatches, layout.num_microbatches, *logp.shape[1:])
    return tuple(constrain_batch(layout.merge(x.reshape(shape)), mesh) for x in (logp, entropy))


def train_step(state: TrainState, batch: UpdateBatch, frozen=None, *, graphdef, tx: optax.GradientTransformation,
               settings: UpdateSettings, mesh=None) -> tuple[TrainState, dict[str, jax.Array]]:
    """`ppo_epochs` x mini-batches optimizer updates on one step's rollouts; pure. Gradients and
    updates reach `state.params` only; `frozen` (`split_policy`) is read, never changed."""
    algo = settings.algo
    layout = settings.layout(mesh)
    sliced = UpdateBatch(*(layout.split(x) for x in batch))
    response_len = batch.resp_mask_NxR.shape[1]
    rows_per_prompt = layout.rows_per_prompt(batch.resp_mask_NxR.shape[0])

    def micro_loss(params, micro: UpdateBatch, norm: Normalisers):
        micro = UpdateBatch(*(constrain_batch(x, mesh) for x in micro))
        logp, entropy = micro_logprobs(graphdef, params, micro.tokens_NxT, micro.attn_NxT, response_len=response_len,
                                       rows_per_prompt=rows_per_prompt, temperature=settings.temperature, mesh=mesh,
                                       frozen=frozen)
        # On-policy, old = current exactly (ratio 1, gradient of the ratio intact): skip that pass.
        old_logp = jax.lax.stop_gradient(logp) if settings.on_policy else micro.old_logp_NxR
        return policy_loss(logp, old_logp, micro.ref_logp_NxR, micro.adv_NxR, micro.resp_mask_NxR, entropy,
                           norm, clip_low=algo.clip_low, clip_high=algo.clip_high, clip_ratio_c=algo.clip_ratio_c,
                           kl_coef=algo.kl_coef, kl_estimator=algo.kl_estimator, entropy_coef=algo.entropy_coef,
                           loss_agg=algo.loss_agg)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    # UPDATE: one optimizer step per mini-batch, gradients summed over its micro-batches.
    def minibatch_update(carry, mini: UpdateBatch):
        params, opt_state = carry
        microbatches, rows, _ = mini.resp_mask_NxR.shape
        norm = Normalisers(num_tokens=mini.resp_mask_NxR.sum().astype(jnp.float32),
                           num_seqs=jnp.float32(microbatches * rows),
                           max_len=jnp.float32(response_len))

        def accumulate(acc, micro):
            grads, metrics = grad_fn(params, micro, norm)
            return jax.tree.map(jnp.add, acc, (grads, metrics)), None

        zero_metrics = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], mini), norm)[1])
        zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics))
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, mini)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["optim/grad_norm"] = optax.tree.norm(grads)
        return (params, opt_state), metrics

    def epoch(carry, _):
        return jax.lax.scan(minibatch_update, carry, sliced)

    (params, opt_state), metrics = jax.lax.scan(epoch, (state.params, state.opt_state), None, length=algo.ppo_epochs)
    metrics = jax.tree.map(jnp.mean, metrics)
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics
