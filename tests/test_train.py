"""The trainer end to end on a tiny random model: CLI, SIGTERM + resume, 1 vs 8 devices, exact
resume, dynamic sampling, NaN stop, bad checkpoints."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from _train_helpers import (assert_same_updates, make_workspace, read_metrics, tiny_config, tiny_overrides,
                            use_gradient_linear_optimizer, without_times)
from _xla import xla_flags

from ktae_jax.metrics import StageTimer
from ktae_jax.models import load_pretrained
from ktae_jax.models.transformer import LayerList, has_layer_lists, is_stacked_path
from ktae_jax.rollouts import Rollouts
from ktae_jax.train import Trainer, TrainingError, run

TESTS = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train"))


def _params(trainer_or_state):
    state = trainer_or_state.state if isinstance(trainer_or_state, Trainer) else trainer_or_state
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_cli_runs_logs_checkpoints_survives_sigterm_and_resumes(workspace, tmp_path):
    checkpoint, data = workspace
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "ktae_jax.cli.train", *tiny_overrides(
        checkpoint, data, run_dir, **{"run.max_steps": 1000, "run.export_hf": True, "run.tensorboard": True,
                                      "run.progress": True, "run.checkpoint_every": 100})]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # preemption: save after the current step and stop
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 143, output  # stopped early by SIGTERM, checkpoint saved: not a success
    assert "SIGTERM: checkpoint saved at step" in output and "compiled train step memory" in output
    assert "train:" in output  # the progress bar
    stopped = len(read_metrics(run_dir))
    assert 1 <= stopped < 1000 and (run_dir / "checkpoints" / str(stopped)).is_dir()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))

    resumed = subprocess.run(args[:3] + ["--max-steps", str(stopped + 1)] + args[3:], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {run_dir / 'checkpoints' / str(stopped)}" in resumed.stdout
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, stopped + 2))
    for key in ("reward/mean", "reward/accuracy", "response/length_mean", "response/length_max", "loss/kl",
                "loss/entropy", "loss/clip_frac", "optim/grad_norm", "optim/lr", "time/sample_s", "time/grade_wait_s",
                "time/advantages_s", "time/update_s", "throughput/tokens_per_s", "reward/timeouts",
                "ktae/top_positive", "ktae/top_negative", "response/truncated_frac"):
        assert key in metrics[-1], key
    model, tokenizer = load_pretrained(run_dir / "hf")  # the exported policy
    assert tokenizer is not None and model.config.vocab_size == 96


def test_resume_reproduces_the_uninterrupted_run(workspace, tmp_path):
    checkpoint, data = workspace
    # Three steps straight; and one step, "killed", then resumed for two more (so that the restored
    # optimizer state, key and data position carry through more than one step).
    straight = tiny_config(checkpoint, data, tmp_path / "straight", **{"run.max_steps": 3})
    run(straight)
    split = tiny_config(checkpoint, data, tmp_path / "split", **{"run.max_steps": 3})
    run(split, max_steps=1)  # "killed" after step 1
    assert len(read_metrics(tmp_path / "split")) == 1
    run(split)  # resumes at step 2
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        x, y = without_times(x), without_times(y)
        assert x["ktae/top_positive"] == y["ktae/top_positive"]
        numbers = lambda m: {k: v for k, v in m.items() if not isinstance(v, list)}  # noqa: E731
        assert numbers(x) == pytest.approx(numbers(y), rel=1e-5, abs=1e-6)
    assert a[-1]["optim/grad_norm"] > 0  # the runs really learned something
    final = [Trainer(tiny_config(checkpoint, data, tmp_path / d, **{"run.max_steps": 3})) for d in ("straight", "split")]
    try:
        for t in final:
            assert t.restore_latest() == 3
        for x, y in zip(_params(final[0]), _params(final[1])):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    finally:
        for t in final:
            t.close()


def test_one_device_and_eight_devices_agree(workspace, tmp_path, capfd, monkeypatch, no_compilation_cache):
    checkpoint, data = workspace
    assert jax.device_count() == 8
    use_gradient_linear_optimizer(monkeypatch)  # parameters compared as gradients (see _train_helpers)
    results = []
    # The eight-device run also slices its old/reference log-prob passes finer than its update.
    eight = {"mesh.data": 4, "mesh.fsdp": 2, "algo.logprob_micro_batch_per_device": 1}
    for name, devices, mesh in [("one", jax.devices()[:1], {}), ("eight", None, eight)]:
        trainer = Trainer(tiny_config(checkpoint, data, tmp_path / name, **{"algo.micro_batch_per_device": 2,
                                                                             "rollout.sample_prompts_per_device": 0},
                                      **mesh), devices)
        try:
            before = _params(trainer)
            metrics = trainer.step(1)
            results.append((metrics, before, _params(trainer)))
            if name == "eight":
                leaf = jax.tree.leaves(trainer.state.params)[0]
                assert len(leaf.sharding.device_set) == 8
                # The optimizer state is split like the parameters (FSDP), not replicated.
                for moment, param in zip(jax.tree.leaves(optax.tree_utils.tree_get(trainer.state.opt_state, "nu")),
                                         jax.tree.leaves(trainer.state.params), strict=True):
                    assert moment.sharding.is_equivalent_to(param.sharding, param.ndim)
                # FSDP gathers the weights; XLA never has to re-split the activations by the embedding
                # (it says so on stderr: "Involuntary full rematerialization").
                assert "Involuntary full rematerialization" not in capfd.readouterr().err
        finally:
            trainer.close()
    (m1, p0, p1), (m8, p0_8, p8) = results
    assert all(np.array_equal(x, y) for x, y in zip(p0, p0_8))
    assert m1["reward/mean"] == m8["reward/mean"]  # the same greedy-independent samples and rewards
    for key in ("loss/total", "loss/pg", "loss/kl", "optim/grad_norm"):
        assert m1[key] == pytest.approx(m8[key], rel=1e-4, abs=1e-6), key
    assert_same_updates(p0, p1, p8)


def test_state_held_per_layer_on_cpu_is_checkpointed_stacked(workspace, tmp_path):
    """On CPU (unrolled layer stack) the train state holds each layer's weights and moments as separate
    arrays, split by FSDP like the stacked ones; checkpoints keep the stacked layout: one written by a
    scanning trainer (stacked state) restores into it with the same values, and back."""
    checkpoint, data = workspace
    eight = {"mesh.data": 4, "mesh.fsdp": 2, "run.checkpoint_every": 1}
    scanning = Trainer(tiny_config(checkpoint, data, tmp_path / "run", **eight, **{"model.scan_layers": True}))
    try:
        assert not has_layer_lists(scanning.state)
        scanning.step(1)  # moments not zero
        scanning.save(1)
        scanning.checkpointer.wait()
        stacked = [(path, np.asarray(x), x.sharding, x.addressable_shards[0].data.nbytes)
                   for path, x in jax.tree.leaves_with_path(scanning.state)]
    finally:
        scanning.close()
    unrolled = Trainer(tiny_config(checkpoint, data, tmp_path / "run", **eight))
    try:
        assert unrolled.restore_latest() == 1
        held = jax.tree.leaves_with_path(unrolled.state, is_leaf=lambda x: isinstance(x, LayerList))
        assert len(held) == len(stacked)
        layer_leaves = 0
        for (path, want, sharding, shard_bytes), (held_path, x) in zip(stacked, held, strict=True):
            assert path == held_path
            if not isinstance(x, LayerList):
                np.testing.assert_array_equal(np.asarray(x), want)
                continue
            layer_leaves += 1
            assert is_stacked_path(path) and len(x.arrays) == want.shape[0]
            np.testing.assert_array_equal(np.stack([np.asarray(a) for a in x.arrays]), want)
            for a in x.arrays:  # split over the mesh as the stacked leaf is, less its layer axis
                assert a.sharding.spec == jax.sharding.PartitionSpec(*sharding.spec[1:])
                assert a.addressable_shards[0].data.nbytes * want.shape[0] == shard_bytes
        # parameters and both Adam moments of every stacked weight
        assert layer_leaves == 3 * len(jax.tree.leaves(unrolled.weights.initial["layers"]))
        assert any("fsdp" in str(sharding.spec) for _, _, sharding, _ in stacked)  # FSDP split something
        back = unrolled.weights.stored(unrolled.state)
        for (path, want, sharding, _), x in zip(stacked, jax.tree.leaves(back), strict=True):
            np.testing.assert_array_equal(np.asarray(x), want)
            assert x.sharding.is_equivalent_to(sharding, want.ndim), path
    finally:
        unrolled.close()


def _fake_rollouts(rewards, G, R=3):
    """Host-side rollouts with the given per-row rewards (only the rewards matter to the filter)."""
    rewards = np.asarray(rewards, np.float32)
    n = len(rewards)
    z = lambda dtype, *shape: np.zeros((n, *shape), dtype)  # noqa: E731
    return Rollouts(z(np.int32, 5), z(np.int32, 5), z(np.int32, R), z(np.int32, R), z(np.float32, R), rewards,
                    (rewards > 0).astype(np.float32), (rewards > 0).astype(np.float32), np.full(n, R),
                    {"reward/timeouts": 0.0})


def test_dynamic_sampling_fills_the_batch_or_stops_at_its_limit(workspace, tmp_path, monkeypatch):
    checkpoint, data = workspace
    trainer = Trainer(tiny_config(checkpoint, data, tmp_path / "ds", **{"algo.dynamic_sampling": True,
                                                                        "algo.max_num_gen_batches": 3}))
    try:
        G, P = 4, 8
        mixed = np.tile([0.0, 1.0, 0.0, 0.0], P)  # every group mixed
        rounds = iter([np.zeros(P * G), mixed.copy()])
        collector = trainer.rollouts
        monkeypatch.setattr(collector, "_generate", lambda *args, **kw: (_fake_rollouts(next(rounds), G), None))
        batch, _, info = collector.collect(trainer.state.params, jax.random.PRNGKey(0), StageTimer())
        assert info == {"dynamic/rounds": 2, "dynamic/mixed_groups": P, "dynamic/filled": 1.0}
        per_group = batch.rewards_N.reshape(-1, G)
        assert len(per_group) == P and np.all(per_group.max(1) > per_group.min(1))

        monkeypatch.setattr(collector, "_generate", lambda *args, **kw: (_fake_rollouts(np.ones(P * G), G), None))
        batch, _, info = collector.collect(trainer.state.params, jax.random.PRNGKey(0), StageTimer())
        assert info == {"dynamic/rounds": 3, "dynamic/mixed_groups": 0, "dynamic/filled": 0.0}
        assert batch.rewards_N.shape == (P * G,)  # still a full, static-shape batch
    finally:
        trainer.close()


def test_rollouts_of_different_prompt_widths_concatenate_left_padded():
    a, b = _fake_rollouts([0.0, 1.0], 2), _fake_rollouts([1.0, 1.0], 2)
    b.tokens_NxT = np.arange(1, 7 * 2 + 1, dtype=np.int32).reshape(2, 7)
    b.attn_NxT = np.ones((2, 7), np.int32)
    a.tokens_NxT[:] = 5
    a.attn_NxT[:] = 1
    merged = Rollouts.concat([a, b], pad_id=99)
    assert merged.tokens_NxT.shape == (4, 7)
    np.testing.assert_array_equal(merged.tokens_NxT[:2], [[99, 99, 5, 5, 5, 5, 5]] * 2)
    np.testing.assert_array_equal(merged.attn_NxT[:2], [[0, 0, 1, 1, 1, 1, 1]] * 2)
    np.testing.assert_array_equal(merged.tokens_NxT[2:], b.tokens_NxT)
    assert merged.rewards_N.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_trimmed_prompt_padding_changes_nothing_but_the_work(workspace, tmp_path, monkeypatch):
    checkpoint, data = workspace
    use_gradient_linear_optimizer(monkeypatch)  # parameters compared as gradients (see _train_helpers)
    results = []
    for trim in (False, True):
        trainer = Trainer(tiny_config(checkpoint, data, tmp_path / f"trim{trim}", **{
            "data.trim_prompt_padding": trim, "data.max_prompt_len": 48}), jax.devices()[:1])
        calls = []
        advantages = trainer._advantages

        def spy(resp, resp_mask, rewards, correct=None, **kwargs):
            calls.append((np.asarray(rewards), None if correct is None else np.asarray(correct)))
            return advantages(resp, resp_mask, rewards, correct, **kwargs)

        trainer._advantages = spy
        try:
            before = _params(trainer)
            metrics = trainer.step(1)
            results.append((metrics, before, _params(trainer), sorted(trainer._train_steps)))
        finally:
            trainer.close()
        # The advantages get the final rewards and, for KTAE's split, the base reward's sign (here a
        # custom base, a digit in the response, with no shaping term: the two agree row by row).
        ((rewards, correct),) = calls
        assert correct is not None and 0 < correct.mean() < 1
        np.testing.assert_array_equal(correct, (rewards > 0).astype(np.float32))
        assert rewards.mean() == pytest.approx(metrics["reward/mean"])
    (m_full, p0, p_full, widths_full), (m_trim, _, p_trim, widths_trim) = results
    assert widths_full == [48] and len(widths_trim) == 2 and min(widths_trim) < 48  # a narrower step compiled
    assert m_full["response/length_mean"] == m_trim["response/length_mean"]
    assert m_full["reward/mean"] == m_trim["reward/mean"]
    for key in ("loss/total", "loss/kl", "optim/grad_norm"):
        assert m_full[key] == pytest.approx(m_trim[key], rel=1e-4, abs=1e-6), key
    assert_same_updates(p0, p_full, p_trim)


def test_stage_timer_sums_repeated_stages(monkeypatch):
    from ktae_jax import metrics

    clock = iter([0.0, 1.5, 10.0, 10.25, 20.0, 23.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    timer = StageTimer("sample", "grade_wait")
    for stage in ("sample", "sample", "update"):  # two sampling rounds (DAPO), one update
        with timer(stage):
            pass
    assert timer.seconds == {"time/sample_s": 1.75, "time/grade_wait_s": 0.0, "time/update_s": 3.0}


def test_nan_loss_stops_without_a_poisoned_checkpoint(workspace, tmp_path):
    checkpoint, data = workspace
    cfg = tiny_config(checkpoint, data, tmp_path / "nan", **{"reward.custom_fn": "_train_helpers:nan_reward"})
    with pytest.raises(TrainingError, match="step 1: non-finite loss"):
        run(cfg)
    assert not list((tmp_path / "nan" / "checkpoints").glob("[0-9]*"))
    assert not (tmp_path / "nan" / "metrics.jsonl").exists()


def test_checkpoint_of_another_model_is_a_clear_error(workspace, tmp_path):
    from _model_helpers import make_hf_checkpoint

    from ktae_jax.checkpoint import CheckpointError

    checkpoint, data = workspace
    run(tiny_config(checkpoint, data, tmp_path / "ck", **{"run.max_steps": 1}))
    wider = make_hf_checkpoint(tmp_path, "qwen2", seed=3, name="wider", hidden_size=32)
    trainer = Trainer(tiny_config(wider, data, tmp_path / "ck"))
    try:
        with pytest.raises(CheckpointError, match="ck/checkpoints/1"):
            trainer.restore_latest()
    finally:
        trainer.close()


def test_validation_every_n_steps(workspace, tmp_path):
    checkpoint, data = workspace
    cfg = tiny_config(checkpoint, data, tmp_path / "val", **{"run.max_steps": 2, "run.eval_every": 2,
                                                             "run.eval_file": str(data), "run.eval_limit": 8})
    run(cfg)
    metrics = read_metrics(tmp_path / "val")
    assert "eval/accuracy" not in metrics[0] and 0.0 <= metrics[1]["eval/accuracy"] <= 1.0
    assert len((tmp_path / "val" / "eval" / "step_000002" / "val.jsonl").read_text().splitlines()) == 8
