"""The jitted stages of one RL step, as pure functions of arrays (the host loop is in `train.py`).

  SAMPLE      `sample.sample_jit`: G responses per prompt                         (device)
  GRADE       `rewards.GraderPool`                                                (host, bounded)
  ADVANTAGES  `advantages.token_advantages` (+ KTAE)                              (device)
  LOG-PROBS   `response_logprobs`: old policy (recomputed, unless the step makes a single
              update, when old = current) and the frozen reference                 (device)
  UPDATE      `train_step(state, batch) -> (state, metrics)`: `ppo_epochs` passes over
              mini-batches, each one optimizer update from gradients accumulated over
              micro-batches                                                       (device)

Letters: N rollouts in the step, Tp prompt columns, R response columns, T = Tp + R.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ktae_jax.config import AlgoSection, OptimSection
from ktae_jax.loss import Normalisers, policy_loss
from ktae_jax.mesh import constrain_batch
from ktae_jax.models import token_logprobs


class TrainState(struct.PyTreeNode):
    """Everything the update changes: a pytree, jitted and checkpointed as one."""

    params: Any  # nnx.State of the policy's parameters
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

    @property
    def on_policy(self) -> bool:
        """One update per step: the old policy is the current one, so no old log-prob pass is needed."""
        return self.algo.ppo_epochs == 1 and self.num_minibatches == 1


def make_optimizer(cfg: OptimSection) -> optax.GradientTransformation:
    schedule = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else optax.constant_schedule(cfg.lr)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    return optax.chain(*chain, adamw)


def learning_rate(cfg: OptimSection, update: int) -> float:
    return cfg.lr * min(1.0, update / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def response_logprobs(graphdef, params, tokens_NxT, attn_NxT, *, response_len: int, temperature: float):
    """(logp, entropy) of the last `response_len` columns: [N, R] each."""
    model = nnx.merge(graphdef, params)
    logp, entropy = token_logprobs(model, tokens_NxT, attn_NxT, temperature=temperature)
    return logp[:, -response_len:], entropy[:, -response_len:]


def _slices(x, num_minibatches: int, num_microbatches: int):
    """[N, ...] -> [minibatches, microbatches, rows, ...] by striding, so each device keeps its own rows.

    Row r goes to mini-batch r mod M, and within it to micro-batch (r div M) mod U: which rollouts
    share a mini-batch depends on neither the micro-batching nor the mesh, and device-contiguous
    row blocks stay device-local. (The update does not care which rollouts share a mini-batch:
    advantages are already computed.)
    """
    def stride(x, parts):  # [n, ...] -> [parts, n / parts, ...], part p = rows p, p + parts, ...
        return jnp.moveaxis(x.reshape(x.shape[0] // parts, parts, *x.shape[1:]), 1, 0)

    minibatches = stride(x, num_minibatches)
    return jax.vmap(lambda mini: stride(mini, num_microbatches))(minibatches)


def train_step(state: TrainState, batch: UpdateBatch, *, graphdef, tx: optax.GradientTransformation,
               settings: UpdateSettings, mesh=None) -> tuple[TrainState, dict[str, jax.Array]]:
    """`ppo_epochs` x mini-batches optimizer updates on one step's rollouts; pure."""
    algo = settings.algo
    M, U = settings.num_minibatches, settings.num_microbatches
    sliced = UpdateBatch(*(_slices(x, M, U) for x in batch))
    response_len = batch.resp_mask_NxR.shape[1]

    def micro_loss(params, micro: UpdateBatch, norm: Normalisers):
        micro = UpdateBatch(*(constrain_batch(x, mesh) for x in micro))
        logp, entropy = response_logprobs(graphdef, params, micro.tokens_NxT, micro.attn_NxT,
                                          response_len=response_len, temperature=settings.temperature)
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


@functools.partial(jax.jit, static_argnames=("vocab_size", "k"))
def strongest_key_tokens(tokens_NxR, mask_NxR, key_NxR, *, vocab_size: int, k: int):
    """KTAE diagnostics: (ids, mean key) of the k most positive and k most negative token ids of a step."""
    ids = jnp.where(mask_NxR > 0, tokens_NxR, vocab_size).reshape(-1)
    total = jnp.zeros(vocab_size + 1, jnp.float32).at[ids].add(key_NxR.reshape(-1))
    count = jnp.zeros(vocab_size + 1, jnp.float32).at[ids].add(1.0)
    mean = (total / jnp.maximum(count, 1))[:vocab_size]
    seen = count[:vocab_size] > 0
    top_vals, top_ids = jax.lax.top_k(jnp.where(seen, mean, -jnp.inf), k)
    low_vals, low_ids = jax.lax.top_k(jnp.where(seen, -mean, -jnp.inf), k)
    return top_ids, top_vals, low_ids, -low_vals
