"""Supervised pre-training of the tiny base model on teacher solutions of the tiny task.

    run(PretrainConfig(...)) -> folder with config.json, model.safetensors, the tokenizer

The steps:
  1. DATA: `steps * batch_size` fresh teacher examples (seeded), chat-formatted, tokenised once,
     right-padded to one length T; the loss covers the response tokens and the EOS only.
  2. MODEL: a Qwen2 decoder from `ModelConfig`, split once into (graphdef, params).
  3. TRAIN: one jitted pure `train_step(params, opt_state, batch) -> (params, opt_state, loss)`
     with optax AdamW (linear warm-up, cosine decay), buffers donated.
  4. SAVE: `ktae_jax.models.save_pretrained`; the same seed gives the same bytes on one machine.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
import typing
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from ktae_jax.models import ModelConfig, Transformer, init_random, save_pretrained
from ktae_jax.tiny.task import TaskConfig, make_sft_examples
from ktae_jax.tiny.tokenizer import build_tokenizer, prompt_text

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything that decides the base model's bytes (with the machine's XLA build)."""

    task: TaskConfig = TaskConfig()  # the task and its teacher (style mix, error rates)
    seed: int = 0  # model initialisation and data
    steps: int = 1500  # optimizer steps
    batch_size: int = 64  # sequences per step
    learning_rate: float = 3e-3  # AdamW peak learning rate
    warmup_steps: int = 100  # linear warm-up from 0 to the peak
    final_lr_fraction: float = 0.1  # the cosine decay ends at this fraction of the peak
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global gradient-norm clip
    hidden_size: int = 128  # E
    num_layers: int = 4
    num_heads: int = 4  # H (head_dim = E / H)
    num_kv_heads: int = 2  # KV
    intermediate_size: int = 256  # F
    eval_problems: int = 1000  # held-out problems measured after training (0 = skip)
    init_from: str = ""  # continue from this checkpoint folder instead of random weights ("" = from scratch)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate}: must be > 0")
        if self.warmup_steps < 0 or self.eval_problems < 0:
            raise ValueError("warmup_steps and eval_problems must be >= 0")

    def model_config(self, tokenizer: Any) -> ModelConfig:
        return ModelConfig(
            family="qwen2", vocab_size=len(tokenizer), hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.hidden_size // self.num_heads, qkv_bias=True,
            tie_word_embeddings=True, max_position_embeddings=512,
            eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
        )


# ---------------------------------------------------------------------- overrides
def _convert(text: str, kind: Any, key: str) -> Any:
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"override {key}={text!r}: expected true or false")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError as exc:
        raise ValueError(f"override {key}={text!r}: expected a {kind.__name__}") from exc


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """`["steps=100", "task.digits=3"]` applied to a (nested) frozen dataclass; unknown keys raise."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value")
        config = _replace_path(config, key.strip().split("."), text.strip(), key.strip())
    return config


def _replace_path(config: Any, path: list[str], text: str, key: str) -> Any:
    hints = typing.get_type_hints(type(config))
    if path[0] not in hints:
        raise ValueError(f"override {key!r}: {type(config).__name__} has no field {path[0]!r}")
    if len(path) == 1:
        value = _convert(text, hints[path[0]], key)
    else:
        value = _replace_path(getattr(config, path[0]), path[1:], text, key)
    return dataclasses.replace(config, **{path[0]: value})


# ---------------------------------------------------------------------- 1. DATA
def encode_examples(tokenizer: Any, examples: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids_BxT, mask_BxT, loss_mask_BxT) int32 for B examples, right-padded; loss on response tokens + EOS."""
    prompts = tokenizer([prompt_text(tokenizer, e["problem"]) for e in examples], add_special_tokens=False)
    targets = tokenizer([e["solution"] + tokenizer.eos_token for e in examples], add_special_tokens=False)
    rows = [(p, t) for p, t in zip(prompts["input_ids"], targets["input_ids"])]
    width = max(len(p) + len(t) for p, t in rows)
    n = len(rows)
    ids = np.full((n, width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((n, width), np.int32)
    loss_mask = np.zeros((n, width), np.int32)
    for i, (p, t) in enumerate(rows):
        ids[i, : len(p) + len(t)] = p + t
        mask[i, : len(p) + len(t)] = 1
        loss_mask[i, len(p) : len(p) + len(t)] = 1
    return ids, mask, loss_mask


# ---------------------------------------------------------------------- 3. TRAIN
@functools.lru_cache(maxsize=8)
def make_optimizer(config: PretrainConfig) -> optax.GradientTransformation:
    """AdamW with warm-up and cosine decay; cached per config so a rerun reuses the compiled step."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, max(config.warmup_steps, 1), max(config.steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.final_lr_fraction,
    )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=config.weight_decay),
    )


def sft_loss(graphdef: nnx.GraphDef, params: nnx.State, ids_BxT: Array, mask_BxT: Array, loss_BxT: Array) -> Array:
    """Mean next-token cross-entropy over the positions whose target is a response token."""
    model: Transformer = nnx.merge(graphdef, params)
    logits_BxTxV = model(ids_BxT, mask_BxT)
    logp = jax.nn.log_softmax(logits_BxTxV[:, :-1], axis=-1)
    picked_BxT = jnp.take_along_axis(logp, ids_BxT[:, 1:, None], axis=-1)[..., 0]
    weight = loss_BxT[:, 1:].astype(jnp.float32)
    return -jnp.sum(picked_BxT * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, params: nnx.State, opt_state: Any,
    ids_BxT: Array, mask_BxT: Array, loss_BxT: Array,
) -> tuple[nnx.State, Any, Array]:
    loss, grads = jax.value_and_grad(sft_loss, argnums=1)(graphdef, params, ids_BxT, mask_BxT, loss_BxT)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


# Jitted once per (graphdef, optimizer): both are static, so equal configs share one compilation.
train_step_jit = jax.jit(train_step, static_argnums=(0, 1), donate_argnums=(2, 3))


def train(config: PretrainConfig, tokenizer: Any, *, progress: bool = True,
          examples: Sequence[dict] | None = None) -> tuple[Transformer, dict]:
    """The trained model and {"train_s", "final_loss", "losses" (every 10th step)}.

    `examples` ({"problem", "solution"}, at least steps * batch_size) replaces the tiny task's
    teacher data (the task variants of `variants.py` train their bases this way)."""
    # 1. DATA
    if examples is None:
        examples = make_sft_examples(config.steps * config.batch_size, seed=config.seed, config=config.task)
    elif len(examples) < config.steps * config.batch_size:
        raise ValueError(f"{len(examples)} examples: need steps * batch_size = {config.steps * config.batch_size}")
    ids, mask, loss_mask = encode_examples(tokenizer, examples)
    # 2. MODEL
    if config.init_from:
        from ktae_jax.models import load_pretrained

        model, _ = load_pretrained(config.init_from)
    else:
        model = init_random(config.model_config(tokenizer), seed=config.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(config)
    opt_state = tx.init(params)
    step_fn = functools.partial(train_step_jit, graphdef, tx)
    # 3. TRAIN
    losses, start, b = [], time.perf_counter(), config.batch_size
    bar = tqdm(range(config.steps), desc="ktae-pretrain", disable=not progress, mininterval=1.0)
    for step in bar:
        rows = slice(step * b, (step + 1) * b)
        params, opt_state, loss = step_fn(params, opt_state, ids[rows], mask[rows], loss_mask[rows])
        if step % 10 == 0 or step == config.steps - 1:
            losses.append(float(loss))  # a host sync every 10 steps only
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if not np.isfinite(losses[-1]):
        raise FloatingPointError(f"pre-training diverged: final loss {losses[-1]} (lower learning_rate)")
    model = nnx.merge(graphdef, params)
    return model, {"train_s": time.perf_counter() - start, "final_loss": losses[-1], "losses": losses}


def run(config: PretrainConfig, out: str | pathlib.Path, *, progress: bool = True) -> tuple[pathlib.Path, dict]:
    """Trains, saves (4. SAVE) to `out`, then measures `eval_problems` held-out problems."""
    tokenizer = build_tokenizer()
    model, report = train(config, tokenizer, progress=progress)
    report = {"config": dataclasses.asdict(config), "num_params": model.config.num_params, **report}
    folder = save_pretrained(model, tokenizer, out)
    if config.eval_problems:
        from ktae_jax.tiny.measure import measure_styles

        report["eval"] = measure_styles(model, tokenizer, config.task, n=config.eval_problems, seed=config.seed + 1)
    return folder, report
