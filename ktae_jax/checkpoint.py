"""Checkpoints with orbax: train state, data position and resolved config, async, last K kept.

Layout: `run_dir/checkpoints/<step>/{state, data, config}`. `restore` places the state straight
into the shardings of an abstract target; a checkpoint whose shapes do not fit the model is an
error naming the checkpoint and the mismatch.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, keep: int, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Starts an async save (it finishes in the background; `wait` blocks on it)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)),
            force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data position, config dict) of checkpoint `step`, laid out like `abstract_state`."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} does not fit this model/optimizer: {err}") from None
        _check_shapes(restored["state"], abstract_state, self.directory / str(step))
        return restored["state"], restored["data"], restored["config"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _check_shapes(restored: Any, target: Any, where: pathlib.Path) -> None:
    got = jax.tree_util.tree_flatten_with_path(restored)[0]
    want = jax.tree_util.tree_flatten_with_path(target)[0]
    if len(got) != len(want):
        raise CheckpointError(f"checkpoint {where} has {len(got)} arrays, the model expects {len(want)}")
    for (path, a), (_, b) in zip(got, want):
        if tuple(a.shape) != tuple(b.shape):
            raise CheckpointError(f"checkpoint {where}: {jax.tree_util.keystr(path)} has shape {tuple(a.shape)}, "
                                  f"the model expects {tuple(b.shape)}")
