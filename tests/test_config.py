"""Configs: YAML + overrides, errors that name the key, the shipped recipe files, the dry run."""

import pathlib
import re

import pytest

from ktae_jax.cli.train import main as train_main
from ktae_jax import rundir
from ktae_jax.config import ConfigError, TrainConfig, load_config
from ktae_jax.plan import dry_run

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
PAPER = sorted(f for f in (CONFIGS / "paper").glob("*.yaml") if re.fullmatch(r"(grpo|dapo)(_ktae)?_(1\.5b|7b)", f.stem))
LORA_7B = CONFIGS / "paper" / "grpo_ktae_7b_lora.yaml"


def test_defaults_overrides_and_round_trip(tmp_path):
    cfg = load_config([], ["algo.kl_coef=0.001", "optim.lr=1e-4", "data.train_files=[a.jsonl, b.parquet]",
                           "ktae.enabled=true"])
    assert cfg.algo.kl_coef == 0.001 and cfg.optim.lr == 1e-4 and cfg.ktae.enabled
    assert cfg.data.train_files == ("a.jsonl", "b.parquet")
    # A run directory's config.yaml (written from to_dict) loads back as the same config.
    rundir.record_config(tmp_path, cfg.to_dict(), start_step=0)
    assert load_config([tmp_path / "config.yaml"]) == cfg
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


def _numeric_fields():
    import dataclasses
    import typing

    from ktae_jax.config import SECTIONS

    for section, cls in SECTIONS.items():
        for name, hint in typing.get_type_hints(cls).items():
            if hint in (int, float) and name in {f.name for f in dataclasses.fields(cls)}:
                yield f"{section}.{name}"


def test_every_numeric_field_has_a_range_and_a_negative_value_is_refused_naming_it():
    from ktae_jax.config import RANGES

    fields = list(_numeric_fields())
    assert len(fields) > 40 and sorted(fields) == sorted(RANGES)
    for key in fields:  # -5 is outside every field's range
        with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}=-5"):
            load_config([], [f"{key}=-5"])


@pytest.mark.parametrize("override", [
    "optim.lr=-1", "optim.grad_clip=-1", "optim.weight_decay=-5", "optim.b2=1.5", "optim.b1=1.0",
    "reward.timeout_s=-1", "reward.timeout_s=0", "reward.num_workers=-2", "rollout.top_p=1.5", "algo.clip_low=1.0",
    "ktae.b=1.5", "data.num_epochs=0", "mesh.tensor=0", "run.ktae_top_tokens=0",
])
def test_out_of_range_values_are_refused_at_load(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}=.*: must be in"):
        load_config([], [override])


@pytest.mark.parametrize("override", ["optim.lr=0", "optim.grad_clip=0", "data.num_epochs=-1", "mesh.data=-1",
                                      "algo.clip_ratio_c=0", "algo.clip_ratio_c=3", "rollout.top_p=1", "ktae.b=1"])
def test_boundary_values_that_mean_off_or_all_are_accepted(override):
    load_config([], [override])


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  group_size: 4\nmodell:\n  path: x\n")
    with pytest.raises(ConfigError, match="bad.yaml.*modell"):
        load_config([bad])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "missing.yaml"])


def test_include_merges_the_named_files_first(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.yaml").write_text("rollout:\n  group_size: 4\n  prompts_per_step: 16\n")
    (tmp_path / "parts" / "b.yaml").write_text("include: a.yaml\nrollout:\n  group_size: 2\n")  # relative to itself
    top = tmp_path / "top.yaml"
    top.write_text("include: [parts/b.yaml]\nrollout:\n  prompts_per_step: 32\nalgo:\n  kl_coef: 0.5\n")
    cfg = load_config([top], ["algo.kl_coef=0.25"])
    assert (cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.algo.kl_coef) == (2, 32, 0.25)
    (tmp_path / "loop.yaml").write_text("include: top2.yaml\n")
    (tmp_path / "top2.yaml").write_text("include: [loop.yaml]\n")
    with pytest.raises(ConfigError, match="included in a cycle"):
        load_config([tmp_path / "loop.yaml"])
    (tmp_path / "missing.yaml").write_text("include: [nope.yaml]\n")
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist \(included by .*missing\.yaml\)"):
        load_config([tmp_path / "missing.yaml"])
    (tmp_path / "bad.yaml").write_text("include: {a: 1}\n")
    with pytest.raises(ConfigError, match="bad.yaml: 'include' must be a file name or a list"):
        load_config([tmp_path / "bad.yaml"])


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
        size = path.stem.rsplit("_", 1)[1]
        assert cfg.model.path == f"checkpoints/Qwen2.5-Math-{size.upper()}" and cfg.run.run_dir == f"runs/{path.stem}"
        assert (cfg.model.param_dtype, cfg.model.compute_dtype, cfg.run.max_steps) == ("float32", "bfloat16", 500)
        assert (cfg.algo.mini_batch_prompts, cfg.algo.micro_batch_per_device, cfg.mesh.fsdp) == (128, 1, 8)
        if path.stem.startswith("dapo"):
            assert (cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.clip_ratio_c) == (0.2, 0.28, 10.0)
            assert cfg.algo.dynamic_sampling and cfg.reward.overlong_buffer == 512 and cfg.algo.kl_coef == 0
            assert cfg.reward.kind == "dapo" and cfg.algo.max_num_gen_batches == 10
        else:
            assert cfg.algo.kl_coef == 0.001 and cfg.algo.kl_estimator == "low_var_kl"
            assert (cfg.algo.clip_high, cfg.algo.clip_ratio_c, cfg.algo.dynamic_sampling) == (0.2, 0.0, False)
            assert cfg.reward.kind == "correctness" and cfg.reward.overlong_buffer == 0
        plan = dry_run(cfg)
        assert "estimated memory per device" in plan and "whole groups" in plan
        for mesh_file in sorted((CONFIGS / "mesh").glob("*.yaml")):
            assert "update  (state" in dry_run(load_config([path, mesh_file]))
    assert train_main(["--config", str(PAPER[0]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "mesh: data=1 x fsdp=8 x tensor=1 over 8 device(s)" in out
    assert train_main(["--config", str(PAPER[0]), "--dry-run", "algo.nope=1"]) == 2
    assert "unknown config key algo.nope" in capsys.readouterr().err


def test_the_lora_overlay_is_the_paper_recipe_plus_adapters_on_one_device():
    lora = load_config([LORA_7B]).to_dict()
    paper = load_config([CONFIGS / "paper" / "grpo_ktae_7b.yaml"]).to_dict()
    changed = {f"{section}.{key}" for section in paper for key in paper[section]
               if lora[section][key] != paper[section][key]}
    assert changed == {"model.param_dtype", "lora.rank", "lora.alpha", "optim.lr", "rollout.sample_prompts_per_device",
                       "mesh.fsdp", "run.run_dir"}
    assert lora["lora"]["rank"] > 0 and lora["mesh"]["data"] * lora["mesh"]["fsdp"] * lora["mesh"]["tensor"] == 1


def test_tiny_config_is_valid():
    cfg = load_config([CONFIGS / "tiny.yaml"])
    assert isinstance(cfg, TrainConfig) and cfg.model.path == "tiny"


def test_runtime_configs_are_built_from_the_sections():
    cfg = load_config([], ["rollout.max_new_tokens=48", "rollout.temperature=0.7", "rollout.top_k=5",
                           "rollout.group_size=4", "reward.kind=dapo", "reward.overlong_buffer=16",
                           "reward.format_weight=0.1", "ktae.k1=1.5"])
    sampling = cfg.to_sampling([7, 9], 3)
    assert (sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p) == (48, 0.7, 5, 1.0)
    assert (sampling.eos_ids, sampling.pad_id, sampling.num_samples, sampling.greedy) == ((7, 9), 3, 4, False)
    reward = cfg.to_reward()
    assert (reward.kind, reward.overlong_buffer, reward.max_response_len, reward.format_weight) == ("dapo", 16, 48, 0.1)
    assert reward.custom_fn is None
    assert cfg.to_ktae((1, 2)) is None  # ktae.enabled is false
    on = load_config([], ["ktae.enabled=true", "ktae.k1=1.5"])
    assert on.to_ktae((1, 2)).k1 == 1.5 and on.to_ktae((1, 2)).ignore_token_ids == (1, 2)
    assert load_config([], ["ktae.enabled=true", "ktae.ignore_special=false"]).to_ktae((1, 2)).ignore_token_ids == ()


# Qwen3 dense shapes from the public config.json files (sources in plan.KNOWN_ARCHITECTURES), written out
# here again: (layers, hidden, MLP width, query heads, kv heads, head dim, vocabulary, tied embeddings).
QWEN3 = {"Qwen3-1.7B": (28, 2048, 6144, 16, 8, 128, 151936, True),
         "Qwen3-4B": (36, 2560, 9728, 32, 8, 128, 151936, True),
         "Qwen3-8B": (36, 4096, 12288, 32, 8, 128, 151936, False)}
# The model cards' rounded figures (billions): total and without the embedding tables.
QWEN3_CARD = {"Qwen3-1.7B": (1.7, 1.4), "Qwen3-4B": (4.0, 3.6), "Qwen3-8B": (8.2, 6.95)}


@pytest.mark.parametrize("name", sorted(QWEN3))
def test_dry_run_knows_qwen3_by_folder_name(name, tmp_path, capsys):
    layers, e, f, heads, kv, d, vocab, tied = QWEN3[name]
    # Per layer: q, k, v, o projections (no biases), the SwiGLU MLP, two RMSNorms and Qwen3's q/k norms.
    per_layer = e * heads * d * 2 + e * kv * d * 2 + 3 * e * f + 2 * e + 2 * d
    body = layers * per_layer + e  # + the final norm
    total = body + vocab * e * (1 if tied else 2)
    card_total, card_body = QWEN3_CARD[name]
    assert abs(total / 1e9 - card_total) < 0.05 and abs((body - e) / 1e9 - card_body) < 0.05

    missing = tmp_path / "models" / name  # no folder there: the architecture comes from the name
    assert train_main(["--config", str(CONFIGS / "paper" / "grpo_7b.yaml"), "--dry-run",
                       f"model.path={missing}"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("model: "))
    assert f"built-in architecture of {name}" in line and line.startswith("model: qwen3, ")
    printed = float(line.split(", ")[1].split("B parameters")[0])  # billions, 3 decimals
    assert abs(printed * 1e9 - total) <= 0.5e6, (line, total)


def test_dry_run_counts_the_rollout_copy_beside_update_and_sampler():
    """#14: the bf16 rollout copy of the 7B policy (whole on each of 8 GPUs: 2 bytes x parameters)
    is in the plan, and in both the update's and the sampler's totals."""
    import re

    from ktae_jax.plan import KNOWN_ARCHITECTURES, ModelConfig

    plan = dry_run(load_config([CONFIGS / "paper/dapo_ktae_7b.yaml", CONFIGS / "mesh/gpu_1x8.yaml"]))
    gib = lambda label: float(re.search(rf"  {label}.*?([\d.]+) GiB", plan).group(1))  # noqa: E731
    copy = ModelConfig.from_hf(KNOWN_ARCHITECTURES["qwen2.5-math-7b"]).num_params * 2 / 2**30
    assert gib("rollout copy of the policy") == pytest.approx(copy, abs=0.01)
    assert gib(r"update  \(state") > gib("parameters") * 4 + copy
    assert gib(r"sampler \(state") >= gib("parameters") * 3 + copy + gib("sampler KV cache")
