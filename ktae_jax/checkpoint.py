"""Checkpoints with orbax: train state, data position and resolved config, async, last K kept.

Layout: `run_dir/checkpoints/<step>/{state, data, config}`.

- SAVE     starts in the background; a failed write is raised (`CheckpointWriteError`) by the next
           `check` (called once per step), `save`, `wait` or `close`, never left behind: the loop stops
           and the CLI exits non-zero without waiting on orbax's threads. A step's checkpoint only
           counts once orbax has committed it, so the previous one stays usable. While a save is in
           flight orbax's own error logs (tracebacks from its threads) are held back: a failed save
           is reported by that one error alone; logs of a save that then succeeds are passed on.
- RESTORE  `restore_latest` tries the newest checkpoint first. One that is damaged (metadata or
           array files unreadable) is reported, moved aside to `run_dir/checkpoints_damaged/` (kept,
           and out of the way of the step's next save) and the previous one is used. A checkpoint
           whose arrays do not fit the model is an error naming the checkpoint and the mismatch.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

# One class for "this checkpoint cannot be used", whether a Hugging Face folder or a training checkpoint.
from ktae_jax.models.hf_io import CheckpointError

__all__ = ["CheckpointError", "CheckpointWriteError", "Checkpointer"]


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, directory unwritable...); earlier checkpoints are intact."""


class _HeldOrbaxErrors(logging.Filter):
    """On the `absl` logger (orbax logs through it): while `holding`, orbax's ERROR records are kept
    back instead of printed; `drop` forgets them (the save failed: our one-line error says it), `release`
    passes them on (the save succeeded: they were about something else)."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        self.held: list[logging.LogRecord] = []  # appended from orbax's threads (list.append is atomic)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.holding or record.levelno < logging.ERROR or str(_ORBAX_DIR) not in record.pathname:
            return True
        self.held.append(record)
        return False

    def drop(self) -> None:
        self.held = []

    def release(self) -> None:
        self.holding, held, self.held = False, self.held, []
        for record in held:
            logging.getLogger(record.name).handle(record)


_ORBAX_DIR = pathlib.Path(ocp.__file__).parent  # records logged from its files


class _Damaged(Exception):
    """A checkpoint that cannot be read (internal: `restore_latest` falls back past it)."""


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, keep: int, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except OSError as err:
            raise CheckpointWriteError(f"checkpoint directory {self.directory}: {err.strerror or err}") from None
        self._failed: CheckpointWriteError | None = None
        self._saving: int | None = None
        self._orbax_errors = _HeldOrbaxErrors()
        logging.getLogger("absl").addFilter(self._orbax_errors)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Starts an async save (it finishes in the background; `wait` blocks on it)."""
        self.check()
        previous, self._saving = self._saving, step
        self._orbax_errors.holding = True
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config)), force=True)
        except Exception as err:  # noqa: BLE001 - any failure to write is reported the same way
            # orbax first finishes the save in flight: its failure surfaces here too
            self._fail(previous if previous is not None and previous not in self.all_steps() else step, err)

    def check(self) -> None:
        """Raises CheckpointWriteError if a background save has failed (cheap: call it every step)."""
        if self._failed is not None:
            raise self._failed
        try:
            self._manager.check_for_errors()
        except Exception as err:  # noqa: BLE001
            self._fail(self._saving, err)

    def _fail(self, step: int | None, err: BaseException) -> None:
        good = [s for s in self.all_steps() if s != step]
        last = f"the last good checkpoint is {self.directory / str(good[-1])}" if good else "no earlier checkpoint"
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        self._orbax_errors.drop()  # orbax's tracebacks of this failure: the line below replaces them
        self._failed = CheckpointWriteError(f"writing checkpoint {self.directory / str(step)} failed: "
                                            f"{message[:400]} ({last})")
        raise self._failed

    def wait(self) -> None:
        self.check()
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            self._fail(self._saving, err)
        self.check()
        self._orbax_errors.release()  # every save finished well: what orbax logged meanwhile was not this

    def close(self) -> None:
        """Waits for the save in flight and closes; after a failed save it closes nothing (orbax's
        threads may be stuck on the failure, and the process is about to exit anyway)."""
        if self._failed is not None:
            return  # (orbax's held logs of the failure stay held: its threads may still log it)
        self.wait()
        self._manager.close()
        logging.getLogger("absl").removeFilter(self._orbax_errors)

    # ------------------------------------------------------------------ restore
    def restore_latest(self, abstract_state: Any, *, warn=print) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data position, config dict) of the newest readable checkpoint, or None if
        there is none. Damaged ones are reported with `warn`, moved aside, and skipped."""
        steps = self.all_steps()
        for i, step in enumerate(reversed(steps)):
            try:
                return (step, *self.restore(step, abstract_state))
            except _Damaged as err:
                aside = self._move_aside(step)
                earlier = steps[len(steps) - 2 - i] if i + 1 < len(steps) else None
                then = f"using the previous one, step {earlier}" if earlier is not None else "no earlier checkpoint: starting from step 0"
                warn(f"warning: checkpoint {self.directory / str(step)} is unreadable ({err}); moved to {aside}; {then}")
        return None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data position, config dict) of checkpoint `step`, laid out like `abstract_state`."""
        where = self.directory / str(step)
        try:
            metadata = self._manager.item_metadata(step)["state"]
            stored = [leaf.shape for leaf in jax.tree.leaves(metadata.tree if hasattr(metadata, "tree") else metadata)]
        except Exception as err:  # noqa: BLE001 - unreadable metadata, whatever orbax raised
            raise _Damaged(f"its metadata cannot be read: {_first_line(err)}") from None
        _check_shapes(stored, abstract_state, where)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 - the shapes fit: what fails now is the files
            raise _Damaged(f"its files cannot be read: {_first_line(err)}") from None
        if not isinstance(restored["data"], dict) or not isinstance(restored["config"], dict):
            raise _Damaged("its data position or config is not a JSON object")
        return restored["state"], restored["data"], restored["config"]

    def _move_aside(self, step: int) -> pathlib.Path:
        target = self.directory.parent / "checkpoints_damaged" / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:  # one shared directory: process 0 moves it
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.move(str(self.directory / str(step)), str(target))
            except FileNotFoundError:
                pass
        self._manager.reload()  # forget the step it moved
        return target


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def _check_shapes(stored: list[tuple[int, ...]], target: Any, where: pathlib.Path) -> None:
    """The checkpoint's array shapes against the model's (as multisets: orbax stores the leaves by
    name, not in the order the model flattens them)."""
    want = [tuple(x.shape) for x in jax.tree.leaves(target)]
    stored = [tuple(s) for s in stored]
    if len(stored) != len(want):
        raise CheckpointError(f"checkpoint {where} does not fit this model/optimizer: it has {len(stored)} arrays, "
                              f"the model and optimizer state have {len(want)}")
    if sorted(stored) != sorted(want):
        missing = sorted(set(want) - set(stored)) or sorted(want)
        raise CheckpointError(f"checkpoint {where} does not fit this model/optimizer: its array shapes differ "
                              f"(the model needs e.g. {missing[0]}, which it lacks)")
