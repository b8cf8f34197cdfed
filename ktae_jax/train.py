"""The training loop: `run(config)` trains a policy with GRPO / DAPO / Dr.GRPO / RLOO (+KTAE).

Per step (`Trainer.step`; host-device boundary named at each host sync):
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
Steps 1-4 are `rollouts.RolloutCollector`'s; 5-6 are here; 7 is `run`'s loop.

Letters: N rollouts in the step (prompts x G), T prompt + response columns, R response columns.
"""

from __future__ import annotations

import functools
import math
import pathlib
import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ktae_jax import mesh as mesh_lib
from ktae_jax import rundir
from ktae_jax.advantages import token_advantages
from ktae_jax.adapters import PolicyWeights
from ktae_jax.checkpoint import Checkpointer
from ktae_jax.config import ConfigError, TrainConfig
from ktae_jax.data import PromptData, load_rows
from ktae_jax.ktae import strongest_key_tokens
from ktae_jax.metrics import MetricsLogger, StageTimer
from ktae_jax.policy import load_policy
from ktae_jax.rewards import GraderPool
from ktae_jax.rollouts import RolloutCollector, Rollouts
from ktae_jax.step import (TrainState, UpdateBatch, UpdateSettings, init_optimizer, learning_rate, make_optimizer,
                           rollout_logprobs, train_step)


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, too little data); the message says why."""


class Trainer:
    """Holds what lives across steps (compiled functions, pool, data); `run` drives it."""

    def __init__(self, cfg: TrainConfig, devices=None):
        self.cfg = cfg
        try:
            self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
        except ValueError as err:  # e.g. more mesh devices asked for than there are
            raise ConfigError(str(err)) from None
        self.batch_devices = mesh_lib.batch_devices(self.mesh)
        cfg.validate(num_batch_devices=self.batch_devices)
        self.run_dir = pathlib.Path(cfg.run.run_dir)
        self.is_main = jax.process_index() == 0
        self.resumed_config: dict[str, Any] = {}  # the config saved with the checkpoint resumed from
        self._resumed_data: dict[str, Any] = {}

        policy = load_policy(cfg.model.path, dtype=cfg.model.param_dtype, compute_dtype=cfg.model.compute_dtype,
                             mesh=self.mesh, init=cfg.model.init, seed=cfg.run.seed,
                             options=cfg.model.options(self.mesh))
        self.tokenizer, self.stop_ids, self.pad_id = policy.tokenizer, policy.stop_ids, policy.pad_id
        self.vocab_size = policy.model.config.vocab_size
        # Only the trainable parameters (LoRA: the adapters) are in the train state (optimizer,
        # checkpoints, gradients); the frozen ones stay beside it, read by the update and the log-prob passes.
        self.weights = PolicyWeights(policy.model, cfg.lora.spec(), seed=cfg.run.seed, mesh=self.mesh,
                                     compute_dtype=cfg.model.compute_dtype)
        self.graphdef, params, self.frozen = self.weights.graphdef, self.weights.initial, self.weights.frozen
        self.tx = make_optimizer(cfg.optim)
        self.ktae = cfg.to_ktae(dict.fromkeys((*self.stop_ids, self.pad_id)))  # None: KTAE off
        # Held per layer on CPU, stacked in checkpoints (`PolicyWeights.held` / `stored`).
        self.state = self.weights.held(self._initial_state(params))
        # The frozen reference (`adapters.PolicyWeights.reference`): a copy, or LoRA's base itself.
        self.ref_params = self.weights.reference(params) if cfg.algo.kl_coef else None

        self.data = PromptData(load_rows(cfg.data), self.tokenizer, cfg.data, cfg.rollout.prompts_per_step,
                               pad_id=self.pad_id)
        if self.is_main:
            print(self.data.stats.summary(cfg.data.max_prompt_len))
        try:
            self.pool = GraderPool(cfg.reward.num_workers or None, cfg.reward.timeout_s)
        except ValueError as err:
            raise ConfigError(f"reward.num_workers / reward.timeout_s: {err}") from None
        self.rollouts = RolloutCollector(cfg, self.weights.sample_graphdef, policy, self.mesh, self.data, self.pool,
                                         rollout_copy=self.weights.rollout_copy if cfg.lora.rank else None)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.run.keep_checkpoints)
        self._compile()

    def _initial_state(self, params) -> TrainState:
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        # A raw uint32 key (checkpoints as a plain array), placed like every other state leaf so that
        # the state's layout is the same before and after the first step (no recompilation).
        rng = jax.device_put(jax.random.PRNGKey(self.cfg.run.seed), replicated)
        opt_state = init_optimizer(self.tx, params, self.mesh)  # moments sharded like their parameters
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        return TrainState(params=params, opt_state=opt_state, step=step, rng=rng)

    # ------------------------------------------------------------------ compiled stages
    def _compile(self) -> None:
        cfg, mesh = self.cfg, self.mesh
        settings = UpdateSettings.for_config(cfg, self.batch_devices)
        self.on_policy = settings.on_policy
        state_sharding = jax.tree.map(lambda x: x.sharding, self.state)
        # Donating the state lets the update overwrite it in place: on accelerators it halves the
        # state's memory. XLA on CPU runs the same update ~20% slower with donated buffers
        # (measured: 248 vs 205 ms on a 28M model, 51 vs 40 ms on a 4M one), and host memory is
        # rarely the limit there: no donation on CPU.
        donate = () if mesh.devices.flat[0].platform == "cpu" else (0,)
        self._train_step_jit = jax.jit(
            functools.partial(train_step, graphdef=self.graphdef, tx=self.tx, settings=settings, mesh=mesh),
            out_shardings=(state_sharding, None), donate_argnums=donate)  # never the frozen parameters
        # Compiled ahead of time, per prompt width (trimmed batches): the widest now, for
        # `memory_report` (the worst case), the others when first met.
        self._train_steps: dict[int, Any] = {}
        self._train_step_for(cfg.data.max_prompt_len)
        logprob_layout = settings.logprob_layout(cfg, mesh)
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
                self.state, self._abstract_batch(prompt_width), self.frozen).compile()
        return self._train_steps[prompt_width]

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

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, Any]:
        """Steps 1-6 of the module docstring; returns the step's metrics (step 7 is `run`'s)."""
        timer = StageTimer("sample", "grade_wait")
        with timer("step"):
            # 1-4. PROMPTS, SAMPLE, GRADE, FILTER (rollouts.py); the old / reference log-probs
            # are dispatched while the grading runs.
            step_key = jax.random.fold_in(self.state.rng, step)
            batch, (tokens, attn, old_logp, ref_logp), dyn_metrics = self.rollouts.collect(
                self.state.params, step_key, timer, while_grading=self._logprobs_while_grading)
            with timer("logprobs_wait"):
                jax.block_until_ready((old_logp, ref_logp))

            # 5. ADVANTAGES
            with timer("advantages"):
                # KTAE splits on the unshaped base reward (the grader's verdict for the built-in reward
                # kinds); the rollout advantage uses the shaped reward.
                resp, resp_mask, rewards, correct = mesh_lib.place_batch(
                    self.mesh, batch.resp_NxR, batch.resp_mask_NxR, batch.rewards_N, batch.passed_N)
                adv, key = jax.block_until_ready(self._advantages(resp, resp_mask, rewards, correct, ktae=self.ktae))

            # 6. UPDATE
            with timer("update"):
                train = self._train_step_for(tokens.shape[1] - self.cfg.rollout.max_new_tokens)
                self.state, metrics = train(self.state, UpdateBatch(tokens, attn, resp_mask, adv, old_logp, ref_logp),
                                            self.frozen)
                metrics = {k: float(v) for k, v in mesh_lib.to_host(metrics).items()}  # host sync: NaN check, logging
        metrics.update(self._rollout_metrics(batch, step, timer.seconds), **dyn_metrics, **timer.seconds,
                       **self.rollouts.sampler_metrics(timer))
        if key is not None:
            metrics.update(self._ktae_diagnostics(resp, resp_mask, key))
        return metrics

    def _logprobs_while_grading(self, tokens_NxT, attn_NxT, sampler_logp_NxR):
        tokens, attn = mesh_lib.place_batch(self.mesh, tokens_NxT, attn_NxT)
        if self.on_policy:  # the update uses the current policy's own log-probs as the old ones
            (old_logp,) = mesh_lib.place_batch(self.mesh, np.zeros_like(sampler_logp_NxR))
        elif self.cfg.algo.recompute_old_logprobs:
            old_logp, _ = self._logprobs(self.state.params, tokens, attn, frozen=self.frozen)
        else:
            (old_logp,) = mesh_lib.place_batch(self.mesh, sampler_logp_NxR)
        if self.ref_params is None:  # kl_coef = 0: no reference pass at all
            return tokens, attn, old_logp, jnp.zeros_like(old_logp)
        return tokens, attn, old_logp, self._logprobs(self.ref_params, tokens, attn, frozen=self.frozen)[0]

    def _rollout_metrics(self, batch: Rollouts, step: int, times: dict[str, float]) -> dict[str, Any]:
        cfg, lengths = self.cfg, batch.lengths_N
        truncated = (lengths >= cfg.rollout.max_new_tokens) & ~np.isin(
            batch.resp_NxR[np.arange(len(lengths)), np.maximum(lengths - 1, 0)], self.stop_ids)
        updates_per_step = cfg.algo.ppo_epochs * cfg.rollout.prompts_per_step // cfg.mini_batch_prompts
        return {
            "reward/mean": float(batch.rewards_N.mean()), "reward/accuracy": float(batch.correct_N.mean()),
            "response/length_mean": float(lengths.mean()), "response/length_max": int(lengths.max()),
            **{f"response/length_p{q}": float(np.percentile(lengths, q)) for q in (10, 50, 90)},
            "response/truncated_frac": float(truncated.mean()),
            "optim/lr": learning_rate(cfg.optim, step * updates_per_step),
            "throughput/tokens_per_s": float(lengths.sum()) / times["time/step_s"],
            **{k: v for k, v in batch.grade_metrics.items() if k != "reward/accuracy"},
        }

    def _ktae_diagnostics(self, resp, resp_mask, key) -> dict[str, Any]:
        k = self.cfg.run.ktae_top_tokens
        top_ids, top_vals, low_ids, low_vals = mesh_lib.to_host(
            strongest_key_tokens(resp, resp_mask, key, vocab_size=self.vocab_size, k=k))
        as_text = lambda ids, vals: [[self.tokenizer.decode([int(i)]), round(float(v), 4)]  # noqa: E731
                                     for i, v in zip(ids, vals) if math.isfinite(v)]
        key_abs_mean = mesh_lib.to_host(jnp.abs(key).sum() / jnp.maximum(resp_mask.sum(), 1))
        return {"ktae/top_positive": as_text(top_ids, top_vals), "ktae/top_negative": as_text(low_ids, low_vals),
                "ktae/key_abs_mean": float(key_abs_mean)}

    # ------------------------------------------------------------------ checkpoints, export, validation
    def save(self, step: int) -> None:
        self.checkpointer.save(step, self.weights.stored(self.state), self.data.get_state(), self.cfg.to_dict())

    def restore_latest(self) -> int:
        """The newest readable checkpoint's step (0: none); damaged newer ones are reported and skipped."""
        abstract = self.weights.stored_abstract(self.state)
        found = self.checkpointer.restore_latest(abstract, warn=print if self.is_main else lambda _: None)
        if found is None:
            return 0
        step, stored, self._resumed_data, self.resumed_config = found
        self.state = self.weights.held(stored)
        saved_prompts = self.resumed_config.get("rollout", {}).get("prompts_per_step")
        self.data.set_state(self._resumed_data, saved_batch_prompts=saved_prompts)
        return step

    def export(self) -> pathlib.Path:
        """The policy in Hugging Face format at run_dir/hf (LoRA: the adapters folded in, and the
        adapters alone in PEFT's layout at run_dir/hf_adapter): gathered by every process, written by process 0."""
        return self.weights.export(self.weights.stored(self.state.params), self.tokenizer, self.run_dir / "hf",
                                   base_model=self.cfg.model.path, write=self.is_main)[0]

    def close(self) -> None:
        try:
            self.checkpointer.close()
        finally:
            self.pool.close()

    def validate(self, step: int) -> dict[str, float]:
        """Greedy evaluation on run.eval_file (per-item records under run_dir/eval/step_N)."""
        from ktae_jax.data import read_rows
        from ktae_jax.evaluate import Protocol, evaluate, validation_metrics

        cfg = self.cfg
        rows = read_rows(cfg.run.eval_file, cfg.data.prompt_field, cfg.data.answer_field)
        summary = evaluate((self.weights.sample_graphdef, self.weights.full_state(self.weights.stored(self.state.params))), self.tokenizer, {"val": rows},
                           out_dir=self.run_dir / "eval" / f"step_{step:06d}", protocol=Protocol.of_run(cfg),
                           batch_prompts=cfg.rollout.prompts_per_step, mesh=self.mesh, pool=self.pool,
                           limit=cfg.run.eval_limit or None, stop_ids=self.stop_ids, progress=False)
        return validation_metrics(summary) if summary else {}


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint after the current step and stops."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class Preempted(TrainingError):
    """Stopped early by SIGTERM after saving a checkpoint: rerunning the same command resumes
    (`ktae-train` exits with `cli.train.EXIT_PREEMPTED`)."""


def run(cfg: TrainConfig, *, max_steps: int | None = None, devices=None,
        allow_config_change: bool = False) -> dict[str, Any]:
    """Train until `run.max_steps` (or `max_steps`, if given: stop early, e.g. to test resume):
    `Trainer.step` (steps 1-6), then 7. LOG / SAVE.

    Holds the run directory's lock throughout (a second trainer there is refused). On resume, a
    config that differs from the checkpoint's in a way that changes what the run computes is
    refused unless `allow_config_change`. Raises `Preempted` after saving on SIGTERM.
    """
    if cfg.run.eval_every:  # checked now, not at the first evaluation
        from ktae_jax.data import read_rows

        read_rows(cfg.run.eval_file, cfg.data.prompt_field, cfg.data.answer_field)
    lock = rundir.RunDirLock(cfg.run.run_dir, jax.process_index())
    try:
        trainer = Trainer(cfg, devices)
        try:
            return _run(trainer, max_steps, allow_config_change)
        finally:
            trainer.close()
    finally:
        lock.release()


def _resume(trainer: Trainer, stop_at: int, allow_config_change: bool) -> int:
    """Restores the newest checkpoint, checks the config against its own, records the config."""
    cfg = trainer.cfg
    start = trainer.restore_latest()
    lines = []
    if start:
        changes = rundir.config_changes(trainer.resumed_config, cfg.to_dict(), TrainConfig().to_dict())
        saved_usable = trainer._resumed_data.get("usable_prompts")
        if saved_usable is not None and saved_usable != len(trainer.data.examples):
            changes["data (usable prompts)"] = (saved_usable, len(trainer.data.examples))
        lines = rundir.check_resume(changes, step=start, checkpoint=trainer.checkpointer.directory / str(start),
                                    allow=allow_config_change)
    left = trainer.data.steps_left()
    if left is not None and left < stop_at - start:
        raise TrainingError(f"data.num_epochs={cfg.data.num_epochs} leaves {left} steps of "
                            f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} prompts after step {start}, "
                            f"fewer than the {stop_at - start} asked for (run.max_steps={cfg.run.max_steps})")
    if trainer.is_main:
        for line in lines:
            print(line)
        rundir.record_config(trainer.run_dir, cfg.to_dict(), start_step=start)
    return start


def _run(trainer: Trainer, max_steps: int | None, allow_config_change: bool) -> dict[str, Any]:
    cfg = trainer.cfg
    stop_at = min(cfg.run.max_steps, max_steps) if max_steps is not None else cfg.run.max_steps
    start = _resume(trainer, stop_at, allow_config_change)
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
            # 7. LOG / SAVE: a non-finite loss stops the run before anything of this step is kept.
            if not all(math.isfinite(v) for k, v in metrics.items() if k.startswith(("loss/", "optim/grad_norm"))):
                raise TrainingError(f"step {step}: non-finite loss or gradient ({ {k: v for k, v in metrics.items() if k.startswith('loss/')} }); "
                                    f"stopping without saving this state (last checkpoint: "
                                    f"{trainer.checkpointer.latest_step()})")
            if cfg.run.eval_every and step % cfg.run.eval_every == 0:
                metrics.update(trainer.validate(step))
            metrics.update(trainer.data.metrics())
            logger.log(step, metrics)
            last = metrics
            trainer.checkpointer.check()  # a failed background save stops the run now
            if step % cfg.run.checkpoint_every == 0 or step == stop_at or preemption.requested:
                trainer.save(step)
            if preemption.requested:
                break
        trainer.checkpointer.wait()
        if preemption.requested:
            print(f"SIGTERM: checkpoint saved at step {step}; stopping")
            raise Preempted(f"stopped by SIGTERM after step {step} (checkpoint saved); rerun the same command to resume")
        if cfg.run.export_hf and step >= cfg.run.max_steps:
            trainer.export()
    finally:
        preemption.restore()
        logger.close()
    return last
