"""The embedded tiny task and its base model: RL that runs on a laptop CPU in minutes.

    task       problems ("47+85+69=?"), teacher solutions in a reliable and a shortcut style
    tokenizer  a character-level, chat-templated tokenizer that `AutoTokenizer` loads
    pretrain   supervised pre-training of a tiny Qwen2 model (`ktae-pretrain`)
    measure    accuracy overall / per style and the style mix, graded by the real grader
    base/      the shipped base checkpoint (see base/BUILD.md for the command that rebuilds it)
"""

from __future__ import annotations

import pathlib

from ktae_jax.tiny.task import TaskConfig, make_problems, make_sft_examples, response_style

_BASE = pathlib.Path(__file__).resolve().parent / "base"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def base_checkpoint_path() -> pathlib.Path:
    """The shipped base checkpoint folder (a Hugging Face folder: config, safetensors, tokenizer)."""
    return _BASE


def is_complete(folder: pathlib.Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED)


def ensure_base(path: str | pathlib.Path | None = None, *, progress: bool = True) -> pathlib.Path:
    """`path` (default: the shipped folder), built with the default `PretrainConfig` if incomplete."""
    folder = _BASE if path is None else pathlib.Path(path)
    if not is_complete(folder):
        from ktae_jax.tiny.pretrain import PretrainConfig, run

        run(PretrainConfig(eval_problems=0), folder, progress=progress)
    return folder


def base_folder(build: bool = True) -> pathlib.Path:
    """The built-in model "tiny" (`ktae_jax.builtin`): the shipped base, made first if `build` and incomplete."""
    return ensure_base() if build else _BASE


def training_rows(cfg) -> list[dict]:
    """The built-in data set "tiny" (`ktae_jax.builtin`): `cfg.tiny_train_size` problems (a `DataSection`)."""
    problems = make_problems(cfg.tiny_train_size, seed=cfg.shuffle_seed)
    return [{"problem": p["problem"], "answer": p["answer"], "source": f"tiny:{i}"} for i, p in enumerate(problems)]


__all__ = [
    "TaskConfig", "base_checkpoint_path", "base_folder", "ensure_base", "is_complete", "make_problems",
    "make_sft_examples", "response_style", "training_rows",
]
