"""Per-step metrics: `metrics.jsonl` (one object per step, with `step`), TensorBoard, optional W&B,
and a live progress bar. Only process 0 writes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import jax
from tqdm.auto import tqdm

# Shown in the progress bar, in this order, under these short names.
BAR_FIELDS = {"reward/mean": "reward", "reward/accuracy": "acc", "response/length_mean": "len",
              "loss/kl": "kl", "time/step_s": "s/step"}


class StageTimer:
    """Wall seconds per stage of one step, as metrics `time/<stage>_s`; a stage met again (DAPO's
    sampling rounds) adds up. Device work is asynchronous: a timed block that must include it ends
    with `jax.block_until_ready` (or a host transfer) inside the `with`."""

    def __init__(self, *stages: str):
        self.seconds = {f"time/{stage}_s": 0.0 for stage in stages}  # listed stages report 0 if never met

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{stage}_s"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


class MetricsError(RuntimeError):
    """metrics.jsonl cannot be resumed; the message names the file and line."""


class MetricsLogger:
    def __init__(self, run_dir: pathlib.Path, *, total_steps: int, start_step: int, tensorboard: bool,
                 wandb: bool, progress: bool, config: dict[str, Any]):
        self.enabled = jax.process_index() == 0
        self.path = run_dir / "metrics.jsonl"
        self._tb = self._wandb = self._bar = None
        if not self.enabled:
            return
        self._truncate_after(start_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                print("run.wandb is true but wandb is not installed: logging to JSONL and TensorBoard only")
            else:
                self._wandb = wandb_lib.init(project="ktae-jax", dir=str(run_dir), config=config, resume="allow")
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop their old lines. A last line cut
        short by a crash is dropped with a warning; the file is replaced atomically (written aside,
        then renamed), so a crash here loses nothing."""
        if not self.path.exists():
            return
        text = self.path.read_text()
        lines = text.splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines) and not text.endswith("\n"):
                    print(f"warning: {self.path}:{number}: dropping a partial last line (the previous run stopped "
                          f"while writing it)")
                    continue
                raise MetricsError(f"{self.path}:{number}: not valid JSON; fix or remove that line to resume") from None
            if not isinstance(record, dict):
                raise MetricsError(f"{self.path}:{number}: expected an object, got {type(record).__name__}")
            if record.get("step", 0) <= step:
                kept.append(line)
        new_text = "".join(line + "\n" for line in kept)
        if new_text == text:
            return
        aside = self.path.with_name(self.path.name + ".tmp")
        with aside.open("w") as handle:
            handle.write(new_text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(aside, self.path)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if self._bar is not None:
            self._bar.set_postfix({short: f"{numeric[k]:.3g}" for k, short in BAR_FIELDS.items() if k in numeric})
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
