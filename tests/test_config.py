"""Configs: YAML + overrides, errors that name the key, the shipped recipe files, the dry run."""

import pathlib

import pytest

from ktae_jax.cli.train import main as train_main
from ktae_jax.config import ConfigError, TrainConfig, config_from_dict, load_config
from ktae_jax.plan import dry_run

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
PAPER = sorted((CONFIGS / "paper").glob("*.yaml"))


def test_defaults_overrides_and_round_trip(tmp_path):
    cfg = load_config([], ["algo.kl_coef=0.001", "optim.lr=1e-4", "data.train_files=[a.jsonl, b.parquet]",
                           "ktae.enabled=true"])
    assert cfg.algo.kl_coef == 0.001 and cfg.optim.lr == 1e-4 and cfg.ktae.enabled
    assert cfg.data.train_files == ("a.jsonl", "b.parquet")
    assert config_from_dict(cfg.to_dict()) == cfg
    first = tmp_path / "a.yaml"
    first.write_text("rollout:\n  group_size: 4\nalgo:\n  clip_high: 0.28\n")
    second = tmp_path / "b.yaml"
    second.write_text("rollout:\n  prompts_per_step: 12\n")
    cfg = load_config([first, second], ["rollout.group_size=2"])
    assert (cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.algo.clip_high) == (2, 12, 0.28)


@pytest.mark.parametrize("override, message", [
    ("algo.kl_coeff=0.1", "unknown config key algo.kl_coeff"),
    ("algos.kl_coef=0.1", "section"),
    ("rollout.group_size=four", "rollout.group_size: expected an integer"),
    ("rollout.group_size=2.5", "rollout.group_size: expected an integer"),
    ("algo.loss_agg=mean", "algo.loss_agg"),
    ("ktae.enabled=yes please", "ktae.enabled"),
    ("algo.mini_batch_prompts=3", "algo.mini_batch_prompts"),
    ("algo.clip_ratio_c=0.5", "algo.clip_ratio_c"),
    ("reward.overlong_buffer=100", "reward.overlong_buffer"),
    ("ktae.alpha=0", "ktae"),
    ("rollout.temperature=0", "rollout.temperature"),
])
def test_bad_values_name_the_key(override, message):
    extra = ["ktae.beta=0"] if override.startswith("ktae.alpha") else []
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config([], [override, *extra])


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  group_size: 4\nmodell:\n  path: x\n")
    with pytest.raises(ConfigError, match="bad.yaml.*modell"):
        load_config([bad])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "missing.yaml"])


def test_batch_must_split_into_whole_groups_per_device():
    cfg = load_config([], ["rollout.prompts_per_step=6", "rollout.group_size=4"])
    with pytest.raises(ConfigError, match="rollout.prompts_per_step=6 prompts cannot be split over 4 batch devices"):
        cfg.validate(num_batch_devices=4)
    cfg = load_config([], ["rollout.prompts_per_step=8", "rollout.group_size=8", "algo.micro_batch_per_device=16"])
    cfg.validate(num_batch_devices=4)  # 4 x 16 rollouts divide the 64 of the mini-batch
    with pytest.raises(ConfigError, match="algo.micro_batch_per_device=16: 8 devices"):
        cfg.validate(num_batch_devices=8)
    cfg = load_config([], ["rollout.prompts_per_step=8", "rollout.group_size=8", "algo.logprob_micro_batch_per_device=16"])
    assert cfg.logprob_micro_batch_rollouts(2) == 32 and cfg.micro_batch_rollouts(2) == 64
    with pytest.raises(ConfigError, match="algo.logprob_micro_batch_per_device=16: 8 devices x 16 does not divide"):
        cfg.validate(num_batch_devices=8)
    assert load_config([], ["algo.micro_batch_per_device=4"]).logprob_micro_batch_rollouts(2) == 8  # 0: as the update


def test_the_eight_paper_recipes_load_and_plan(capsys):
    assert len(PAPER) == 8
    for path in PAPER:
        cfg = load_config([path])
        assert cfg.rollout.prompts_per_step == 1024 and cfg.rollout.group_size == 16
        assert cfg.rollout.max_new_tokens == 3072 and cfg.data.max_prompt_len == 1024 and cfg.optim.lr == 1e-6
        assert cfg.ktae.enabled == ("ktae" in path.stem)
        if path.stem.startswith("dapo"):
            assert (cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.clip_ratio_c) == (0.2, 0.28, 10.0)
            assert cfg.algo.dynamic_sampling and cfg.reward.overlong_buffer == 512 and cfg.algo.kl_coef == 0
        else:
            assert cfg.algo.kl_coef == 0.001 and cfg.algo.kl_estimator == "low_var_kl"
        plan = dry_run(cfg)
        assert "estimated memory per device" in plan and "whole groups" in plan
        for mesh_file in sorted((CONFIGS / "mesh").glob("*.yaml")):
            assert "total" in dry_run(load_config([path, mesh_file]))
    assert train_main(["--config", str(PAPER[0]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "mesh: data=1 x fsdp=8 x tensor=1 over 8 device(s)" in out
    assert train_main(["--config", str(PAPER[0]), "--dry-run", "algo.nope=1"]) == 2
    assert "unknown config key algo.nope" in capsys.readouterr().err


def test_tiny_config_is_valid():
    cfg = load_config([CONFIGS / "tiny.yaml"])
    assert isinstance(cfg, TrainConfig) and cfg.model.path == "tiny"
