"""Shared set-up of the trainer tests: a tiny random checkpoint, a prompt file, a small config."""

from __future__ import annotations

import json
import math
import pathlib

from _model_helpers import make_hf_checkpoint

from ktae_jax.config import load_config


def digit_reward(responses, references, correct):
    """A reward a random model earns about half the time: 1 if the response contains a digit."""
    return [float(any(ch.isdigit() for ch in text)) for text in responses]


def nan_reward(responses, references, correct):
    return [math.nan for _ in responses]


def make_workspace(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(checkpoint folder, train.jsonl) under `root`."""
    checkpoint = make_hf_checkpoint(root, "qwen2", seed=3)
    rows = [{"problem": f"what is {a} plus {b} ?", "answer": str(a + b)} for a in range(8) for b in range(8)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return checkpoint, data


def tiny_overrides(checkpoint: pathlib.Path, data: pathlib.Path, run_dir: pathlib.Path, **extra) -> list[str]:
    values = {
        "model.path": str(checkpoint), "data.train_files": f"[{data}]", "data.max_prompt_len": 32,
        "rollout.prompts_per_step": 8, "rollout.group_size": 4, "rollout.max_new_tokens": 6,
        # 8 decode slots for the step's 32 rows: the trainer's sampler refills slots (continuous
        # batching), and at one width compiles in half the time of a 32-slot one (32, 16, 8).
        "rollout.sample_prompts_per_device": 2,
        "reward.custom_fn": "_train_helpers:digit_reward", "reward.num_workers": 1,
        "optim.lr": 1e-3, "optim.weight_decay": 0.0, "run.run_dir": str(run_dir), "run.max_steps": 4,
        "run.checkpoint_every": 1, "run.progress": False, "run.tensorboard": False, "run.export_hf": False,
        "ktae.enabled": True, "algo.kl_coef": 0.01, "algo.mini_batch_prompts": 4, "algo.micro_batch_per_device": 0,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(checkpoint, data, run_dir, **extra):
    return load_config([], tiny_overrides(checkpoint, data, run_dir, **extra))


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def without_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(("time/", "throughput/", "reward/grade_s"))}


def use_gradient_linear_optimizer(monkeypatch) -> None:
    """The trainer with Adam at eps = 1 (no weight decay, no clipping) instead of its AdamW, for tests
    that compare two computations of a step.

    AdamW's first update is lr g / (|g| + eps) with eps = 1e-8: a gradient element near eps turns
    last-bit differences (another reduction order, another device split) into a visible fraction of
    lr (a fresh clone once saw 1.87e-6 at lr 1e-2 on one of 1,024 elements). With eps = 1 the update
    lr m / (sqrt(v) + 1) is ~ lr x gradient for the gradients here (|g| << 1) and never moves by more
    than lr x a gradient difference, so the comparison is one of gradients; the optimizer state
    keeps AdamW's layout (mu, nu, count), which the sharding checks look at.
    """
    import optax

    from ktae_jax import train

    def optimizer(cfg):
        return optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=1.0), optax.scale(-cfg.lr))

    monkeypatch.setattr(train, "make_optimizer", optimizer)


def assert_same_updates(before: list, a: list, b: list, *, rtol: float = 1e-4) -> None:
    """Parameters after the same steps of an optimizer linear in the gradient (plain SGD, or
    `use_gradient_linear_optimizer`'s), computed two ways (`before` -> `a`, `before` -> `b`).

    The updates must agree to `rtol` of the largest update (gradients summed in another order
    differ by ~1e-6 of that), plus the float32 rounding of the stored parameters themselves; and
    the step must have moved something, so that the comparison is not of two no-ops.
    """
    import numpy as np

    scale = max(float(np.abs(np.asarray(x, np.float64) - p).max()) for p, x in zip(before, a))
    assert scale > 0, "the step changed no parameter"
    for i, (p, x, y) in enumerate(zip(before, a, b)):
        x, y = np.asarray(x), np.asarray(y)
        rounding = 2 * np.spacing(np.maximum(np.abs(x), np.abs(y)))
        excess = np.abs(x.astype(np.float64) - y) - (rtol * scale + rounding)
        assert np.all(excess <= 0), (f"leaf {i}: {int(np.sum(excess > 0))} of {x.size} elements differ by more than "
                                     f"{rtol} x the largest update ({scale:.3g}); worst excess {excess.max():.3g}")
