"""Rollout collection: steps 1-4 of a training step (see `train.py`), from prompts to graded rollouts.

  1. PROMPTS  the next batch of the data stream, cut to the padding it needs     (host)
  2. SAMPLE   G responses per prompt, in sampler calls of a bounded size          (device)
  3. GRADE    responses decoded and graded in the process pool, submitted async;
              the caller's device work (old / reference log-probs) overlaps it    (host || device)
  4. FILTER   DAPO dynamic sampling: keep the groups whose rewards differ, sample
              again until the batch is full or `algo.max_num_gen_batches` rounds   (host)

Letters: P prompts, G responses per prompt (a group: G consecutive rows), N = P x G rollouts,
T prompt + response columns, R response columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ktae_jax import mesh as mesh_lib
from ktae_jax.config import TrainConfig
from ktae_jax.data import DataError, PromptBatch, PromptData
from ktae_jax.metrics import StageTimer
from ktae_jax.policy import Policy
from ktae_jax.rewards import GraderPool, reward_parts
from ktae_jax.sample import decode_params, sample_jit


@dataclasses.dataclass
class Rollouts:
    """One step's rollouts on the host side of the boundary (N = P x G rows, groups contiguous)."""

    tokens_NxT: np.ndarray
    attn_NxT: np.ndarray
    resp_NxR: np.ndarray
    resp_mask_NxR: np.ndarray
    sampler_logp_NxR: np.ndarray
    rewards_N: np.ndarray  # the final (shaped) reward: the rollout-level advantage's input
    correct_N: np.ndarray  # the grader's verdict, 0/1
    passed_N: np.ndarray  # base reward (before shaping) > 0: KTAE's correct side (= the verdict, built-in kinds)
    lengths_N: np.ndarray
    grade_metrics: dict[str, float]

    def select_groups(self, groups: np.ndarray, group_size: int) -> "Rollouts":
        rows = (groups[:, None] * group_size + np.arange(group_size)[None]).reshape(-1)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Rollouts(**{k: (v[rows] if isinstance(v, np.ndarray) else v) for k, v in fields.items()})

    @staticmethod
    def concat(parts: list["Rollouts"], pad_id: int) -> "Rollouts":
        """One batch of several; prompts of different trimmed widths are left-padded to the widest."""
        width = max(p.tokens_NxT.shape[1] for p in parts)
        left = lambda x, value: np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=value)  # noqa: E731
        parts = [dataclasses.replace(p, tokens_NxT=left(p.tokens_NxT, pad_id), attn_NxT=left(p.attn_NxT, 0))
                 for p in parts]
        fields = [f.name for f in dataclasses.fields(Rollouts) if f.name != "grade_metrics"]
        merged = {k: np.concatenate([getattr(p, k) for p in parts]) for k in fields}
        grade = {k: sum(p.grade_metrics.get(k, 0.0) for p in parts) for k in parts[0].grade_metrics}
        return Rollouts(**merged, grade_metrics=grade)


# Called with the (tokens, attention, sampler log-probs) host arrays of a step's batch once its
# grading is submitted; the device work it dispatches overlaps the grading.
WhileGrading = Callable[[np.ndarray, np.ndarray, np.ndarray], Any]


class RolloutCollector:
    """Steps 1-4: the policy's parameters -> one step's graded rollouts (and the DAPO filter's metrics)."""

    def __init__(self, cfg: TrainConfig, graphdef: Any, policy: Policy, mesh: jax.sharding.Mesh, data: PromptData,
                 pool: GraderPool, rollout_copy: Callable[[Any], Any] | None = None):
        """`rollout_copy`: the trainable parameters -> the sampler's copy for `graphdef`
        (default `sample.decode_params`; LoRA: `adapters.PolicyWeights.rollout_copy`)."""
        self.cfg, self.graphdef, self.mesh, self.data, self.pool = cfg, graphdef, mesh, data, pool
        self._make_copy = rollout_copy
        self.tokenizer, self.pad_id = policy.tokenizer, policy.pad_id
        self.sampling = cfg.to_sampling(policy.stop_ids, policy.pad_id, mesh_lib.batch_devices(mesh))
        self.reward_cfg = cfg.to_reward()
        self.compute_dtype = jnp.dtype(cfg.model.compute_dtype)
        self._copy_of = self._copy = None  # the rollout copy of the policy and the parameters it copies
        self._slot_steps = self._live_tokens = 0

    def collect(self, params: Any, step_key: jax.Array, timer: StageTimer, *,
                while_grading: WhileGrading | None = None) -> tuple[Rollouts, Any, dict[str, float]]:
        """(rollouts, what `while_grading` returned, the filter's metrics). Without dynamic sampling,
        `while_grading` overlaps the grading; with it the filter needs the rewards first, so it runs
        on the final batch (no overlap). The sampler's own metrics: `sampler_metrics`."""
        params = self._rollout_copy(params)
        self._slot_steps = self._live_tokens = 0
        if not self.cfg.algo.dynamic_sampling:
            batch, overlapped = self._generate(params, self._next_prompts(), jax.random.fold_in(step_key, 0), timer,
                                               while_grading=while_grading)
            return batch, overlapped, {}
        batch, metrics = self._filter(params, step_key, timer)
        overlapped = while_grading(batch.tokens_NxT, batch.attn_NxT, batch.sampler_logp_NxR) if while_grading else None
        return batch, overlapped, metrics

    def _rollout_copy(self, params: Any) -> Any:
        """The policy in the sampler's layout (`sample.decode_params`), made again once per update."""
        if self._copy_of is not params:
            self._copy = None  # the previous copy goes before the next is made
            self._copy = (self._make_copy(params) if self._make_copy is not None
                          else decode_params(params, self.mesh, self.compute_dtype))
            self._copy_of = params
        return self._copy

    def sampler_metrics(self, timer: StageTimer) -> dict[str, float]:
        """Over every sampler call of the last `collect`: the fraction of decode slot-steps that made a token,
        and the tokens made per second of sampling."""
        return {"rollout/slot_efficiency": self._live_tokens / max(1, self._slot_steps),
                "throughput/rollout_tokens_per_s": self._live_tokens / max(timer.seconds.get("time/sample_s", 0.0), 1e-9)}

    # 1. PROMPTS
    def _next_prompts(self) -> PromptBatch:
        try:
            batch = next(self.data)
        except StopIteration as err:
            raise DataError(str(err)) from None
        return batch.trimmed() if self.cfg.data.trim_prompt_padding else batch

    # 2. SAMPLE
    def _sample(self, params: Any, prompts: PromptBatch, key: jax.Array) -> tuple[np.ndarray, ...]:
        """(tokens, mask, policy log-probs, lengths) of G responses per prompt: one engine call whose
        decode slots (`rollout.sample_prompts_per_device` x G per device: they bound the KV cache) take
        the next rows as rows finish."""
        ids, mask = mesh_lib.place_batch(self.mesh, prompts.ids, prompts.mask)
        rollout = sample_jit(self.graphdef, params, ids, mask, key, config=self.sampling, mesh=self.mesh)
        *out, slot_steps = mesh_lib.to_host((rollout.tokens, rollout.mask, rollout.policy_logp, rollout.lengths,
                                             rollout.slot_steps))  # host sync
        self._slot_steps += int(slot_steps)
        self._live_tokens += int(out[3].sum())
        return tuple(out)

    # 2 + 3. SAMPLE and GRADE one batch of prompts
    def _generate(self, params: Any, prompts: PromptBatch, key: jax.Array, timer: StageTimer, *,
                  while_grading: WhileGrading | None = None) -> tuple[Rollouts, Any]:
        """`while_grading` is called after the grading is submitted and before its result is awaited:
        device work it dispatches (JAX dispatch is asynchronous) overlaps the host grading."""
        with timer("sample"):
            resp_NxR, resp_mask_NxR, logp_NxR, lengths_N = self._sample(params, prompts, key)
        texts = self.tokenizer.batch_decode([row[:n] for row, n in zip(resp_NxR.tolist(), lengths_N.tolist())],
                                            skip_special_tokens=True)
        G = self.cfg.rollout.group_size
        references = [a for a in prompts.answers for _ in range(G)]
        future = self.pool.submit(texts, references)
        tokens_NxT = np.concatenate([np.repeat(prompts.ids, G, axis=0), resp_NxR], axis=1)
        attn_NxT = np.concatenate([np.repeat(prompts.mask, G, axis=0), resp_mask_NxR], axis=1)
        overlapped = while_grading(tokens_NxT, attn_NxT, logp_NxR) if while_grading is not None else None
        with timer("grade_wait"):
            graded = future.result()  # host sync: rewards are needed from here on
        base, rewards = reward_parts(graded.scores, lengths_N, self.reward_cfg, responses=texts, references=references)
        rollouts = Rollouts(tokens_NxT, attn_NxT, resp_NxR, resp_mask_NxR, logp_NxR, rewards,
                            np.asarray(graded.scores, np.float32), (base > 0).astype(np.float32), lengths_N,
                            graded.metrics())
        return rollouts, overlapped

    # 4. FILTER (DAPO dynamic sampling)
    def _filter(self, params: Any, step_key: jax.Array, timer: StageTimer) -> tuple[Rollouts, dict[str, float]]:
        """Rounds of PROMPTS, SAMPLE, GRADE until P groups with mixed rewards are kept or the rounds run out;
        the batch is always P whole groups (kept groups first, then dropped ones as filler)."""
        P, G = self.cfg.rollout.prompts_per_step, self.cfg.rollout.group_size
        kept: list[Rollouts] = []
        dropped: list[Rollouts] = []
        n_kept = rounds = 0
        while n_kept < P and rounds < self.cfg.algo.max_num_gen_batches:
            batch, _ = self._generate(params, self._next_prompts(), jax.random.fold_in(step_key, rounds), timer)
            rounds += 1
            per_group_PxG = batch.rewards_N.reshape(-1, G)
            mixed_P = per_group_PxG.max(1) > per_group_PxG.min(1)
            kept.append(batch.select_groups(np.flatnonzero(mixed_P), G))
            dropped.append(batch.select_groups(np.flatnonzero(~mixed_P), G))
            n_kept += int(mixed_P.sum())
        merged = Rollouts.concat(kept + dropped, self.pad_id)
        return merged.select_groups(np.arange(P), G), {"dynamic/rounds": rounds, "dynamic/mixed_groups": n_kept,
                                                       "dynamic/filled": float(n_kept >= P)}
