"""The training loop: `run(config)` trains a policy with GRPO / DAPO / Dr.GRPO / RLOO (+KTAE).

Per step (host-device boundary named at each host sync):
  1. PROMPTS     next batch from the grain iterator                                   (host)
  2. SAMPLE      G responses per prompt, one jitted program                           (device)
  3. GRADE       responses decoded and graded in the process pool, submitted async;
                 meanwhile the device computes old / reference log-probs              (host || device)
  4. FILTER      DAPO dynamic sampling: keep groups with mixed rewards, sample again
                 until the batch is full or `max_num_gen_batches` rounds              (host)
  5. ADVANTAGES  rollout estimator (+ KTAE key scores), whole groups per device        (device)
  6. UPDATE      `step.train_step(state, batch)`, compiled per prompt width, sharded     (device)
  7. LOG / SAVE  metrics (NaN stops the run before anything is saved); checkpoints
                 every N steps and on SIGTERM; the final policy exported in HF format  (host)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from ktae_jax import mesh as mesh_lib
from ktae_jax.advantages import rollout_advantages, token_advantages
from ktae_jax.checkpoint import Checkpointer
from ktae_jax.config import TrainConfig
from ktae_jax.data import PromptBatch, PromptData, load_rows
from ktae_jax.metrics import MetricsLogger
from ktae_jax.models import ModelConfig, eos_token_ids, init_random, load_pretrained, load_tokenizer, save_pretrained
from ktae_jax.rewards import GraderPool, RewardConfig, compute_rewards
from ktae_jax.sample import SamplingConfig, sample_jit
from ktae_jax.step import (TrainState, UpdateBatch, UpdateSettings, learning_rate, make_optimizer, rollout_logprobs,
                           strongest_key_tokens, train_step)


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, exhausted data); the message says why."""


def resolve_model_path(path: str) -> pathlib.Path:
    if path == "tiny":
        from ktae_jax.tiny import ensure_base

        return pathlib.Path(ensure_base())
    return pathlib.Path(path)


def load_policy(cfg: TrainConfig, mesh) -> tuple[Any, Any, tuple[int, ...]]:
    """(model, tokenizer, stop ids) placed on `mesh`."""
    folder = resolve_model_path(cfg.model.path)
    dtype, compute = jnp.dtype(cfg.model.param_dtype), jnp.dtype(cfg.model.compute_dtype)
    if cfg.model.init == "random":
        import json

        model_cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        model = init_random(model_cfg, seed=cfg.run.seed, dtype=dtype, compute_dtype=compute)
        tokenizer = load_tokenizer(folder)
        mesh_lib.shard_model(model, mesh)
    else:
        model, tokenizer = load_pretrained(folder, dtype=dtype, compute_dtype=compute, mesh=mesh)
    if tokenizer is None:
        raise TrainingError(f"{folder}: the trainer needs a tokenizer in the model folder")
    return model, tokenizer, eos_token_ids(folder, model.config, tokenizer)


@dataclasses.dataclass
class Rollouts:
    """One step's rollouts on the host side of the boundary (N = prompts x G rows)."""

    tokens_NxT: np.ndarray
    attn_NxT: np.ndarray
    resp_NxR: np.ndarray
    resp_mask_NxR: np.ndarray
    sampler_logp_NxR: np.ndarray
    rewards_N: np.ndarray
    correct_N: np.ndarray
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


class Trainer:
    """Holds what lives across steps (compiled functions, pool, data); `run` drives it."""

    def __init__(self, cfg: TrainConfig, devices=None):
        self.cfg = cfg
        self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
        self.batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        cfg.validate(num_batch_devices=self.batch_devices)
        self.run_dir = pathlib.Path(cfg.run.run_dir)
        self.is_main = jax.process_index() == 0
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

        model, self.tokenizer, self.stop_ids = load_policy(cfg, self.mesh)
        self.model_config = model.config
        self.vocab_size = model.config.vocab_size
        self.graphdef, params = nnx.split(model)
        self.tx = make_optimizer(cfg.optim)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0])
        ignore = tuple(dict.fromkeys((*self.stop_ids, self.pad_id)))
        self.ktae = cfg.ktae.to_ktae_config(ignore, eps=1e-6) if cfg.ktae.enabled else None

        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        # A raw uint32 key (checkpoints as a plain array), placed like every other state leaf so that
        # the state's layout is the same before and after the first step (no recompilation).
        rng = jax.device_put(jax.random.PRNGKey(cfg.run.seed), replicated)
        # Moments follow their parameters' shardings; leaves made from nothing (Adam's step count)
        # would land on one device: replicate those over the mesh.
        mesh_devices = set(self.mesh.devices.flat)
        opt_state = jax.tree.map(lambda x: x if x.sharding.device_set == mesh_devices else jax.device_put(x, replicated),
                                 jax.jit(self.tx.init)(params))
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        self.state = TrainState(params=params, opt_state=opt_state, step=step, rng=rng)
        # The frozen reference: a copy, since the train step donates (overwrites) the policy's buffers.
        self.ref_params = jax.tree.map(jnp.copy, params) if cfg.algo.kl_coef else None

        self.data = PromptData(load_rows(cfg.data), self.tokenizer, cfg.data, cfg.rollout.prompts_per_step)
        self.sampling = SamplingConfig(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                       top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, eos_ids=self.stop_ids,
                                       pad_id=self.pad_id, num_samples=cfg.rollout.group_size)
        self.reward_cfg = RewardConfig(kind=cfg.reward.kind, overlong_buffer=cfg.reward.overlong_buffer,
                                       overlong_factor=cfg.reward.overlong_factor,
                                       max_response_len=cfg.rollout.max_new_tokens,
                                       format_weight=cfg.reward.format_weight, custom_fn=cfg.reward.custom_fn or None)
        self.pool = GraderPool(cfg.reward.num_workers or None, cfg.reward.timeout_s)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.run.keep_checkpoints)
        self._compile()

    # ------------------------------------------------------------------ compiled stages
    def _compile(self) -> None:
        cfg, mesh = self.cfg, self.mesh
        rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
        mini_rows = cfg.mini_batch_prompts * cfg.rollout.group_size
        settings = UpdateSettings(algo=cfg.algo, num_minibatches=rows // mini_rows,
                                  num_microbatches=mini_rows // cfg.micro_batch_rollouts(self.batch_devices),
                                  temperature=cfg.rollout.temperature, group_size=cfg.rollout.group_size)
        self.on_policy = settings.on_policy
        state_sharding = jax.tree.map(lambda x: x.sharding, self.state)
        self.batch_sharding = lambda x: mesh_lib.batch_sharding(mesh, x.shape)  # noqa: E731
        # Donating the state lets the update overwrite it in place: on accelerators it halves the
        # state's memory. XLA on CPU runs the same update ~20% slower with donated buffers
        # (measured: 248 vs 205 ms on a 28M model, 51 vs 40 ms on a 4M one), and host memory is
        # rarely the limit there: no donation on CPU.
        donate = () if mesh.devices.flat[0].platform == "cpu" else (0,)
        self._train_step_jit = jax.jit(
            functools.partial(train_step, graphdef=self.graphdef, tx=self.tx, settings=settings, mesh=mesh),
            out_shardings=(state_sharding, None), donate_argnums=donate)
        # Compiled ahead of time, per prompt width (trimmed batches): the widest now, for
        # `memory_report` (the worst case), the others when first met.
        self._train_steps: dict[int, Any] = {}
        self._train_step_for(cfg.data.max_prompt_len)
        logprob_layout = dataclasses.replace(
            settings.layout(mesh), num_microbatches=mini_rows // cfg.logprob_micro_batch_rollouts(self.batch_devices))
        self._logprobs = jax.jit(functools.partial(rollout_logprobs, self.graphdef,
                                                   response_len=cfg.rollout.max_new_tokens,
                                                   temperature=cfg.rollout.temperature, layout=logprob_layout,
                                                   mesh=mesh))
        self._advantages = functools.partial(
            token_advantages, group_size=cfg.rollout.group_size, vocab_size=self.vocab_size,
            estimator=cfg.algo.estimator, mesh=mesh)

    def _train_step_for(self, prompt_width: int):
        if prompt_width not in self._train_steps:
            self._train_steps[prompt_width] = self._train_step_jit.lower(
                self.state, self._abstract_batch(prompt_width)).compile()
        return self._train_steps[prompt_width]

    def _put(self, *arrays):
        """Host arrays (the same on every process) -> global arrays split over the batch devices."""
        return [mesh_lib.place(x, self.batch_sharding(x)) for x in map(np.asarray, arrays)]

    # ------------------------------------------------------------------ one step
    def _sample(self, prompts: PromptBatch, key) -> tuple[np.ndarray, ...]:
        """(tokens, mask, policy log-probs, lengths) of G responses per prompt, in sampler calls of
        `rollout.sample_prompts_per_device` prompts per device (bounding the KV cache)."""
        chunk = self.cfg.sample_chunk_prompts(self.batch_devices)
        parts = []
        for i, start in enumerate(range(0, len(prompts.ids), chunk)):
            ids, mask = self._put(prompts.ids[start:start + chunk], prompts.mask[start:start + chunk])
            rollout = sample_jit(self.graphdef, self.state.params, ids, mask, jax.random.fold_in(key, i),
                                 config=self.sampling, mesh=self.mesh)
            parts.append(mesh_lib.to_host((rollout.tokens, rollout.mask, rollout.policy_logp, rollout.lengths)))  # host sync
        return tuple(np.concatenate(arrays) for arrays in zip(*parts))

    def _grade_async(self, prompts: PromptBatch, resp_NxR: np.ndarray, lengths_N: np.ndarray):
        texts = self.tokenizer.batch_decode([row[:n] for row, n in zip(resp_NxR.tolist(), lengths_N.tolist())],
                                            skip_special_tokens=True)
        references = [a for a in prompts.answers for _ in range(self.cfg.rollout.group_size)]
        return texts, references, self.pool.submit(texts, references)

    def _generate(self, prompts: PromptBatch, key, *, while_grading=None):
        """SAMPLE + GRADE one batch of prompts. `while_grading(tokens, attn, sampler_logp)` is called
        after the grading is submitted and before its result is awaited: device work it dispatches
        (JAX dispatch is asynchronous) overlaps the host grading. Returns (rollouts, its result)."""
        t = time.perf_counter()
        resp, resp_mask, logp, lengths = self._sample(prompts, key)
        self._times["time/sample_s"] += time.perf_counter() - t
        texts, references, future = self._grade_async(prompts, resp, lengths)
        G = self.cfg.rollout.group_size
        tokens = np.concatenate([np.repeat(prompts.ids, G, axis=0), resp], axis=1)
        attn = np.concatenate([np.repeat(prompts.mask, G, axis=0), resp_mask], axis=1)
        overlapped = while_grading(tokens, attn, logp) if while_grading is not None else None
        t = time.perf_counter()
        graded = future.result()  # host sync: rewards are needed from here on
        self._times["time/grade_wait_s"] += time.perf_counter() - t
        rewards = compute_rewards(graded.scores, lengths, self.reward_cfg, responses=texts, references=references)
        rollouts = Rollouts(tokens, attn, resp, resp_mask, logp, np.asarray(rewards, np.float32),
                            np.asarray(graded.scores, np.float32), lengths, graded.metrics())
        return rollouts, overlapped

    def _collect(self, step_key) -> tuple[Rollouts, dict[str, float]]:
        """PROMPTS, SAMPLE, GRADE and (DAPO) FILTER until the step's batch is full."""
        cfg = self.cfg
        P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
        if not cfg.algo.dynamic_sampling:
            return self._generate(self._next_prompts(), jax.random.fold_in(step_key, 0))[0], {}
        kept: list[Rollouts] = []
        dropped: list[Rollouts] = []
        n_kept = 0
        rounds = 0
        while n_kept < P and rounds < cfg.algo.max_num_gen_batches:
            batch, _ = self._generate(self._next_prompts(), jax.random.fold_in(step_key, rounds))
            rounds += 1
            per_group = batch.rewards_N.reshape(-1, G)
            mixed = per_group.max(1) > per_group.min(1)
            kept.append(batch.select_groups(np.flatnonzero(mixed), G))
            dropped.append(batch.select_groups(np.flatnonzero(~mixed), G))
            n_kept += int(mixed.sum())
        merged = Rollouts.concat(kept + dropped, self.pad_id)  # kept groups first; the rest only fill the batch
        batch = merged.select_groups(np.arange(P), G)
        return batch, {"dynamic/rounds": rounds, "dynamic/mixed_groups": n_kept, "dynamic/filled": float(n_kept >= P)}

    def _next_prompts(self) -> PromptBatch:
        try:
            batch = next(self.data)
        except StopIteration as err:
            raise TrainingError(str(err)) from None
        return batch.trimmed() if self.cfg.data.trim_prompt_padding else batch

    def _old_and_ref_logprobs(self, tokens, attn, sampler_logp):
        if self.on_policy:  # the update uses the current policy's own log-probs as the old ones
            (old_logp,) = self._put(np.zeros_like(sampler_logp))
        elif self.cfg.algo.recompute_old_logprobs:
            old_logp, _ = self._logprobs(self.state.params, tokens, attn)
        else:
            (old_logp,) = self._put(sampler_logp)
        if self.ref_params is None:  # kl_coef = 0: no reference pass at all
            return old_logp, jnp.zeros_like(old_logp)
        return old_logp, self._logprobs(self.ref_params, tokens, attn)[0]

    def step(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        self._times = times = {"time/sample_s": 0.0, "time/grade_wait_s": 0.0}
        t0 = time.perf_counter()
        step_key = jax.random.fold_in(self.state.rng, step)

        def logprobs_while_grading(tokens_np, attn_np, sampler_logp):
            tokens, attn = self._put(tokens_np, attn_np)
            return (tokens, attn, *self._old_and_ref_logprobs(tokens, attn, sampler_logp))

        if cfg.algo.dynamic_sampling:  # the filter needs the rewards first: no overlap
            batch, dyn_metrics = self._collect(step_key)
            tokens, attn, old_logp, ref_logp = logprobs_while_grading(batch.tokens_NxT, batch.attn_NxT,
                                                                      batch.sampler_logp_NxR)
        else:
            dyn_metrics = {}
            batch, (tokens, attn, old_logp, ref_logp) = self._generate(
                self._next_prompts(), jax.random.fold_in(step_key, 0), while_grading=logprobs_while_grading)
        t = time.perf_counter()
        jax.block_until_ready((old_logp, ref_logp))
        times["time/logprobs_wait_s"] = time.perf_counter() - t

        t = time.perf_counter()
        resp, resp_mask, rewards = self._put(batch.resp_NxR, batch.resp_mask_NxR, batch.rewards_N)
        adv = self._advantages(resp, resp_mask, rewards, ktae=self.ktae)
        times["time/advantages_s"] = _block(adv, t)

        t = time.perf_counter()
        update = UpdateBatch(tokens, attn, resp_mask, adv, old_logp, ref_logp)
        train = self._train_step_for(tokens.shape[1] - cfg.rollout.max_new_tokens)
        self.state, metrics = train(self.state, update)
        metrics = {k: float(v) for k, v in mesh_lib.to_host(metrics).items()}  # host sync: NaN check, logging
        times["time/update_s"] = time.perf_counter() - t
        times["time/step_s"] = time.perf_counter() - t0

        lengths = batch.lengths_N
        truncated = (lengths >= cfg.rollout.max_new_tokens) & ~np.isin(
            batch.resp_NxR[np.arange(len(lengths)), np.maximum(lengths - 1, 0)], self.stop_ids)
        metrics.update({
            "reward/mean": float(batch.rewards_N.mean()), "reward/accuracy": float(batch.correct_N.mean()),
            "response/length_mean": float(lengths.mean()), "response/length_max": int(lengths.max()),
            "response/truncated_frac": float(truncated.mean()),
            "optim/lr": learning_rate(cfg.optim, step * self._updates_per_step()),
            "throughput/tokens_per_s": float(lengths.sum()) / times["time/step_s"],
            **{k: v for k, v in batch.grade_metrics.items() if k != "reward/accuracy"}, **dyn_metrics, **times,
        })
        if self.ktae is not None:
            metrics.update(self._ktae_diagnostics(resp, resp_mask, rewards, adv))
        return metrics

    def _updates_per_step(self) -> int:
        cfg = self.cfg
        return cfg.algo.ppo_epochs * cfg.rollout.prompts_per_step // cfg.mini_batch_prompts

    def _ktae_diagnostics(self, resp, resp_mask, rewards, adv) -> dict[str, Any]:
        rollout = rollout_advantages(rewards, group_size=self.cfg.rollout.group_size, estimator=self.cfg.algo.estimator)
        key = jnp.where(resp_mask > 0, adv - rollout[:, None], 0.0)
        k = self.cfg.run.ktae_top_tokens
        top_ids, top_vals, low_ids, low_vals = mesh_lib.to_host(
            strongest_key_tokens(resp, resp_mask, key, vocab_size=self.vocab_size, k=k))
        as_text = lambda ids, vals: [[self.tokenizer.decode([int(i)]), round(float(v), 4)]  # noqa: E731
                                     for i, v in zip(ids, vals) if math.isfinite(v)]
        key_abs_mean = mesh_lib.to_host(jnp.abs(key).sum() / jnp.maximum(resp_mask.sum(), 1))
        return {"ktae/top_positive": as_text(top_ids, top_vals), "ktae/top_negative": as_text(low_ids, low_vals),
                "ktae/key_abs_mean": float(key_abs_mean)}

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int) -> None:
        self.checkpointer.save(step, self.state, self.data.get_state(), self.cfg.to_dict())

    def restore_latest(self) -> int:
        latest = self.checkpointer.latest_step()
        if latest is None:
            return 0
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        self.state, data_state, _ = self.checkpointer.restore(latest, abstract)
        self.data.set_state(data_state)
        return latest

    def export(self) -> pathlib.Path:
        """The policy in Hugging Face format at run_dir/hf: gathered by every process, written by process 0."""
        model = nnx.merge(self.graphdef, mesh_lib.to_host(self.state.params))
        if self.is_main:
            save_pretrained(model, self.tokenizer, self.run_dir / "hf")
        return self.run_dir / "hf"

    def close(self) -> None:
        self.checkpointer.close()
        self.pool.close()

    def validate(self, step: int) -> dict[str, float]:
        """Greedy evaluation on run.eval_file (per-item records under run_dir/eval/step_N)."""
        from ktae_jax.data import read_rows
        from ktae_jax.evaluate import Protocol, evaluate, validation_metrics

        cfg = self.cfg
        rows = read_rows(cfg.run.eval_file, cfg.data.prompt_field, cfg.data.answer_field)
        protocol = Protocol(max_new_tokens=cfg.rollout.max_new_tokens, template=cfg.data.template,
                            system_prompt=cfg.data.system_prompt)
        summary = evaluate((self.graphdef, self.state.params), self.tokenizer, {"val": rows},
                           out_dir=self.run_dir / "eval" / f"step_{step:06d}", max_new_tokens=protocol.max_new_tokens,
                           batch_prompts=cfg.rollout.prompts_per_step, mesh=self.mesh, pool=self.pool,
                           limit=cfg.run.eval_limit or None, stop_ids=self.stop_ids, protocol=protocol, progress=False)
        return validation_metrics(summary) if summary else {}

    def _abstract_batch(self, prompt_width: int) -> UpdateBatch:
        cfg = self.cfg
        N, Tp, R = cfg.rollout.prompts_per_step * cfg.rollout.group_size, prompt_width, cfg.rollout.max_new_tokens
        shape = lambda s, d: jax.ShapeDtypeStruct(s, d, sharding=mesh_lib.batch_sharding(self.mesh, s))  # noqa: E731
        return UpdateBatch(shape((N, Tp + R), jnp.int32), shape((N, Tp + R), jnp.int32), shape((N, R), jnp.int32),
                           shape((N, R), jnp.float32), shape((N, R), jnp.float32), shape((N, R), jnp.float32))

    def memory_report(self) -> str:
        """The compiled update's memory analysis (XLA's own numbers)."""
        analysis = self._train_step_for(self.cfg.data.max_prompt_len).memory_analysis()
        if analysis is None:
            return "compiled train step: no memory analysis on this backend"
        mb = lambda n: f"{n / 2**20:.1f} MB"  # noqa: E731
        return (f"compiled train step memory per device: arguments {mb(analysis.argument_size_in_bytes)}, "
                f"outputs {mb(analysis.output_size_in_bytes)}, temporaries {mb(analysis.temp_size_in_bytes)}, "
                f"generated code {mb(analysis.generated_code_size_in_bytes)}")


def _block(x, start: float) -> float:
    jax.block_until_ready(x)
    return time.perf_counter() - start


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint after the current step and stops."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def run(cfg: TrainConfig, *, max_steps: int | None = None, devices=None) -> dict[str, Any]:
    """Train until `run.max_steps` (or `max_steps`, if given: stop early, e.g. to test resume)."""
    trainer = Trainer(cfg, devices)
    start = trainer.restore_latest()
    stop_at = min(cfg.run.max_steps, max_steps) if max_steps is not None else cfg.run.max_steps
    if trainer.is_main:
        print(trainer.memory_report())
        if start:
            print(f"resumed from {trainer.checkpointer.directory / str(start)}")
    logger = MetricsLogger(trainer.run_dir, total_steps=cfg.run.max_steps, start_step=start,
                           tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb, progress=cfg.run.progress,
                           config=cfg.to_dict())
    preemption = _Preemption()
    last: dict[str, Any] = {}
    step = start
    try:
        for step in range(start + 1, stop_at + 1):
            metrics = trainer.step(step)
            if not all(math.isfinite(v) for k, v in metrics.items() if k.startswith(("loss/", "optim/grad_norm"))):
                raise TrainingError(f"step {step}: non-finite loss or gradient ({ {k: v for k, v in metrics.items() if k.startswith('loss/')} }); "
                                    f"stopping without saving this state (last checkpoint: "
                                    f"{trainer.checkpointer.latest_step()})")
            if cfg.run.eval_every and step % cfg.run.eval_every == 0:
                metrics.update(trainer.validate(step))
            logger.log(step, metrics)
            last = metrics
            if step % cfg.run.checkpoint_every == 0 or step == stop_at or preemption.requested:
                trainer.save(step)
            if preemption.requested:
                print(f"SIGTERM: checkpoint saved at step {step}; stopping")
                break
        trainer.checkpointer.wait()
        if cfg.run.export_hf and step >= cfg.run.max_steps:
            trainer.export()
    finally:
        preemption.restore()
        logger.close()
        trainer.close()
    return last
