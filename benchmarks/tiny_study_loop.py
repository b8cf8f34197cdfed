"""The study's runs (`tiny_ktae_study.py`): one RL run (GRPO, optionally + KTAE) or one SFT control
run from a variant's base, with held-out evaluations, all arms sharing one compilation per task.

The steps of an RL update follow configs/tiny.yaml's recipe with one on-policy update per batch:
  1. SAMPLE      `sample.sample_jit`: 8 responses per prompt at temperature 1        (jitted)
  2. GRADE       exact `\\boxed{}` answer, `variants.grade`                            (host)
  3. ADVANTAGES  `advantages.token_advantages`: GRPO z-score [+ KTAE key scores]     (jitted)
  4. UPDATE      token-mean policy-gradient loss on `models.response_logprobs`, AdamW (jitted)
With one update per batch the policy ratio is 1, so GRPO's clipped surrogate has exactly this
gradient; the KL term is off, as in configs/tiny.yaml.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ktae_jax.advantages import token_advantages
from ktae_jax.ktae import KTAEConfig
from ktae_jax.models import load_pretrained, response_logprobs
from ktae_jax.sample import SamplingConfig, sample_jit
from ktae_jax.tiny.pretrain import encode_examples, sft_loss
from ktae_jax.tiny.tokenizer import prompt_text
from ktae_jax.tiny.variants import VariantConfig, ensure_base, grade, make_problems, make_sft_examples, shortcuts_taken

PROMPTS, GROUP, LR, SFT_BATCH = 16, 8, 3e-4, 64
HELD_OUT_SEED = 12345  # the fixed draw of held-out problems (test split)


def make_tx() -> optax.GradientTransformation:
    """configs/tiny.yaml's optimizer: clip-by-norm 1, AdamW lr 3e-4, b1 0.9, b2 0.999, no decay."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, b1=0.9, b2=0.999, weight_decay=0.0))


def pg_loss(graphdef, params, prompt_ids, prompt_mask, resp_ids, resp_mask, adv):
    model = nnx.merge(graphdef, params)
    logp, _ = response_logprobs(model, prompt_ids, prompt_mask, resp_ids, resp_mask)
    m = resp_mask.astype(jnp.float32)
    return -jnp.sum(adv * logp * m) / jnp.maximum(jnp.sum(m), 1.0)  # token-mean aggregation


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def rl_update(graphdef, tx, params, opt_state, prompt_ids, prompt_mask, resp_ids, resp_mask, adv):
    loss, grads = jax.value_and_grad(pg_loss, argnums=1)(graphdef, params, prompt_ids, prompt_mask, resp_ids,
                                                          resp_mask, adv)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def sft_update(graphdef, tx, params, opt_state, ids, mask, loss_mask):
    loss, grads = jax.value_and_grad(sft_loss, argnums=1)(graphdef, params, ids, mask, loss_mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


class Rig:
    """One task: its base, tokenizer, held-out set and the encoding of prompts."""

    def __init__(self, name: str, held_out: int):
        self.task = VariantConfig(name)
        model, self.tok = load_pretrained(ensure_base(name))
        self.graphdef, self.base = nnx.split(model)
        self.vocab = model.config.vocab_size
        self.eos, self.pad = self.tok.eos_token_id, self.tok.pad_token_id
        self.tx = make_tx()
        self.held = make_problems(self.task, held_out, seed=HELD_OUT_SEED, split="test")
        self.held_ids = self.encode([p["problem"] for p in self.held])

    def encode(self, problems: list[str]) -> np.ndarray:
        rows = [self.tok(prompt_text(self.tok, p), add_special_tokens=False)["input_ids"] for p in problems]
        if len({len(r) for r in rows}) != 1:  # 2-digit terms: every prompt of a task has one length
            raise ValueError(f"{self.task.name}: prompts of different lengths")
        return np.asarray(rows, np.int32)

    def sampling(self, *, greedy: bool = False, group: int = 1) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.task.max_new_tokens, temperature=1.0, greedy=greedy,
                              eos_ids=(self.eos,), pad_id=self.pad, num_samples=group)

    def generate(self, params, ids: np.ndarray, key, config: SamplingConfig):
        out = sample_jit(self.graphdef, params, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32), key, config=config)
        out = jax.device_get(out)
        texts = self.tok.batch_decode([t[:n] for t, n in zip(out.tokens.tolist(), out.lengths.tolist())],
                                      skip_special_tokens=True)
        return out, texts

    def evaluate(self, params, key, *, greedy: bool = False) -> dict:
        """Held-out accuracy, mean length (tokens incl. EOS), mean shortcuts per response, the share
        of responses with any shortcut and the accuracy of those without one (the reliable style's:
        what RL can reach by dropping shortcuts; NaN when every response takes one)."""
        out, texts = self.generate(params, self.held_ids, key, self.sampling(greedy=greedy))
        correct = np.asarray([grade(t, p["answer"]) for t, p in zip(texts, self.held)], float)
        short = np.asarray([shortcuts_taken(self.task, t) for t in texts], float)
        clean = correct[short == 0]
        return {"accuracy": float(correct.mean()), "mean_length": float(np.mean(out.lengths)),
                "shortcuts": float(short.mean()), "any_shortcut": float(np.mean(short > 0)),
                "accuracy_no_shortcut": float(clean.mean()) if clean.size else float("nan")}


@dataclasses.dataclass
class RunResult:
    curve_steps: list[int]
    curve: list[float]  # held-out accuracy at T=1 at curve_steps
    final_sampled: dict  # accuracy, mean length, shortcuts at the last step (T=1)
    cpu_s: float  # process CPU seconds of training only (evaluations excluded)
    wall_s: float
    train_reward: list[float]  # mean rollout reward per step


def eval_key(seed: int, step: int):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(777), seed), step)


def rl_run(rig: Rig, seed: int, steps: int, eval_every: int, ktae: KTAEConfig | None,
           base_eval: dict | None = None) -> RunResult:
    """One RL run from the base; prompts and sampling keys depend on `seed` and the step only."""
    problems = make_problems(rig.task, steps * PROMPTS, seed=seed, split="train")
    params = jax.tree.map(jnp.array, rig.base)  # a copy: the update donates its buffers
    opt_state = rig.tx.init(params)
    cfg = rig.sampling(group=GROUP)
    curve_steps, curve, rewards, cpu, wall = [], [], [], 0.0, 0.0
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            last = base_eval if step == 0 and base_eval else rig.evaluate(params, eval_key(seed, step))
            curve_steps.append(step), curve.append(last["accuracy"])
        if step == steps:
            break
        c0, w0 = time.process_time(), time.perf_counter()
        batch = problems[step * PROMPTS:(step + 1) * PROMPTS]
        ids = rig.encode([p["problem"] for p in batch])
        out, texts = rig.generate(params, ids, jax.random.fold_in(jax.random.key(seed), step), cfg)
        reward = np.asarray([float(grade(t, batch[i // GROUP]["answer"])) for i, t in enumerate(texts)], np.float32)
        adv = token_advantages(out.tokens, out.mask, reward, group_size=GROUP, vocab_size=rig.vocab, ktae=ktae)
        params, opt_state, _ = rl_update(rig.graphdef, rig.tx, params, opt_state, ids, np.ones_like(ids),
                                         out.tokens, out.mask, adv.advantages)
        jax.block_until_ready(params)
        cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
        rewards.append(float(reward.mean()))
    return RunResult(curve_steps, curve, last, cpu, wall, rewards)


def sft_run(rig: Rig, seed: int, cpu_budget_s: float, max_steps: int = 5000,
            evaluate: bool = True) -> tuple[RunResult, int]:
    """Supervised steps from the base on fresh teacher data until `cpu_budget_s` CPU seconds are spent."""
    params = jax.tree.map(jnp.array, rig.base)
    opt_state = rig.tx.init(params)
    chunk, step, cpu, wall = 100, 0, 0.0, 0.0
    while step < max_steps and (step == 0 or cpu < cpu_budget_s):
        if step % chunk == 0:  # data made in chunks, seeded by (seed, chunk); its CPU time counts too
            c0 = time.process_time()
            ex = make_sft_examples(rig.task, chunk * SFT_BATCH, seed=(1000 + seed) * 100_003 + step // chunk)
            ids, mask, loss_mask = encode_examples(rig.tok, ex)
            cpu += time.process_time() - c0
        c0, w0 = time.process_time(), time.perf_counter()
        rows = slice((step % chunk) * SFT_BATCH, (step % chunk + 1) * SFT_BATCH)
        params, opt_state, loss = sft_update(rig.graphdef, rig.tx, params, opt_state, ids[rows], mask[rows],
                                             loss_mask[rows])
        jax.block_until_ready(loss)
        cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
        step += 1
    sampled = rig.evaluate(params, eval_key(seed, 10**6)) if evaluate else {}
    return RunResult([], [], sampled, cpu, wall, []), step


def warm_up(rig: Rig, ktae_configs: list[KTAEConfig | None]) -> dict[str, Any]:
    """Compiles every function once (sampler at both shapes, each advantage variant, both updates),
    so that no run's CPU time includes compilation. Returns the compile CPU seconds."""
    c0 = time.process_time()
    rl_run(rig, seed=10**6, steps=1, eval_every=1, ktae=None, base_eval={"accuracy": 0.0})
    for k in ktae_configs:
        if k is not None:
            token_advantages(np.zeros((PROMPTS * GROUP, rig.task.max_new_tokens), np.int32),
                             np.ones((PROMPTS * GROUP, rig.task.max_new_tokens), np.int32),
                             np.zeros(PROMPTS * GROUP, np.float32), group_size=GROUP, vocab_size=rig.vocab, ktae=k)
    sft_run(rig, seed=10**6, cpu_budget_s=0.0, max_steps=1, evaluate=False)
    return {"compile_cpu_s": time.process_time() - c0}
