"""The run directory's guards: the lock (two real processes), resume with a changed config, config
history, damaged checkpoints, a partial metrics line, a failed checkpoint write, SIGTERM's exit code."""

import json
import os
import pathlib
import resource
import signal
import subprocess
import sys
import time

import jax
import pytest
import yaml
from _train_helpers import make_workspace, read_metrics, tiny_config, tiny_overrides
from _xla import xla_flags

from ktae_jax.metrics import MetricsError, MetricsLogger
from ktae_jax.rundir import RunDirError, RunDirLock, check_resume, config_changes
from ktae_jax.train import Trainer, run

TESTS = pathlib.Path(__file__).resolve().parent
ONE = jax.devices()[:1]  # one device is enough here, and quicker than the 8 simulated ones
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
       "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("rundir"))


def _train_command(checkpoint, data, run_dir, **extra):
    return [sys.executable, "-m", "ktae_jax.cli.train", *tiny_overrides(checkpoint, data, run_dir, **extra)]


# ---------------------------------------------------------------------------------------------- the lock

_HOLDER = """
import sys, time
from ktae_jax.rundir import RunDirLock
lock = RunDirLock(sys.argv[1], int(sys.argv[2]))
print("locked", flush=True)
time.sleep(120)
"""


def _hold(run_dir, process_index=0):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir), str(process_index)], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_exclusive_per_process_index_and_dies_with_its_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        with pytest.raises(RunDirError, match=rf"{run_dir} is in use by another trainer \(pid {holder.pid} on "):
            RunDirLock(run_dir)
        RunDirLock(run_dir, process_index=1).release()  # process 1 of the same multi-host run: its own file
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    RunDirLock(run_dir).release()  # the kernel dropped the dead holder's lock


def test_second_trainer_on_a_busy_run_dir_is_refused_and_the_first_finishes_intact(workspace, tmp_path):
    checkpoint, data = workspace
    run_dir = tmp_path / "run"
    command = _train_command(checkpoint, data, run_dir, **{"run.max_steps": 6, "run.checkpoint_every": 2})
    first = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and str(first.pid) not in _read(run_dir / ".lock"):
        assert first.poll() is None, first.communicate()[0]
        time.sleep(0.2)
    second = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output
    assert second.returncode == 1
    message = [line for line in second.stderr.splitlines() if line.startswith("ktae-train")]
    assert len(message) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"{run_dir} is in use by another trainer (pid {first.pid} on " in message[0]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


def _read(path):
    try:
        return path.read_text()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- config changes


def test_config_changes_on_resume_refused_unless_allowed_and_recorded(workspace, tmp_path, capsys):
    checkpoint, data = workspace
    run_dir = tmp_path / "run"
    run(tiny_config(checkpoint, data, run_dir, **{"run.max_steps": 2}), devices=ONE)  # 2 steps x 8 prompts
    history = yaml.safe_load((run_dir / "config_history.yaml").read_text())
    assert len(history) == 1 and history[0]["config"]["rollout"]["prompts_per_step"] == 8

    smaller = tiny_config(checkpoint, data, run_dir, **{"run.max_steps": 3, "rollout.prompts_per_step": 16})
    with pytest.raises(RunDirError, match=r"rollout.prompts_per_step: 8 -> 16.*--allow-config-change"):
        run(smaller, devices=ONE)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["rollout"]["prompts_per_step"] == 8  # untouched

    capsys.readouterr()
    run(smaller, allow_config_change=True, devices=ONE)
    out = capsys.readouterr().out
    assert "config change on resume from step 2: rollout.prompts_per_step: 8 -> 16 (allowed" in out
    assert "run.max_steps: 2 -> 3" in out
    metrics = read_metrics(run_dir)
    # The data position counts prompts: step 3 takes prompts 16-31, not 32-47 (batch 2 of 16).
    assert [(m["step"], m["data/prompts_used"]) for m in metrics] == [(1, 8), (2, 16), (3, 32)]
    history = yaml.safe_load((run_dir / "config_history.yaml").read_text())
    assert history[-1]["resumed_from_step"] == 2
    assert history[-1]["changes"]["rollout.prompts_per_step"] == [8, 16]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["rollout"]["prompts_per_step"] == 16



def test_only_changes_that_alter_the_computation_need_the_flag(tmp_path):
    safe = {"run.max_steps": (2, 3), "mesh.fsdp": (1, 2), "algo.micro_batch_per_device": (0, 1)}
    assert len(check_resume(safe, step=2, checkpoint=tmp_path / "2", allow=False)) == 3
    for key in ("optim.lr", "rollout.group_size", "data.shuffle_seed", "model.path", "ktae.enabled"):
        with pytest.raises(RunDirError, match=key):
            check_resume({**safe, key: (1, 2)}, step=2, checkpoint=tmp_path / "2", allow=False)


def test_config_changes_compares_tuples_as_lists_and_missing_keys_as_defaults():
    saved = {"data": {"train_files": ["a.jsonl"]}, "run": {"max_steps": 3}}
    current = {"data": {"train_files": ("a.jsonl",)}, "run": {"max_steps": 3, "eval_limit": 0}}
    assert config_changes(saved, current, {"run": {"eval_limit": 0}}) == {}
    assert config_changes(saved, current, {"run": {"eval_limit": 5}}) == {"run.eval_limit": (5, 0)}


# ---------------------------------------------------------------------------------------------- damaged files


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(workspace, tmp_path, capsys):
    checkpoint, data = workspace
    run_dir = tmp_path / "run"
    cfg = tiny_config(checkpoint, data, run_dir, **{"run.max_steps": 3})
    run(cfg, devices=ONE)
    for f in (run_dir / "checkpoints" / "3" / "state").rglob("d/*"):  # garbled array files
        f.write_bytes(os.urandom(f.stat().st_size))
    (run_dir / "checkpoints" / "2" / "state" / "_METADATA").write_text('{"tree_metadata": {')  # cut short
    trainer = Trainer(cfg, ONE)
    try:
        capsys.readouterr()
        assert trainer.restore_latest() == 1
        out = capsys.readouterr().out
    finally:
        trainer.close()
    assert f"checkpoint {run_dir / 'checkpoints' / '3'} is unreadable (" in out
    assert f"checkpoint {run_dir / 'checkpoints' / '2'} is unreadable (its metadata cannot be read: " in out
    assert "using the previous one, step 1" in out and "does not fit" not in out
    assert len(list((run_dir / "checkpoints_damaged").iterdir())) == 2  # kept, out of the way


def test_partial_last_metrics_line_is_dropped_and_the_rewrite_is_atomic(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "x": s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 4, "x":')  # the writer died mid-line
    MetricsLogger(tmp_path, total_steps=9, start_step=2, tensorboard=False, wandb=False, progress=False,
                  config={}).close()
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert "dropping a partial last line" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # nothing left aside
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")  # damage inside the file is not guessed at
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2: not valid JSON"):
        MetricsLogger(tmp_path, total_steps=9, start_step=2, tensorboard=False, wandb=False, progress=False, config={})


def _limit_file_size():
    """The child may not write files over 100 kB (root ignores permissions, not this limit); the
    write fails with EFBIG instead of a SIGXFSZ kill."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_failed_checkpoint_write_exits_nonzero_and_keeps_the_last_good_one(workspace, tmp_path, capsys):
    checkpoint, data = workspace
    run_dir = tmp_path / "run"
    run(tiny_config(checkpoint, data, run_dir, **{"run.max_steps": 2}), devices=ONE)  # good checkpoints 1 and 2
    longer = _train_command(checkpoint, data, run_dir, **{"run.max_steps": 5})
    failed = subprocess.run(longer, env=ENV, capture_output=True, text=True, timeout=600,
                            preexec_fn=_limit_file_size)  # a hang fails here, on the timeout
    assert failed.returncode == 1, failed.stdout + failed.stderr
    # stderr ends with our one line, and orbax's logged tracebacks of the failure are held back (none
    # names an orbax file). Not ours to hold: XLA's notes (CUDA at start-up; the compilation cache the
    # tests share cannot write under this file-size limit) and the echoes that tensorstore's native
    # threads print, interleaved, when they post to orbax's closed event loop ("RuntimeError: Event
    # loop is closed"; they come and go with timing).
    lines = [x for x in failed.stderr.strip().splitlines()
             if "cudart_stub.cc" not in x and "before absl::InitializeLog() is called" not in x]
    assert "orbax" not in "\n".join(lines[:-1]), failed.stderr
    last = lines[-1]
    assert last.startswith(f"ktae-train: writing checkpoint {run_dir / 'checkpoints' / '3'} failed"), failed.stderr
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / '2'}" in last
    assert max(m["step"] for m in read_metrics(run_dir)) <= 4  # stopped at once, not trained on
    capsys.readouterr()
    run(tiny_config(checkpoint, data, run_dir, **{"run.max_steps": 5}), devices=ONE)
    assert f"resumed from {run_dir / 'checkpoints' / '2'}" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5]


def test_orbax_error_logs_are_held_during_a_save_and_passed_on_when_it_succeeds():
    import logging

    from ktae_jax import checkpoint

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    absl = logging.getLogger("absl")
    absl.addHandler(handler)
    held = checkpoint._HeldOrbaxErrors()
    absl.addFilter(held)
    try:
        def log(level, where):
            absl.handle(absl.makeRecord("absl", level, where, 1, "orbax says %s", ("x",), None))

        orbax_file = str(checkpoint._ORBAX_DIR / "checkpoint_manager.py")
        log(logging.ERROR, orbax_file)  # no save in flight: printed at once
        assert len(seen) == 1
        held.holding = True
        log(logging.ERROR, orbax_file)
        log(logging.WARNING, orbax_file)  # below ERROR: never held
        log(logging.ERROR, "/elsewhere/module.py")  # not orbax's: never held
        assert len(seen) == 3 and len(held.held) == 1
        held.release()  # the save succeeded: the held record is passed on, nothing lost
        assert len(seen) == 4 and seen[-1].pathname == orbax_file and not held.holding
        held.holding = True
        log(logging.ERROR, orbax_file)
        held.drop()  # the save failed: our one-line error replaces it
        assert len(seen) == 4 and held.held == []
    finally:
        absl.removeFilter(held)
        absl.removeHandler(handler)
