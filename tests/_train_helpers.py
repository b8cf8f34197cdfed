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


def assert_same_parameters(a: list, b: list, lr: float) -> None:
    """Parameters after the same Adam steps, computed two ways (other devices, other work split).

    Adam's first update is lr * g / (|g| + eps): a parameter whose gradient is near eps moves by a
    rounding-sensitive fraction of lr, so a rare element may differ by a few % of lr; all others
    agree to float rounding.
    """
    import numpy as np

    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=0.2 * lr)
        assert np.mean(~np.isclose(x, y, rtol=1e-4, atol=1e-6)) < 1e-3
