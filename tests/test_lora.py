"""LoRA: adapters on the projections, the trainable/frozen split, PEFT and merged exports, and the
trainer with adapters (checkpoints of adapters only, exact resume, the base as reference, learning)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_helpers import make_hf_checkpoint
from _train_helpers import make_workspace, read_metrics, tiny_config, without_times
from flax import nnx

from ktae_jax.adapters import PolicyWeights
from ktae_jax.models import load_pretrained, save_pretrained
from ktae_jax.models import lora
from ktae_jax.models.config import ModelOptions
from ktae_jax.step import Layout, rollout_logprobs, split_policy
from ktae_jax.train import run

LORA = {"lora.rank": 4, "lora.alpha": 8.0, "optim.lr": 2e-2}


def _perturbed(model, seed=0):
    """`model` with its adapters moved off their initial B = 0 (random A and B), so that they matter."""
    graphdef, params, frozen = split_policy(model)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), params)
    return nnx.merge(graphdef, params, frozen)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """(HF checkpoint, our model with perturbed adapters on all seven projections, token ids)."""
    root = tmp_path_factory.mktemp("lora")
    checkpoint = make_hf_checkpoint(root, "qwen2", seed=5)
    model, _ = load_pretrained(checkpoint, options=ModelOptions(scan_layers=True))
    model = _perturbed(lora.add_adapters(model, lora.LoraSpec(rank=4, alpha=8.0), seed=1))
    ids = np.random.default_rng(0).integers(6, 90, size=(2, 7)).astype(np.int64)
    return checkpoint, model, ids


def test_peft_export_loads_in_peft_with_the_same_logits(adapted, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    checkpoint, model, ids = adapted
    out = lora.save_peft_adapter(model, tmp_path / "adapter", base_model=str(checkpoint))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and len(config["target_modules"]) == 7
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(ids)).logits.numpy()
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_logits = plain(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(theirs - base_logits).max() > 1e-2  # the adapters change the function...
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)  # ...in the same way in PEFT


def test_merged_export_and_unrolled_layers_compute_the_adapted_model(adapted, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint, model, ids = adapted
    ours = np.asarray(model(jnp.asarray(ids)))
    folded = lora.fold_adapters(nnx.clone(model))
    assert not lora.has_adapters(folded)
    np.testing.assert_allclose(np.asarray(folded(jnp.asarray(ids))), ours, atol=1e-4, rtol=1e-4)
    _, tokenizer = load_pretrained(checkpoint)
    save_pretrained(folded, tokenizer, tmp_path / "merged")
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(
            torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    # The same adapters in the unrolled layer loop.
    graphdef, state = nnx.split(model)
    unrolled = nnx.merge(graphdef, state)
    unrolled.options = ModelOptions(scan_layers=False)
    np.testing.assert_allclose(np.asarray(unrolled(jnp.asarray(ids))), ours, atol=1e-5, rtol=1e-5)


def test_split_trains_only_the_adapters_and_bad_targets_are_named():
    from ktae_jax.models import init_random
    from ktae_jax.models.config import ModelConfig

    cfg = ModelConfig(family="qwen2", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=4, qkv_bias=True)
    full = split_policy(nnx.eval_shape(lambda: init_random(cfg)))  # shapes only: the split is by variable type
    assert not jax.tree.leaves(full[2])  # full fine-tuning: nothing frozen
    model = nnx.eval_shape(lambda: lora.add_adapters(init_random(cfg), lora.LoraSpec(2, 4.0, ("q_proj", "down_proj"))))
    _, trainable, frozen = split_policy(model)
    paths = ["/".join(map(str, p)) for p, _ in trainable.flat_state()]
    assert len(paths) == 4 and all(p.startswith(("layers/attn/q_lora_", "layers/mlp/down_lora_")) for p in paths), paths
    assert sum(x.size for x in jax.tree.leaves(frozen)) == sum(x.size for x in jax.tree.leaves(full[1]))
    with pytest.raises(ValueError, match="qproj"):
        lora.LoraSpec(2, 4.0, ("qproj",))
    from ktae_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^lora: .*qproj"):
        load_config([], ["lora.rank=4", "lora.targets=[qproj]"])
    with pytest.raises(ConfigError, match="lora.rank"):
        load_config([], ["lora.rank=-1"])


# ---------------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A LoRA run of 6 steps; then its checkpoints after step 3 are deleted, as if it had been
    killed there (metrics.jsonl keeps steps 4-6, which the resume must cut back), and it is rerun.
    Returns the first run's metrics and final state beside the resumed run's."""
    import orbax.checkpoint as ocp

    root = tmp_path_factory.mktemp("lora_train")
    checkpoint, data = make_workspace(root)
    cfg = tiny_config(checkpoint, data, root / "run", **LORA, **{"run.max_steps": 6, "run.export_hf": True,
                                                                 "run.keep_checkpoints": 6})
    run(cfg)
    checkpoints = root / "run" / "checkpoints"
    restore = lambda: ocp.StandardCheckpointer().restore((checkpoints / "6" / "state").absolute())  # noqa: E731
    first = read_metrics(root / "run"), restore()
    for step in (4, 5, 6):
        shutil.rmtree(checkpoints / str(step))
    run(cfg)
    return checkpoint, root / "run", first, (read_metrics(root / "run"), restore())


def test_lora_run_learns_and_resumes_exactly(runs):
    _, _, (metrics, state), (resumed_metrics, resumed_state) = runs
    assert [m["step"] for m in resumed_metrics] == list(range(1, 7))
    for x, y in zip(metrics, resumed_metrics):
        numbers = lambda m: {k: v for k, v in without_times(m).items() if not isinstance(v, list)}  # noqa: E731
        assert numbers(x) == pytest.approx(numbers(y), rel=1e-5, abs=1e-6)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(resumed_state)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    rewards = [m["reward/mean"] for m in metrics]
    assert np.mean(rewards[-2:]) > np.mean(rewards[:2]) + 0.1, rewards  # the adapters learn
    assert metrics[-1]["loss/kl"] > 0  # the policy left the (base) reference


def test_checkpoints_hold_the_adapters_and_their_optimizer_state_only(runs):
    checkpoint, run_dir, (_, state), _ = runs  # `state`: the arrays stored in the last checkpoint, as read back
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    paths = ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p) for p, _ in flat]
    shapes = [tuple(x.shape) for _, x in flat]
    param_shapes = sorted(s for p, s in zip(paths, shapes) if p.startswith("params/"))
    assert param_shapes and all("_lora_" in p for p in paths if p.startswith("params/")), paths
    assert all(p.startswith(("params/", "opt_state/")) or p in ("step", "rng") for p in paths), paths
    # The optimizer state: AdamW's two moments of each adapter, and scalar step counts.
    opt_shapes = [s for p, s in zip(paths, shapes) if p.startswith("opt_state/")]
    assert sorted(s for s in opt_shapes if s) == sorted(param_shapes * 2)
    adapters = sum(int(np.prod(s)) for s in param_shapes)
    assert sum(int(np.prod(s)) for s in opt_shapes) - 2 * adapters <= 4
    base, _ = load_pretrained(checkpoint)
    assert adapters < sum(x.size for x in jax.tree.leaves(nnx.state(base))) / 10
    # Exports: the folded model in Hugging Face format and the adapters in PEFT's layout.
    assert (run_dir / "hf" / "config.json").exists()
    assert json.loads((run_dir / "hf_adapter" / "adapter_config.json").read_text())["r"] == 4


def test_reference_is_the_base_model(adapted):
    """Under LoRA the reference policy is the frozen base read with the adapters off: its log-probs
    are the base model's, whatever the adapters have learned."""
    checkpoint, model, ids = adapted
    base, _ = load_pretrained(checkpoint)
    weights = PolicyWeights(base, lora.LoraSpec(rank=4, alpha=8.0), seed=1, mesh=None, compute_dtype="float32")
    _, trained, _ = split_policy(model)  # adapters far from their initial B = 0
    tokens = jnp.asarray(np.concatenate([ids, ids[::-1]]).astype(np.int32))
    logp = lambda graphdef, params, frozen=None: np.asarray(jax.jit(  # noqa: E731
        lambda p, f: rollout_logprobs(graphdef, p, tokens, jnp.ones_like(tokens), response_len=3, temperature=1.0,
                                      layout=Layout(1, 1, 1, 1), frozen=f)[0])(params, frozen))
    reference = logp(weights.graphdef, weights.reference(trained), weights.frozen)
    base_only, _ = load_pretrained(checkpoint)  # the base without adapters
    np.testing.assert_allclose(reference, logp(*nnx.split(base_only)), atol=1e-6)
    policy = logp(weights.graphdef, trained, weights.frozen)
    assert np.abs(policy - reference).max() > 1e-2  # the adapters do change the policy


def test_adapters_on_fsdp_and_tensor_sharded_weights(adapted):
    """On a 4 (fsdp) x 2 (tensor) mesh the adapters are split like the weights they adapt (A by W's
    input axis, B by its output axis), and the sharded policy and the sampler's folded copy compute
    the unsharded adapted model's logits."""
    from ktae_jax.mesh import MeshConfig, make_mesh

    checkpoint, model, ids = adapted
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded, _ = load_pretrained(checkpoint, mesh=mesh)
    weights = PolicyWeights(sharded, lora.LoraSpec(rank=4, alpha=8.0), seed=1, mesh=mesh, compute_dtype="float32")
    _, trained, _ = split_policy(model)
    params = jax.tree.map(lambda x, like: jax.device_put(x, like.sharding), trained, weights.initial)
    assert weights.initial["layers"]["attn"]["q_lora_a"].sharding.spec[1] == "fsdp"  # E split like q's input
    assert weights.initial["layers"]["mlp"]["down_lora_b"].sharding.spec[2] == "fsdp"  # E: down's output
    assert weights.initial["layers"]["mlp"]["gate_lora_b"].sharding.spec[2] == "tensor"  # F: gate's output
    ours = np.asarray(model(jnp.asarray(ids)))
    policy = jax.jit(lambda p, f: nnx.merge(weights.graphdef, p, f)(jnp.asarray(ids)))(params, weights.frozen)
    np.testing.assert_allclose(np.asarray(policy), ours, atol=1e-4, rtol=1e-4)
    copy = weights.rollout_copy(params)
    folded = jax.jit(lambda c: nnx.merge(weights.sample_graphdef, c)(jnp.asarray(ids)))(copy)
    np.testing.assert_allclose(np.asarray(folded), ours, atol=1e-4, rtol=1e-4)
    whole = jax.jit(lambda s: nnx.merge(weights.sample_graphdef, s)(jnp.asarray(ids)))(weights.full_state(params))
    np.testing.assert_allclose(np.asarray(whole), ours, atol=1e-4, rtol=1e-4)  # what validation samples from
