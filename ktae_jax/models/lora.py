"""Low-rank adapters (LoRA) on the decoder's projections, folded into the weights, and exported
in the layout of Hugging Face PEFT.

An adapted projection with weight W [in, out] computes  y = x W + s (x A) B,  s = alpha / r, with
A [in, r] and B [r, out]. A starts uniform in +-1/sqrt(in) (PEFT's default, Kaiming-uniform with
a = sqrt(5)) and B at 0, so a fresh adapter leaves the model unchanged. The adapters are
`nnx.LoRAParam` variables (a subclass of `nnx.Param`): `step.split_policy` trains them alone and
keeps the base weights frozen. They are stacked like the weights they adapt ([L, in, r],
[L, r, out], attributes `<name>_lora_a` / `<name>_lora_b` of the layer's `Attention` / `MLP`), so
the layer scan carries them with the rest of a layer; the transformer adds the update where an
adapter exists (`transformer._adapted`). They are kept in float32 whatever the base's dtype (the
optimizer updates them; the base can stay in bfloat16).

Why not qwix (0.1.8, the LoRA provider Tunix uses): checked on these models, it cannot create the
adapters. Its provider intercepts `jax.lax.dot_general` / `jnp.dot` / `jnp.einsum` (not `x @ w`,
which our projections use) and creates each adapter lazily, during a first traced call, as an
attribute of the module found on the Python call stack. Our layers are stacked and run through
`nnx.merge` of a per-layer slice (scanned or unrolled, `transformer._run_layers`), so that module
is a temporary copy: with `jnp.dot` projections, the scanned stack fails at creation
(`TraceContextError: Cannot mutate RngCount from a different trace level`: its RNG is drawn
inside the scan) and the unrolled one silently creates nothing (the adapters land on the discarded
copies). Its `rngs` attribute, set on every module, also enters the stacked layer state that the
scan slices (an `IndexError` on a 0-d RNG count). With the adapters created here, qwix would only
add its two `dot_general`s per projection (and global monkey-patching of jax while tracing); the
PEFT export and the folding are ours either way.

Targets are named as in Hugging Face / PEFT (`q_proj`, ..., `down_proj`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktae_jax.models.safetensors_io import write_safetensors

# PEFT target name -> (sub-module of the layer, our weight's name, how many leading axes of the
# per-layer weight are its input)
TARGETS: dict[str, tuple[str, str, int]] = {
    "q_proj": ("attn", "q", 1), "k_proj": ("attn", "k", 1), "v_proj": ("attn", "v", 1), "o_proj": ("attn", "o", 2),
    "gate_proj": ("mlp", "gate", 1), "up_proj": ("mlp", "up", 1), "down_proj": ("mlp", "down", 1),
}
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}
ADAPTER_DTYPE = jnp.float32


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {unknown or '[]'}: expected some of {list(TARGETS)}")
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"LoRA rank {self.rank} / alpha {self.alpha}: need rank >= 1 and alpha > 0")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def adapter_count(config, spec: LoraSpec) -> int:
    """How many adapter parameters `spec` adds to a model of `config` (a `ModelConfig`)."""
    e, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    sizes = {"q_proj": (e, q), "k_proj": (e, kv), "v_proj": (e, kv), "o_proj": (q, e),
             "gate_proj": (e, f), "up_proj": (e, f), "down_proj": (f, e)}
    return config.num_layers * spec.rank * sum(sum(sizes[t]) for t in spec.targets)


def _sub(model, part: str):
    return getattr(model.layers, part)


def _axes(var: nnx.Variable) -> tuple:
    return tuple(var.get_metadata().get("logical_axes") or (None,) * len(var.shape))


def add_adapters(model, spec: LoraSpec, *, seed: int = 0, mesh=None):
    """Adds `spec`'s adapters to `model` in place (placed on `mesh` by their logical axes: A split
    like W's input axis, B like W's output axis); returns the model. Works on an abstract model
    (`nnx.eval_shape`) too."""
    from ktae_jax import mesh as mesh_lib

    key = jax.random.PRNGKey(seed)
    for i, target in enumerate(spec.targets):
        part, name, n_in = TARGETS[target]
        module = _sub(model, part)
        w = getattr(module, name)
        layers, *dims = w.shape
        fan_in, fan_out = math.prod(dims[:n_in]), math.prod(dims[n_in:])
        names = _axes(w)
        a_axes, b_axes = (names[0], names[1], None), (names[0], None, names[1 + n_in])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (layers, fan_in, spec.rank), ADAPTER_DTYPE, -bound, bound)
        b = jnp.zeros((layers, spec.rank, fan_out), ADAPTER_DTYPE)
        if mesh is not None:
            a = jax.device_put(a, mesh_lib.logical_sharding(a_axes, mesh, a.shape))
            b = jax.device_put(b, mesh_lib.logical_sharding(b_axes, mesh, b.shape))
        setattr(module, f"{name}_lora_a", nnx.LoRAParam(a, logical_axes=a_axes))
        setattr(module, f"{name}_lora_b", nnx.LoRAParam(b, logical_axes=b_axes))
        module.lora_scale = spec.scale  # static (graphdef): the same for every projection of a model
    return model


def has_adapters(model) -> bool:
    return bool(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def _adapted(model):
    """(part, name, module) of every projection that carries an adapter."""
    for target, (part, name, _) in TARGETS.items():
        module = _sub(model, part)
        if getattr(module, f"{name}_lora_a", None) is not None:
            yield target, name, module


def fold_adapters(model):
    """`model` without adapters, in place: each adapted W becomes W + s A B (in W's dtype); returns
    it. The folded model computes the adapted model's function as one matmul per projection."""
    modules = []
    for _, name, module in list(_adapted(model)):
        modules.append(module)
        w = getattr(module, name)
        a, b = getattr(module, f"{name}_lora_a")[...], getattr(module, f"{name}_lora_b")[...]
        delta = jnp.einsum("lir,lro->lio", a, b, preferred_element_type=jnp.float32) * module.lora_scale
        # set_value, not w[...] =: the weights may be read-only host arrays (an export's)
        w.set_value((jnp.asarray(w[...], jnp.float32) + delta.reshape(w.shape)).astype(w.dtype))
        delattr(module, f"{name}_lora_a")
        delattr(module, f"{name}_lora_b")
    for module in {id(m): m for m in modules}.values():
        del module.lora_scale
    return model


def folded_graphdef(graphdef, *states) -> nnx.GraphDef:
    """The graphdef of the folded model (no adapters), from the adapted model's (abstract) states."""
    return nnx.graphdef(nnx.eval_shape(lambda *s: fold_adapters(nnx.merge(graphdef, *s, copy=True)), *states))


def folded_state(graphdef, *states) -> nnx.State:
    """The folded model's state (`fold_adapters`) as a pure function of the adapted model's states (jit it)."""
    return nnx.state(fold_adapters(nnx.merge(graphdef, *states, copy=True)))


# ---------------------------------------------------------------------------------------------- PEFT
def peft_tensors(model) -> dict[str, np.ndarray]:
    """The adapters as PEFT names them (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`:
    A as [r, in], B as [out, r], torch Linear's [out, in] convention), float32 host arrays."""
    out = {}
    for target, name, module in _adapted(model):
        a = np.asarray(jax.device_get(getattr(module, f"{name}_lora_a")[...]), np.float32)
        b = np.asarray(jax.device_get(getattr(module, f"{name}_lora_b")[...]), np.float32)
        prefix = f"base_model.model.model.layers.{{}}.{_HF_MODULE[TARGETS[target][0]]}.{target}"
        for layer in range(a.shape[0]):
            out[prefix.format(layer) + ".lora_A.weight"] = np.ascontiguousarray(a[layer].T)
            out[prefix.format(layer) + ".lora_B.weight"] = np.ascontiguousarray(b[layer].T)
    return out


def save_peft_adapter(model, out_dir: str | pathlib.Path, *, base_model: str = "") -> pathlib.Path:
    """`adapter_config.json` + `adapter_model.safetensors` in `out_dir`, loadable by PEFT
    (`PeftModel.from_pretrained(base, out_dir)`) and vLLM's LoRA support; `base_model` is recorded
    as `base_model_name_or_path`."""
    targets = [t for t, _, _ in _adapted(model)]
    if not targets:
        raise ValueError("the model has no LoRA adapters to export")
    module = _sub(model, TARGETS[targets[0]][0])
    rank = getattr(module, f"{TARGETS[targets[0]][1]}_lora_a").shape[-1]
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": int(rank), "lora_alpha": float(module.lora_scale * rank), "target_modules": targets,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(out_dir / "adapter_model.safetensors", peft_tensors(model), metadata={"format": "pt"})
    return out_dir
