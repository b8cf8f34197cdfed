"""Every CLI turns expected failures into one line on stderr and a non-zero exit (no traceback)."""

import json
import os
import pathlib
import shutil

import pytest
from _train_helpers import make_workspace, tiny_overrides

from ktae_jax.cli import evaluate as eval_cli
from ktae_jax.cli import generate as generate_cli
from ktae_jax.cli import pretrain as pretrain_cli
from ktae_jax.cli import train as train_cli


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("cli"))


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(prog)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _damaged_model(root: pathlib.Path, source: pathlib.Path, how: str) -> pathlib.Path:
    folder = root / how
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "random":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    elif how == "no_config":
        (folder / "config.json").unlink()
    return folder


@pytest.mark.parametrize("case", ["truncated", "random", "no_config", "latin1_data", "fake_parquet", "run_dir_file",
                                  "mesh_too_big", "missing_eval_file", "empty_answer"])
def test_train_cli_expected_failures(workspace, tmp_path, capsys, case):
    checkpoint, data = workspace
    extra = {"run.max_steps": 1}
    if case in ("truncated", "random", "no_config"):
        extra["model.path"] = _damaged_model(tmp_path, checkpoint, case)
    elif case == "latin1_data":
        bad = tmp_path / "latin1.jsonl"
        bad.write_bytes(data.read_bytes() + b'{"problem": "caf\xe9", "answer": "1"}\n')
        extra["data.train_files"] = f"[{bad}]"
    elif case == "fake_parquet":
        bad = tmp_path / "fake.parquet"
        bad.write_bytes(data.read_bytes())
        extra["data.train_files"] = f"[{bad}]"
    elif case == "run_dir_file":
        (tmp_path / "taken").write_text("a file where the run directory should be")
        extra["run.run_dir"] = tmp_path / "taken" / "run"
    elif case == "mesh_too_big":
        extra["mesh.data"] = 64
    elif case == "missing_eval_file":
        extra.update({"run.eval_every": 1, "run.eval_file": tmp_path / "nope.jsonl"})
    elif case == "empty_answer":
        bad = tmp_path / "empty.jsonl"
        bad.write_text(data.read_text() + json.dumps({"problem": "1+1?", "answer": ""}) + "\n")
        extra["data.train_files"] = f"[{bad}]"
    overrides = tiny_overrides(checkpoint, data, tmp_path / "run", **extra)
    code = train_cli.main(overrides)
    line = _one_error_line(capsys, "ktae-train")
    assert code in (1, 2), line
    expected = {"truncated": "model.safetensors", "random": "random: cannot load the model", "no_config": "config.json",
                "latin1_data": "latin1.jsonl:65: not UTF-8", "fake_parquet": "fake.parquet: not a readable Parquet",
                "run_dir_file": "taken", "mesh_too_big": "mesh.data", "missing_eval_file": "nope.jsonl",
                "empty_answer": "empty.jsonl:65: field 'answer' is empty"}[case]
    assert expected in line, line
    assert not (tmp_path / "run" / "checkpoints").exists() or case == "mesh_too_big"


def test_train_overrides_on_either_side_of_the_flags(workspace, tmp_path, capsys):
    checkpoint, data = workspace
    overrides = tiny_overrides(checkpoint, data, tmp_path / "ignored")
    argv = [*overrides[:5], "--run-dir", str(tmp_path / "run"), *overrides[5:10], "--dry-run", *overrides[10:],
            "--devices", "1", "mesh.data=1"]
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "run") in out and "ignored" not in out


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "-n/--num-samples=0: must be >= 1"),
    (["--temperature", "0"], "--temperature=0.0: must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0: must be >= 1"),
    (["--top-p", "1.5"], "--top-p=1.5: must be in (0, 1]"),
])
def test_generate_rejects_impossible_settings(capsys, args, message):
    base = {"--checkpoint": "tiny", "--prompt": "1+1=?", "--max-new-tokens": "4"}
    argv = [x for k, v in base.items() if k not in args for x in (k, v)] + args
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_generate_missing_or_damaged_checkpoint_and_tiny(workspace, tmp_path, capsys):
    checkpoint, _ = workspace
    for folder in (tmp_path / "missing", _damaged_model(tmp_path, checkpoint, "truncated")):
        assert generate_cli.main(["--checkpoint", str(folder), "--prompt", "hi", "--max-new-tokens", "2"]) == 1
        assert str(folder) in _one_error_line(capsys, "ktae-generate")
    assert generate_cli.main(["--checkpoint", "tiny", "--prompt", "47+85+69=?", "--chat", "--greedy",
                              "--max-new-tokens", "4", "-n", "2", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 2 and all(r["length"] >= 1 for r in records)


def test_eval_and_pretrain_unwritable_outputs(workspace, tmp_path, capsys):
    checkpoint, data = workspace
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    (tmp_path / "bench").mkdir()
    shutil.copy(data, tmp_path / "bench" / "b.jsonl")
    code = eval_cli.main(["--checkpoint", str(checkpoint), "--data-dir", str(tmp_path / "bench"), "--benchmarks", "b",
                          "--out", str(blocker / "out"), "--limit", "1", "--max-new-tokens", "2", "--no-progress"])
    assert code == 1 and "file" in _one_error_line(capsys, "ktae-eval")
    assert pretrain_cli.main(["--out", str(blocker / "out"), "--steps", "1", "--quiet", "eval_problems=0"]) == 1
    assert "file" in _one_error_line(capsys, "ktae-pretrain")
