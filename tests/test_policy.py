"""The one loader of every entry point (`policy.load_policy`), the one pad-id choice, and the
built-in names ("tiny") resolved in `builtin` only."""

import ast
import json
import pathlib
import shutil
import types

import pytest

from ktae_jax import builtin
from ktae_jax.models import CheckpointError
from ktae_jax.policy import load_policy, pad_token_id

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ktae_jax"
TINY_BASE = PACKAGE / "tiny" / "base"


def _tok(pad=None, eos=None):
    return types.SimpleNamespace(pad_token_id=pad, eos_token_id=eos)


def test_pad_id_prefers_the_pad_token_then_eos_then_the_first_stop_id():
    assert pad_token_id(_tok(pad=7, eos=3), (5,)) == 7
    assert pad_token_id(_tok(pad=0, eos=3), (5,)) == 0  # id 0 is a real pad id, not "none"
    assert pad_token_id(_tok(eos=3), (5, 6)) == 3
    assert pad_token_id(_tok(), (5, 6)) == 5
    with pytest.raises(CheckpointError, match="neither a pad nor an EOS"):
        pad_token_id(_tok(), ())


def test_tiny_is_the_shipped_base_with_its_own_stop_and_pad_ids():
    policy = load_policy("tiny")
    assert policy.folder == TINY_BASE
    vocab = json.loads((TINY_BASE / "tokenizer.json").read_text())["model"]["vocab"]
    config = json.loads((TINY_BASE / "config.json").read_text())
    assert policy.pad_id == vocab["<|pad|>"]  # tokenizer_config.json's pad_token
    assert vocab["<|end|>"] in policy.stop_ids and config["eos_token_id"] in policy.stop_ids
    assert policy.model.config.vocab_size == config["vocab_size"]
    assert builtin.model_folder("tiny", build=False) == TINY_BASE
    assert builtin.model_folder("/some/folder") == pathlib.Path("/some/folder")


def test_random_init_keeps_the_tokenizer_and_a_folder_without_one_is_an_error(tmp_path):
    policy = load_policy("tiny", init="random", seed=1)
    loaded = load_policy("tiny")
    assert policy.stop_ids == loaded.stop_ids and policy.pad_id == loaded.pad_id
    assert float(abs(policy.model.embed[...] - loaded.model.embed[...]).max()) > 0  # other weights
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TINY_BASE / name, bare / name)
    with pytest.raises(CheckpointError, match=f"{bare}: no tokenizer files"):
        load_policy(bare)


def test_generate_cli_takes_tiny(capsys):
    from ktae_jax.cli import generate

    argv = ["--checkpoint", "tiny", "--prompt", "12+34+56=?", "--chat", "--greedy", "--max-new-tokens", "4", "--json"]
    assert generate.main(argv) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["length"] >= 1 and len(record["token_ids"]) == record["length"]


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_registry_and_the_demo_import_the_tiny_task():
    """Core modules resolve "tiny" through `builtin`, never by importing the tiny task package."""
    allowed = {"builtin.py", "demo.py", "cli/pretrain.py"}  # the registry, and the tiny task's own entry points
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.relative_to(PACKAGE).parts[0] != "tiny" and str(p.relative_to(PACKAGE)) not in allowed
                 and any(name == "ktae_jax.tiny" or name.startswith("ktae_jax.tiny.") for name in _imports(p))]
    assert offenders == []
