"""Built-in names, resolved here and nowhere else: "tiny" stands for the shipped tiny base model
(`model.path`, `--checkpoint`) and for the generated tiny task (`data.train_files`).

A name maps to "module:function" and is imported only when used, so the core modules (`data`,
`plan`, `train`, the CLIs) never import the tiny task package. A new built-in is one line here.
"""

from __future__ import annotations

import importlib
import pathlib
from typing import Any

# name -> function(build: bool) -> folder (build=False: the folder's path only, nothing is made)
MODELS = {"tiny": "ktae_jax.tiny:base_folder"}
# name -> function(cfg: DataSection) -> rows {"problem", "answer", "source"}
DATASETS = {"tiny": "ktae_jax.tiny:training_rows"}


def _load(target: str) -> Any:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def model_folder(path: str | pathlib.Path, *, build: bool = True) -> pathlib.Path:
    """The folder `path` names: a built-in name's folder (made first when `build` and missing), else `path`."""
    if str(path) in MODELS:
        return pathlib.Path(_load(MODELS[str(path)])(build))
    return pathlib.Path(path)


def dataset_rows(name: str, cfg: Any) -> list[dict[str, Any]] | None:
    """The rows of a built-in data set, or None when `name` is not one (then it is a file)."""
    return _load(DATASETS[name])(cfg) if name in DATASETS else None
