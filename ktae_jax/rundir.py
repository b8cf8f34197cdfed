"""The run directory's guards: one trainer at a time, config changes on resume checked and recorded.

1. LOCK     `RunDirLock`: an exclusive `flock` on `run_dir/.lock` (process 0) or `.lock.<i>`
            (process i of a multi-host run: one lock file per process, so the processes of one
            run never contend, while a second run's process i meets the first run's). The kernel
            drops the lock when its process dies, so a killed trainer never leaves it stuck; the
            file holds the holder's pid and host for the refusal message.
2. CHANGES  `config_changes(saved, current)`: the keys whose values differ between the config
            saved with the checkpoint and the one given now. `RESUME_SAFE` keys (work split,
            logging, run length) may change freely; any other change alters what the resumed
            run computes and is refused unless the user allows it (`--allow-config-change`).
3. HISTORY  `record_config`: `config.yaml` is the config in force (loadable with `--config`);
            `config_history.yaml` is append-only: the first config in full, then every start
            whose config differs, with the step it resumed from and each change as [old, new].
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import socket
from typing import Any

import yaml


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message names it and says why."""


# Keys whose change does not alter what a resumed run computes (who does the work, where it is logged,
# how long the run goes on). `mesh.*` too: the state is restored into the new layout.
RESUME_SAFE = frozenset({
    "run.run_dir", "run.max_steps", "run.checkpoint_every", "run.keep_checkpoints", "run.export_hf", "run.tensorboard",
    "run.wandb", "run.progress", "run.ktae_top_tokens", "run.eval_every", "run.eval_file", "run.eval_limit",
    "algo.micro_batch_per_device", "algo.logprob_micro_batch_per_device", "rollout.sample_prompts_per_device",
    "reward.num_workers", "data.trim_prompt_padding",
})


def _is_resume_safe(key: str) -> bool:
    return key in RESUME_SAFE or key.startswith("mesh.")


# ---------------------------------------------------------------------------------------------- 1. LOCK


class RunDirLock:
    """Held from construction until `release` (or the process's death)."""

    def __init__(self, run_dir: str | pathlib.Path, process_index: int = 0):
        self.run_dir = pathlib.Path(run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"run directory {self.run_dir}: cannot create it ({err.strerror})") from None
        self.path = self.run_dir / (".lock" if process_index == 0 else f".lock.{process_index}")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        except OSError as err:
            raise RunDirError(f"run directory {self.run_dir}: cannot open its lock file {self.path.name} "
                              f"({err.strerror})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # EWOULDBLOCK: another process holds it
            holder = self._holder()
            os.close(self._fd)
            raise RunDirError(f"run directory {self.run_dir} is in use by another trainer ({holder}); "
                              f"wait for it to finish or stop it, or use another --run-dir") from None
        except OSError as err:  # a file system without locks (some FUSE mounts): say so, go on
            print(f"warning: run directory {self.run_dir}: cannot lock {self.path.name} ({err.strerror}); "
                  f"a second trainer started on it would not be refused")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "process_index": process_index,
                "since": _now()}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown: it has just started"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- 2. CHANGES


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, body in config.items() if isinstance(body, dict)
            for key, value in body.items()}


def config_changes(saved: dict[str, Any], current: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, current value)} for every key that differs. A key the saved config lacks
    (added to the code since) counts as its default then."""
    old, new, base = _flat(saved), _flat(current), _flat(defaults or {})
    changes = {}
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, base.get(key)), new.get(key)
        if _plain(before) != _plain(after):
            changes[key] = (before, after)
    return changes


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_resume(changes: dict[str, tuple[Any, Any]], *, step: int, checkpoint: pathlib.Path,
                 allow: bool) -> list[str]:
    """Raises RunDirError for changes that alter the resume's meaning unless `allow`; returns one
    line per accepted change (to print and record)."""
    guarded = {k: v for k, v in changes.items() if not _is_resume_safe(k)}
    if guarded and not allow:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in guarded.items())
        raise RunDirError(f"resuming from {checkpoint} with a changed config ({listed}): these change what the "
                          f"resumed run computes; pass --allow-config-change to accept them, or restore the "
                          f"checkpoint's settings (its config is in {checkpoint.parent.parent / 'config.yaml'})")
    return [f"config change on resume from step {step}: {k}: {old!r} -> {new!r}"
            + ("" if _is_resume_safe(k) else " (allowed by --allow-config-change)")
            for k, (old, new) in changes.items()]


# ---------------------------------------------------------------------------------------------- 3. HISTORY


def record_config(run_dir: pathlib.Path, config: dict[str, Any], *, start_step: int) -> None:
    """Writes `config.yaml` (the config in force) and appends to `config_history.yaml` when it
    differs from the last one recorded (or nothing is recorded yet)."""
    current_file, history = run_dir / "config.yaml", run_dir / "config_history.yaml"
    previous = None
    if current_file.exists():
        try:
            previous = yaml.safe_load(current_file.read_text())
        except yaml.YAMLError:
            previous = None  # a damaged copy: the history below still holds every earlier version
    entry: dict[str, Any] = {"started": _now(), "host": socket.gethostname(), "pid": os.getpid(),
                             "resumed_from_step": start_step}
    if not isinstance(previous, dict) or not history.exists():
        entry["config"] = config
    else:
        changes = config_changes(previous, config)
        if not changes:
            return
        entry["changes"] = {k: [_plain(old), _plain(new)] for k, (old, new) in changes.items()}
    with history.open("a") as handle:  # a YAML list, one item per start that changed the config
        handle.write(yaml.safe_dump([entry], sort_keys=False))
    _write_atomic(current_file, yaml.safe_dump(config, sort_keys=False))


def _write_atomic(path: pathlib.Path, text: str) -> None:
    aside = path.with_name(path.name + ".tmp")
    with aside.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(aside, path)
