"""The policy's weights as a run holds them: what trains and what stays frozen (full fine-tuning,
or LoRA adapters on a frozen base), and what each consumer reads.

  update / checkpoints   the trainable part only (`step.split_policy`): the adapters under LoRA;
                         on CPU (unrolled layer stack) without LoRA held per layer between steps
                         (`held`), stacked in checkpoints (`stored`)
  reference policy       full fine-tuning: a copy of the initial weights; LoRA: the frozen base
                         itself, read with the adapters switched off (A = B = 0: the update
                         s (x A) B is exactly 0), so no copy of the base exists
  sampler                a copy in the compute dtype without the FSDP split; under LoRA with the
                         adapters folded into the weights (W + s A B: decoding costs what the
                         base's does)
  export                 Hugging Face folders: the (folded) full weights, and under LoRA also the
                         adapters alone in PEFT's layout

Why the reference is "adapters off" rather than "the adapters' initial values (B = 0)": both
give the base's function, but the initial adapters would have to be kept and checkpointed for
the run's life (the update overwrites them), while zeros are made on the fly, of the adapters'
(small) size, and do not depend on the initialisation.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ktae_jax import mesh as mesh_lib
from ktae_jax.models import lora as lora_lib
from ktae_jax.models.lora import LoraSpec
from ktae_jax.models.transformer import LayerList, is_stacked_path, stack_layers, unstack_layers
from ktae_jax.sample import cast_floating
from ktae_jax.step import split_policy


def _respec(sharding, change):
    """`sharding` with its partition spec changed by `change` (a tuple -> a tuple); a sharding without
    a spec (one device) as it is."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*change(tuple(sharding.spec))))


class PolicyWeights:
    """`model`'s graph split into trainable and frozen parameters; with `lora`, adapters are
    added first (on `mesh`, from `seed`). `frozen` is held here; the trainable part is the train
    state's (`params` arguments below)."""

    def __init__(self, model: nnx.Module, lora: LoraSpec | None, *, seed: int, mesh, compute_dtype):
        if lora is not None:
            lora_lib.add_adapters(model, lora, seed=seed, mesh=mesh)
        self.lora, self.mesh, self.compute_dtype = lora, mesh, jnp.dtype(compute_dtype)
        self.graphdef, self.initial, self.frozen = split_policy(model)
        # The sampler's graph: without adapters (folded into the weights) under LoRA.
        self.sample_graphdef = (lora_lib.folded_graphdef(self.graphdef, self.initial, self.frozen) if lora
                                else self.graphdef)
        self._copy = self._fold = None
        # Full fine-tuning on the unrolled layer stack (CPU): the train state and the reference per layer.
        self.per_layer = not model.options.scan_layers and lora is None
        self._stack: dict[Any, Any] = {}  # jitted `stored`, per tree structure

    def reference(self, params: nnx.State) -> nnx.State:
        """The trainable part of the frozen reference policy (see the module docstring). A copy,
        not the same buffers: the update donates (overwrites) the policy's. With the layer stack
        unrolled (CPU), each layer's weights are copied out once (`unstack_layers`): the reference
        never changes, so its log-prob pass need not copy them out again at every call."""
        if self.lora is not None:
            return jax.tree.map(jnp.zeros_like, params)
        return unstack_layers(params) if self.per_layer else jax.tree.map(jnp.copy, params)

    def held(self, state: Any) -> Any:
        """`state` (the train state, or any tree with the trainable parameters' layout) as checkpoints
        store it -> as the run holds it between steps. Full fine-tuning on the unrolled layer stack
        (CPU): each stacked weight, and each optimizer moment of one, as per-layer arrays
        (`LayerList`). XLA on CPU copies a layer's weights out of a stacked array at every use and
        concatenates the layers' gradients into one; held per layer, the update reads and writes
        them where they are (bench_step's 28M update: 530 vs 567 ms fastest, 557 vs 633 median,
        the same loss). Otherwise `state` itself."""
        if not self.per_layer:
            return state
        def sharding(path, x):
            if not is_stacked_path(path):
                return x.sharding
            return LayerList([_respec(x.sharding, lambda spec: spec[1:])] * x.shape[0])
        return jax.jit(unstack_layers, out_shardings=jax.tree.map_with_path(sharding, state))(state)

    def stored(self, state: Any) -> Any:
        """The inverse of `held`: `state` with its layer weights stacked, as checkpoints and Hugging
        Face exports take them (a copy when held per layer, else `state` itself)."""
        if not self.per_layer:
            return state
        treedef = jax.tree.structure(state)
        if treedef not in self._stack:  # compiled once per structure (a save every N steps)
            self._stack[treedef] = jax.jit(stack_layers, out_shardings=self.stored_shardings(state))
        return self._stack[treedef](state)

    def stored_shardings(self, state: Any) -> Any:
        """The shardings of `stored(state)`: a layer list's stack takes its arrays' layout after the
        (never split) layer axis."""
        def sharding(x):
            if not isinstance(x, LayerList):
                return x.sharding
            return _respec(x.arrays[0].sharding, lambda spec: (None, *spec))
        return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, LayerList))

    def stored_abstract(self, state: Any) -> Any:
        """`stored(state)`'s shapes, dtypes and shardings, without computing it (checkpoint restore)."""
        shapes = jax.eval_shape(stack_layers, state)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                            self.stored_shardings(state))

    def full_state(self, params: nnx.State) -> nnx.State:
        """The policy's whole state for `sample_graphdef` (folded under LoRA), in the parameters' dtype."""
        if self.lora is None:
            return nnx.merge_state(params, self.frozen)
        if self._fold is None:  # one jitted function: a new one per call would compile at every evaluation
            self._fold = jax.jit(lambda p, f: lora_lib.folded_state(self.graphdef, p, f))
        return self._fold(params, self.frozen)

    def rollout_copy(self, params: nnx.State) -> nnx.State:
        """The sampler's copy under LoRA: the folded weights cast to the compute dtype, laid out for
        decoding (`mesh.decode_shardings`), in one jitted program (no full-size intermediate kept)."""
        if self._copy is None:
            fold = lambda p, f: cast_floating(lora_lib.folded_state(self.graphdef, p, f), self.compute_dtype)  # noqa: E731
            abstract = jax.eval_shape(fold, params, self.frozen)
            out = None if self.mesh is None else mesh_lib.decode_shardings(abstract, self.mesh)
            self._copy = jax.jit(fold, out_shardings=out)
        return self._copy(params, self.frozen)

    def export(self, params: nnx.State, tokenizer: Any, out_dir: pathlib.Path, *, base_model: str = "",
               write: bool = True) -> list[pathlib.Path]:
        """The policy in Hugging Face format at `out_dir` (the folded full weights); under LoRA also
        the adapters in PEFT's layout at `out_dir`_adapter. Gathered by every process; written when
        `write` (process 0)."""
        from ktae_jax.models import save_pretrained

        host = mesh_lib.to_host((params, self.frozen))
        model = nnx.merge(self.graphdef, *host)
        written = [out_dir]
        if self.lora is not None:
            adapter_dir = out_dir.with_name(out_dir.name + "_adapter")
            if write:
                lora_lib.save_peft_adapter(model, adapter_dir, base_model=base_model)
            written.append(adapter_dir)
            model = lora_lib.fold_adapters(model)
        if write:
            save_pretrained(model, tokenizer, out_dir)
        return written
