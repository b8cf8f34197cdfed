"""`ktae-train --compile-only --target NAME`: will this run fit? The compiler's answer, ahead of time.

The pure programs a run uses are compiled for the target's abstract devices (`hardware.target`)
at the config's shapes, from abstract parameters and optimizer state laid out exactly as a real
run lays them out (no weights are read, no device is touched):

  update    `step.train_step`: every mini-batch update of one step, state donated
  logprobs  `step.rollout_logprobs`: the old-policy / reference log-prob pass over the step
  sampler   `sample.sample_jit`: prefill and decode of one sampler call

Per program, XLA's memory analysis per device: arguments, outputs, temporaries, peak. What else
is alive on the device while it runs (the run's state that is not one of its arguments: the
optimizer state during sampling, the frozen reference policy, ...) is added as `resident_bytes`:
a program fits when peak + resident <= the device's usable memory (see `hardware`).
A plan whose arguments alone cannot fit is refused without compiling (the arguments are exact:
their shapes and shardings are known); a TPU compile that runs out of HBM is a refusal too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ktae_jax import hardware
from ktae_jax import mesh as mesh_lib
from ktae_jax.config import TrainConfig
from ktae_jax.models.lora import add_adapters, folded_graphdef, folded_state
from ktae_jax.sample import sample_jit
from ktae_jax.step import (TrainState, UpdateBatch, UpdateSettings, make_optimizer, optimizer_shardings,
                           rollout_logprobs, split_policy, train_step)

GiB = 2**30


class CompileError(RuntimeError):
    """A program failed to compile for the target for a reason other than its memory."""
PROGRAMS = ("update", "logprobs", "sampler")


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded abstract (or concrete) arrays."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def plan_mesh(cfg: TrainConfig, target: hardware.Target):
    """The run's mesh over the target's devices; a size mismatch names both."""
    n = len(target.devices)
    sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if (-1 not in sizes.values() and fixed != n) or n % fixed:
        spelled = " x ".join(f"{k}={v}" for k, v in sizes.items())
        raise hardware.TargetError(f"the mesh ({spelled}) needs {'a multiple of ' if -1 in sizes.values() else ''}"
                                   f"{fixed} devices, but target {target.name} has {n}")
    return mesh_lib.make_mesh(cfg.mesh, list(target.devices))


@dataclasses.dataclass(frozen=True)
class AbstractRun:
    """What a run holds on the devices, as sharded ShapeDtypeStructs."""

    graphdef: Any
    state: TrainState
    frozen: Any  # the parameters that do not train (`step.split_policy`; empty for full fine-tuning)
    sample_graphdef: Any  # the sampler's graph (LoRA: the adapters folded into the weights)
    tx: Any
    has_reference: bool  # kl_coef > 0: a frozen copy of the parameters stays on the devices


def abstract_run(cfg: TrainConfig, mesh) -> AbstractRun:
    from ktae_jax.models import init_random
    from ktae_jax.plan import model_config_for

    model_cfg, _ = model_config_for(cfg.model.path)
    dtype, compute = jnp.dtype(cfg.model.param_dtype), jnp.dtype(cfg.model.compute_dtype)
    options = cfg.model.options(mesh)  # the target's attention kernel, placed on its mesh, as a run there
    spec = cfg.lora.spec()
    model = nnx.eval_shape(lambda: _with_adapters(init_random(model_cfg, dtype=dtype, compute_dtype=compute,
                                                              options=options), spec))
    graphdef, params, frozen = split_policy(model)
    sample_graphdef = folded_graphdef(graphdef, params, frozen) if spec else graphdef
    placed = lambda tree: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),  # noqa: E731
                                       tree, mesh_lib.state_shardings(tree, mesh))
    params, frozen = placed(params), placed(frozen)
    tx = make_optimizer(cfg.optim)
    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       jax.eval_shape(tx.init, params), optimizer_shardings(tx, params, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = TrainState(params=params, opt_state=opt, step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))
    return AbstractRun(graphdef, state, frozen, sample_graphdef, tx, cfg.algo.kl_coef > 0)


def _with_adapters(model, spec):
    return add_adapters(model, spec) if spec else model


def _rows(cfg: TrainConfig, mesh, n: int, width: int, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((n, width), dtype, sharding=mesh_lib.batch_sharding(mesh, (n, width)))


def program_inputs(cfg: TrainConfig, mesh, run: AbstractRun) -> dict[str, tuple[Any, tuple, int]]:
    """Per program: (its `lower`, abstract arguments, bytes of the run's state alive beside them)."""
    batch_devices = mesh_lib.batch_devices(mesh)
    r = cfg.rollout
    n, tp, resp = r.prompts_per_step * r.group_size, cfg.data.max_prompt_len, r.max_new_tokens
    settings = UpdateSettings.for_config(cfg, batch_devices)  # as the trainer builds them
    params_bytes = per_device_bytes(run.state.params)
    state_bytes = per_device_bytes(run.state)
    reference = params_bytes if run.has_reference else 0
    donate = () if mesh.devices.flat[0].platform == "cpu" else (0,)  # as the trainer does
    update = jax.jit(functools.partial(train_step, graphdef=run.graphdef, tx=run.tx, settings=settings, mesh=mesh),
                     out_shardings=(jax.tree.map(lambda x: x.sharding, run.state), None), donate_argnums=donate)
    f32, i32 = jnp.float32, jnp.int32
    batch = UpdateBatch(_rows(cfg, mesh, n, tp + resp, i32), _rows(cfg, mesh, n, tp + resp, i32),
                        _rows(cfg, mesh, n, resp, i32), *(_rows(cfg, mesh, n, resp, f32) for _ in range(3)))
    layout = settings.logprob_layout(cfg, mesh)
    logprobs = jax.jit(lambda params, tokens, attn, frozen: rollout_logprobs(
        run.graphdef, params, tokens, attn, response_len=resp, temperature=r.temperature, layout=layout, mesh=mesh,
        frozen=frozen))
    # The trainer samples a step's prompts in one call on `sample_prompts_per_device` x G decode
    # slots per device, from the rollout copy of the policy (compute dtype, no FSDP split).
    prompts = r.prompts_per_step
    sampling = cfg.to_sampling(stop_ids=(0,), pad_id=0, batch_devices=batch_devices)  # the ids don't change shapes
    compute = jnp.dtype(cfg.model.compute_dtype)
    # LoRA: the sampler reads the base with the adapters folded in (`adapters.PolicyWeights.rollout_copy`).
    whole = (jax.eval_shape(lambda p, f: folded_state(run.graphdef, p, f), run.state.params, run.frozen)
             if run.sample_graphdef is not run.graphdef else run.state.params)
    rollout_copy = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, compute if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
                                          sharding=s), whole, mesh_lib.decode_shardings(whole, mesh))
    sampler = functools.partial(sample_jit.lower, run.sample_graphdef, config=sampling, mesh=mesh)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, PartitionSpec()))
    # Alive beside each program: the update: the reference and the rollout copy (the trainer keeps
    # it until the next step's sampling); a log-prob pass (on the policy or on the reference): the
    # optimizer state, the other parameter copy, the rollout copy, the rollouts; the sampler: the
    # training state (parameters and optimizer state), the frozen parameters and the reference.
    # The rollout copy is counted even where the parameters are their own copy (`decode_params`).
    rollouts = per_device_bytes(batch[2:])
    copy = per_device_bytes(rollout_copy)
    return {
        "update": (update.lower, (run.state, batch, run.frozen), reference + copy),
        "logprobs": (logprobs.lower, (run.state.params, batch[0], batch[1], run.frozen),
                     state_bytes - params_bytes + reference + copy + rollouts),
        "sampler": (sampler, (rollout_copy, _rows(cfg, mesh, prompts, tp, i32), _rows(cfg, mesh, prompts, tp, i32), key),
                    state_bytes + per_device_bytes(run.frozen) + reference),
    }


def compile_program(lower, args: tuple, resident: int, usable: int) -> dict[str, Any]:
    """XLA's figures for one program, and whether it fits beside `resident` bytes in `usable`."""
    arguments = per_device_bytes(args)
    result = {"argument_bytes": arguments, "output_bytes": 0, "alias_bytes": 0, "temp_bytes": 0,
              "peak_bytes": arguments, "resident_bytes": resident, "flops": None, "compile_s": 0.0,
              "compiled": False, "reason": ""}
    if arguments + resident > usable:
        result["reason"] = (f"its arguments ({arguments / GiB:.2f} GiB) and the state alive beside them "
                            f"({resident / GiB:.2f} GiB) exceed the usable {usable / GiB:.2f} GiB before any "
                            f"activation: not compiled (peak_bytes is a lower bound)")
        return _verdict(result, usable)
    start = time.perf_counter()
    try:
        compiled = lower(*args).compile()
    except Exception as err:  # noqa: BLE001
        if "RESOURCE_EXHAUSTED" not in str(err):  # not a verdict: the program cannot be built at all
            raise CompileError(f"{type(err).__name__}: {str(err).strip().splitlines()[0][:500]}") from err
        required, _ = hardware.parse_hbm_message(str(err))  # the TPU compiler refuses what cannot fit
        result.update(compile_s=round(time.perf_counter() - start, 1),
                      peak_bytes=max(arguments, required or 0), compiled=True,
                      reason="the compiler ran out of memory: " + str(err).splitlines()[0][:300])
        result["fits"] = False
        return _total(result)
    result["compile_s"] = round(time.perf_counter() - start, 1)
    result["compiled"] = True
    stats = compiled.memory_analysis()
    result.update(argument_bytes=stats.argument_size_in_bytes, output_bytes=stats.output_size_in_bytes,
                  alias_bytes=stats.alias_size_in_bytes, temp_bytes=stats.temp_size_in_bytes)
    derived = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
               + stats.temp_size_in_bytes)
    result["peak_bytes"] = int(getattr(stats, "peak_memory_in_bytes", 0) or derived)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if isinstance(cost, dict) and cost.get("flops") is not None:
        result["flops"] = float(cost["flops"])
    return _verdict(result, usable)


def _total(result: dict[str, Any]) -> dict[str, Any]:
    result["total_bytes"] = result["peak_bytes"] + result["resident_bytes"]
    return result


def _verdict(result: dict[str, Any], usable: int) -> dict[str, Any]:
    _total(result)
    result["fits"] = result["total_bytes"] <= usable
    if not result["fits"] and not result["reason"]:
        result["reason"] = (f"peak {result['peak_bytes'] / GiB:.2f} GiB + resident {result['resident_bytes'] / GiB:.2f} "
                            f"GiB > usable {usable / GiB:.2f} GiB")
    return result


def compile_only(cfg: TrainConfig, target_name: str, programs: tuple[str, ...] = PROGRAMS) -> dict[str, Any]:
    """The report (`--json`'s object): target, devices, usable bytes, per-program figures, verdict."""
    target = hardware.target(target_name)
    mesh = plan_mesh(cfg, target)
    cfg.validate(num_batch_devices=mesh_lib.batch_devices(mesh))
    run = abstract_run(cfg, mesh)
    inputs = program_inputs(cfg, mesh, run)
    results = {}
    for name in programs:
        try:
            results[name] = compile_program(*inputs[name], target.usable_bytes)
        except CompileError as err:
            raise CompileError(f"the {name} program does not compile for {target.name}: {err}") from None
    return {"target": target.name, "devices": len(target.devices), "usable_bytes": target.usable_bytes,
            "fits": all(p["fits"] for p in results.values()), "programs": results,
            "description": target.description, "memory_note": target.memory_note,
            "model": model_summary(cfg, target.platform, _model_config(cfg)),
            "mesh": dict(zip(mesh.axis_names, map(int, mesh.devices.shape))),
            "state_bytes": per_device_bytes(run.state), "frozen_bytes": per_device_bytes(run.frozen)}


def _model_config(cfg: TrainConfig):
    from ktae_jax.plan import model_config_for

    return model_config_for(cfg.model.path)[0]


def model_summary(cfg: TrainConfig, platform: str, model_cfg=None) -> str:
    """How the compiled model computes: attention kernel (as `auto` resolves on the target for this
    model: sliding-window layers (Gemma 3) keep TPU off the splash kernel), remat."""
    from ktae_jax.models.attention import resolve

    seq = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    windowed = model_cfg is not None and model_cfg.layer_windows() is not None
    softcap = model_cfg is not None and model_cfg.attn_logit_softcapping is not None
    attention = resolve(cfg.model.attention, platform, seq, seq, jnp.dtype(cfg.model.compute_dtype),
                        windowed=windowed, softcap=softcap)
    note = ""
    scanned = cfg.model.scan_layers if cfg.model.scan_layers is not None else platform != "cpu"
    if cfg.model.attention == "auto" and platform == "gpu" and attention != "cudnn":
        note = " (no cuDNN on this machine; a GPU with cuDNN runs its fused kernel)"
    return (f"attention {attention}{'' if cfg.model.attention != 'auto' else ' (auto)'}{note}, "
            f"remat {cfg.model.remat}, {'scanned' if scanned else 'unrolled'} layers, "
            f"parameters {cfg.model.param_dtype}, compute {cfg.model.compute_dtype}")


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table `--compile-only` prints."""
    usable = report["usable_bytes"]
    mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
    lines = [f"target {report['target']}: {report['description']}; mesh {mesh}",
             f"model: {report['model']}",
             f"usable per device: {usable / GiB:.2f} GiB ({report['memory_note']}); run state per device "
             f"(trainable parameters, optimizer, step, key): {report['state_bytes'] / GiB:.2f} GiB"
             + (f"; frozen parameters (the LoRA base): {report['frozen_bytes'] / GiB:.2f} GiB"
                if report.get("frozen_bytes") else ""),
             f"{'program':<9} {'arguments':>10} {'temporaries':>12} {'peak':>9} {'resident':>9} {'total':>9} "
             f"{'spare':>6} {'TFLOP':>8} {'compile':>8}  verdict"]
    for name, p in report["programs"].items():
        spare = 1 - p["total_bytes"] / usable
        flops = f"{p['flops'] / 1e12:8.1f}" if p["flops"] is not None else f"{'-':>8}"
        compile_s = f"{p['compile_s']:7.1f}s" if p["compiled"] else f"{'skipped':>8}"
        gib = lambda key: _size(p[key])  # noqa: E731
        lines.append(f"{name:<9} {gib('argument_bytes'):>10} {gib('temp_bytes'):>12} {gib('peak_bytes'):>9} "
                     f"{gib('resident_bytes'):>9} {gib('total_bytes'):>9} {spare:6.0%} {flops} {compile_s}  "
                     f"{'fits' if p['fits'] else 'DOES NOT FIT: ' + p['reason']}")
    if any(p["flops"] for p in report["programs"].values()):
        lines.append("TFLOP: XLA's count, which takes a loop's body once (scanned layers, micro-batches, decode steps)")
    lines.append(f"verdict: {'fits' if report['fits'] else 'does not fit'} on {report['target']}")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / GiB:.2f}G" if n >= GiB / 10 else f"{n / 2**20:.1f}M"


JSON_KEYS = ("target", "devices", "usable_bytes", "fits", "programs")


def to_json(report: dict[str, Any]) -> str:
    """`--json`'s one line: exactly the issue's top-level keys (the table has the rest)."""
    return json.dumps({key: report[key] for key in JSON_KEYS}, separators=(",", ":"))
