"""`ktae-train --dry-run`: the resolved config, the mesh, per-device batch and a memory estimate,
computed from config.json alone (no weights are read, no device memory is touched).

The memory figures are estimates from the shapes, per program as `--compile-only` reports them:
the update holds the parameters and AdamW moments (split like the parameters), a gradient
accumulator, the weights FSDP gathers (the embedding and output tables, one layer at a time, with
their unsplit gradients) and what one micro-batch keeps for the backward pass (`backward_memory`:
with materialised attention the scores of every layer, the largest term at 4,096-token rows; the
other activations by `model.remat`); the sampler holds the state and its KV cache. Constants were
calibrated on XLA's own figures for the 7B recipe on 8 x H100 (updates within ~20% below XLA's). XLA's figures for a
target come from `ktae-train ... --compile-only --target NAME` (`ktae_jax.aot`); the dry run says so.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import yaml

from ktae_jax import builtin
from ktae_jax.config import TrainConfig
from ktae_jax.models import ModelConfig
from ktae_jax.models.lora import adapter_count

# Architectures of the paper's base models and of Qwen3 dense models, for planning before the weights
# are downloaded, by folder name (from their public config.json files).
KNOWN_ARCHITECTURES = {
    "qwen2.5-math-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                              num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                              rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=4096),
    "qwen2.5-math-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                            rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=4096),
    # Qwen3 dense (post-trained releases), from the config.json files of Qwen/Qwen3-1.7B, -4B and -8B as
    # copied on the Hugging Face Hub (Qwen/Qwen3-8B: huggingface.co/thejaminator/qwen-hook-layer-9, commit
    # 478fb72 "Copy config.json from Qwen/Qwen3-8B"; Qwen3-4B: huggingface.co/MultiRL/qwen3_4b_instruct_sft
    # config.json, the same shape as github.com/zyzshishui/slime scripts/models/qwen3-4B.sh;
    # Qwen3-1.7B: github.com/mephisto1484/Neko-LoRA-Build-Your-AI-Catgirl Qwen3-1.7B/config.json).
    # head_dim is 128 in all three (not hidden / heads for the 4B). The 1.7B's safetensors also store
    # lm_head (the Hub lists 2.03B parameters) but tie_word_embeddings is true: the model has 1.72B.
    "qwen3-1.7b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                       max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645),
    "qwen3-4b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                     max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                     max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645),
}
# Bytes of saved activations per token, per layer, per hidden unit, without rematerialisation
# (attention and MLP inputs, q/k/v, SwiGLU intermediates, softmax statistics), in units of the
# compute dtype's half (62 -> 62 bytes in bfloat16): XLA kept 62 for the 7B recipe on H100.
ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN = 62
# Bytes kept per attention score for the backward pass: float32 probabilities (softmax's saved
# output) and their compute-dtype copy (the input of the probabilities x values product).
SCORE_BYTES_F32_PROBS = 4


def attention_score_elements(model: ModelConfig, micro_rows: int, group_size: int, prompt_len: int,
                             response_len: int) -> int:
    """Score entries of one layer for `micro_rows` rollouts on one device, with prompts shared:
    each prompt's queries see its own columns once, each response's queries see prompt + response."""
    prompts = micro_rows // math.gcd(group_size, micro_rows)
    return model.num_heads * (prompts * prompt_len**2 + micro_rows * response_len * (prompt_len + response_len))


def layer_params(model: ModelConfig) -> int:
    return (model.num_params - model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2)
            - model.hidden_size) // model.num_layers


def backward_memory(cfg: TrainConfig, model: ModelConfig, micro_rows: int, tensor: int) -> tuple[float, float]:
    """(attention scores, other activations) one micro-batch keeps on a device for the backward pass.

    Scores exist only with materialised attention (`model.attention=xla`; the kernels `auto` picks
    on TPU / GPU and `blockwise` keep O(T) statistics): every layer's without remat, one layer's
    (the one being recomputed) with it. Other activations: without remat every layer keeps ~34
    bytes x hidden per token (bfloat16); `full` keeps only each layer's input, `dots` its matmul
    outputs; both add one layer's working set while it is recomputed.
    """
    c_bytes = 2 if cfg.model.compute_dtype == "bfloat16" else 4
    e, f, layers = model.hidden_size, model.intermediate_size, model.num_layers
    tokens = micro_rows * (cfg.data.max_prompt_len + cfg.rollout.max_new_tokens)
    one_layer = tokens * e * ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN * c_bytes / 2 / tensor
    kept = {"none": 0.0, "full": e * c_bytes,
            "dots": (model.num_heads + 2 * model.num_kv_heads) * model.head_dim * c_bytes + (2 * e + 2 * f) * c_bytes / tensor}
    remat = cfg.model.remat
    activations = layers * one_layer if remat == "none" else layers * tokens * kept[remat] + one_layer
    if remat == "none":  # each layer's weights, cast to the compute dtype (gathered, with FSDP), kept too
        activations += layers * layer_params(model) * c_bytes / tensor
    scores = 0.0
    if cfg.model.attention == "xla":
        per_layer = (attention_score_elements(model, micro_rows, cfg.rollout.group_size, cfg.data.max_prompt_len,
                                              cfg.rollout.max_new_tokens)
                     * (SCORE_BYTES_F32_PROBS + c_bytes) / min(tensor, model.num_heads))
        scores = per_layer * (layers if remat == "none" else 1)
    return scores, activations


def model_config_for(path: str) -> tuple[ModelConfig, str]:
    """The architecture from `path/config.json`, or from the known paper models by folder name."""
    path = str(builtin.model_folder(path, build=False))
    config_file = pathlib.Path(path) / "config.json"
    if config_file.is_file():
        return ModelConfig.from_hf(json.loads(config_file.read_text())), str(config_file)
    name = pathlib.Path(path).name.lower()
    if name in KNOWN_ARCHITECTURES:
        return ModelConfig.from_hf(KNOWN_ARCHITECTURES[name]), f"built-in architecture of {pathlib.Path(path).name}"
    raise FileNotFoundError(f"model.path={path}: no config.json there, and not one of {sorted(KNOWN_ARCHITECTURES)}")


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def planned_devices(cfg: TrainConfig) -> int:
    """The mesh's own device count when it names every axis, else this machine's."""
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    return sizes[0] * sizes[1] * sizes[2] if -1 not in sizes else jax.device_count()


def dry_run(cfg: TrainConfig, num_devices: int | None = None) -> str:
    num_devices = num_devices or planned_devices(cfg)
    data, fsdp, tensor = cfg.mesh.shape(num_devices)
    batch_devices = cfg.mesh.batch_devices(num_devices)
    cfg.validate(num_batch_devices=batch_devices)
    model, source = model_config_for(cfg.model.path)

    rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    micro_rows = cfg.micro_batch_rollouts(batch_devices)
    seq = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    p_bytes = 2 if cfg.model.param_dtype == "bfloat16" else 4
    c_bytes = 2 if cfg.model.compute_dtype == "bfloat16" else 4
    n_params = model.num_params
    param_shards = fsdp * tensor
    params = n_params * p_bytes / param_shards
    # LoRA: the optimizer, the gradients and the reference (adapters off) are the adapters' size
    # (float32); the base is frozen.
    spec = cfg.lora.spec()
    trainable = adapter_count(model, spec) * 4 / param_shards if spec else params
    adam = 2 * trainable
    grads = trainable
    reference = trainable if cfg.algo.kl_coef else 0.0
    micro_per_device = max(micro_rows // batch_devices, 1)
    scores, activations = backward_memory(cfg, model, micro_per_device, tensor)
    rows_per_device = rows // batch_devices
    sample_rows_per_device = cfg.prompts_in_slots(batch_devices) * cfg.rollout.group_size // batch_devices
    kv_cache = (2 * model.num_layers * model.num_kv_heads * model.head_dim * seq * sample_rows_per_device * c_bytes
                / min(tensor, model.num_kv_heads))
    # FSDP gathers the embedding / output tables whole for the step, and each layer's weights in
    # turn; their gradients exist unsplit before they are reduced.
    tables = model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2) * p_bytes / tensor
    gathered = 2 * (tables + layer_params(model) * p_bytes / tensor) if fsdp > 1 else 0.0
    # The rollout copy of the policy (`sample.decode_params`: compute dtype, whole along fsdp, split
    # by tensor) stays from one step's sampling to the next: beside the update too. (Parameters
    # already in that dtype and layout are their own copy: counted anyway, an upper bound.)
    rollout_copy = n_params * c_bytes / tensor
    # The engine prefills prompts a chunk at a time into a ring of two chunks per device (`engine.Prompts`).
    slots_per_device = sample_rows_per_device
    chunk = min(-(-slots_per_device // cfg.rollout.group_size), max(cfg.rollout.prompts_per_step // batch_devices, 1))
    prompt_ring = kv_cache * cfg.data.max_prompt_len / seq * 2 * chunk / max(slots_per_device, 1)
    lora = trainable if spec else 0.0
    update = params + lora + adam + grads + reference + gathered + activations + scores + rollout_copy
    sampler = params + lora + adam + reference + rollout_copy + kv_cache + prompt_ring

    lines = [
        "# resolved config", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "",
        "# plan",
        f"model: {model.family}, {n_params / 1e9:.3f}B parameters ({source})",
        f"mesh: data={data} x fsdp={fsdp} x tensor={tensor} over {num_devices} device(s)",
        f"step: {cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} = {rows} rollouts of up to "
        f"{seq} tokens; {rows_per_device} rollouts ({rows_per_device // cfg.rollout.group_size} whole groups) per device",
        f"updates per step: {cfg.algo.ppo_epochs} epoch(s) x {cfg.rollout.prompts_per_step // cfg.mini_batch_prompts} "
        f"mini-batches; micro-batch {micro_rows} rollouts = {micro_per_device} per device; log-prob passes "
        f"{cfg.logprob_micro_batch_rollouts(batch_devices) // batch_devices} per device per slice",
        "estimated memory per device:",
        f"  parameters            {_gb(params)}" + (f"  (frozen) + LoRA adapters {_gb(trainable)}" if spec else ""),
        f"  AdamW moments         {_gb(adam)}",
        f"  gradient accumulator  {_gb(grads)}",
        f"  reference policy      {_gb(reference)}" + ("" if cfg.algo.kl_coef else "  (kl_coef = 0: none)"),
        f"  attention scores kept (1 micro-batch)  {_gb(scores)}  (model.attention={cfg.model.attention})",
        f"  other activations (1 micro-batch)      {_gb(activations)}  (model.remat={cfg.model.remat})",
        f"  gathered weights + their unsplit gradients (FSDP)  {_gb(gathered)}",
        f"  rollout copy of the policy  {_gb(rollout_copy)}  (compute dtype, not split by fsdp; kept between steps)",
        f"  sampler KV cache      {_gb(kv_cache)}  ({sample_rows_per_device} decode slots per device)",
        f"  sampler prompt keys   {_gb(prompt_ring)}  (2 chunks of {chunk} prompts per device)",
        f"  update  (state, gradients, gathered weights, activations, rollout copy)  {_gb(update)}",
        f"  sampler (state, rollout copy, KV cache, prompt keys)                      {_gb(sampler)}",
        "a shape estimate; XLA's own figures per device (update, log-prob pass, sampler) for a target:",
        "  ktae-train <these configs> --compile-only --target NAME  (e.g. v5p-128, h100x8; see README)",
    ]
    return "\n".join(lines)

