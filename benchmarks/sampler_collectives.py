"""Collective bytes of one decode step of the 7B recipe on one 8-GPU host, compile-only, from XLA's HLO.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/sampler_collectives.py [--config configs/paper/grpo_7b.yaml]
        [--mesh configs/mesh/gpu_1x8.yaml] [--slots-per-device N] [--cache-len L]

One decode iteration of the engine (`engine._iteration`: choose, one forward of every slot, the
refill with its prefill of the next chunk of prompts) is compiled for 8 abstract H100s (`../shared/aot/h100_sxm.txtpb`, jax-cuda12-plugin,
no GPU needed) from abstract parameters, twice:
  before   the training parameters as the sampler read them until now (param dtype, FSDP-sharded)
  after    the rollout copy (`sample.decode_params`: compute dtype, `mesh.decode_shardings`)
and the bytes moved by its collectives (all-gather, all-reduce, reduce-scatter, all-to-all,
collective-permute: the size of each result, times the known trip count of the loops around it,
so once per layer inside the layer scan) are summed from the
optimized HLO of three programs compiled apart: the step without its refill (run every step),
the refill (run when a row finishes and another waits: the copy of the entering rows' prompt
keys, and the prefill of the next chunk of prompts when a waiting row needs it) and that chunk
prefill alone (once per chunk of prompts).
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGET = ROOT.parent / "shared" / "aot" / "h100_sxm.txtpb"
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def h100_mesh(cfg):
    import jax
    import numpy as np
    from jax.experimental import topologies

    from ktae_jax.mesh import make_mesh

    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x8", target_config=TARGET.read_text())
    devices = list(np.array(topo.devices).reshape(-1))
    return make_mesh(cfg.mesh, devices), jax


def _repeats(hlo: str) -> dict[str, int]:
    """How many times each computation runs per call of the program: a while loop's body its known
    trip count times its caller's (the layer scan: once per layer), any other callee as its caller."""
    calls: dict[str, list[tuple[str, int]]] = {}  # callee -> [(caller, factor)]
    current, entry = "", ""
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(2)
            entry = current if head.group(1) else entry
            continue
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        body = re.search(r"body=%?([\w.\-]+)", line)
        for name in re.findall(r"(?:condition|body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)", line):
            calls.setdefault(name, []).append((current, int(trips.group(1)) if trips and body and name == body.group(1) else 1))
        for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
            for name in re.findall(r"%?([\w.\-]+)", group):
                calls.setdefault(name, []).append((current, 1))
    memo = {entry: 1}

    def times(name: str, depth: int = 0) -> int:
        if name not in memo:
            memo[name] = max((times(c, depth + 1) * f for c, f in calls.get(name, [])), default=1) if depth < 50 else 1
        return memo[name]
    return {name: times(name) for name in set(calls) | {entry}}


def collective_bytes(hlo: str) -> tuple[int, int, dict[str, int]]:
    """(bytes outside conditional branches, bytes inside them, per-op totals) of the collectives, each
    counted as often as it runs (inside the layer scan: once per layer)."""
    always = branch = 0
    per_op: dict[str, int] = {}
    current = ""
    repeats = _repeats(hlo)
    branches = {name for group in re.findall(r"branch_computations=\{([^}]*)\}", hlo)
                for name in re.findall(r"%?([\w.\-]+)", group)}
    branches |= {name for pair in re.findall(r"true_computation=%?([\w.\-]+), false_computation=%?([\w.\-]+)", hlo)
                 for name in pair}
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
        # A synchronous collective, or the `-done` half of an asynchronous one (its type is the result).
        m = re.search(r"= ((?:\([^=]*\))|(?:\w+\[[\d,]*\](?:\{[^}]*\})?)) (" + "|".join(COLLECTIVES) + r")(?:-done)?\(", line)
        if not m:
            continue
        size = repeats.get(current, 1) * sum(BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
                                             for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)))
        per_op[m.group(2)] = per_op.get(m.group(2), 0) + size
        if current in branches:
            branch += size
        else:
            always += size
    return always, branch, per_op


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/paper/grpo_7b.yaml"))
    ap.add_argument("--mesh", default=str(ROOT / "configs/mesh/gpu_1x8.yaml"))
    ap.add_argument("--slots-per-device", type=int, default=0, help="0: rollout.sample_prompts_per_device x G")
    ap.add_argument("--cache-len", type=int, default=0, help="0: max_prompt_len + max_new_tokens")
    ap.add_argument("--dump", default="", help="write the HLO texts here (folder)")
    args = ap.parse_args()

    import jax.numpy as jnp
    from flax import nnx

    from ktae_jax import engine
    from ktae_jax import mesh as mesh_lib
    from ktae_jax.config import load_config
    from ktae_jax.models import init_random
    from ktae_jax.plan import model_config_for
    from ktae_jax.sample import SamplingConfig, choose_tokens

    cfg = load_config([args.config, args.mesh])
    mesh, jax = h100_mesh(cfg)
    model_cfg, _ = model_config_for(cfg.model.path)
    param_dtype, compute = jnp.dtype(cfg.model.param_dtype), jnp.dtype(cfg.model.compute_dtype)
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    r = cfg.rollout
    w = (args.slots_per_device or r.sample_prompts_per_device * r.group_size) * devices
    length = args.cache_len or cfg.data.max_prompt_len + r.max_new_tokens
    tp = cfg.data.max_prompt_len
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_random(model_cfg, dtype=param_dtype, compute_dtype=compute)))
    sharded = lambda tree, shardings: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    before = sharded(params, mesh_lib.state_shardings(params, mesh))
    cast = lambda x: jax.ShapeDtypeStruct(x.shape, compute if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype)  # noqa: E731
    after = sharded(jax.tree.map(cast, params), mesh_lib.decode_shardings(params, mesh))

    groups = devices
    wg = w // groups
    c = -(-wg // r.group_size)  # as engine.decode chooses it
    p_g = r.prompts_per_step // groups
    ring = c * min(2, -(-p_g // c))
    spec = mesh_lib.batch_sharding(mesh, (groups,)).spec[0]
    grouped = lambda shape, dtype, axis=0: jax.ShapeDtypeStruct(  # noqa: E731  groups split over the batch devices
        shape, dtype, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*(None,) * axis, spec)))
    L, kv, d, v = model_cfg.num_layers, model_cfg.num_kv_heads, model_cfg.head_dim, model_cfg.vocab_size
    f32, i32 = jnp.float32, jnp.int32
    buf = grouped((L, groups, wg, kv, tp + r.max_new_tokens, d), compute, 1)
    slots = engine.Slots((buf,), (buf,), grouped((groups, wg, length), jnp.bool_), grouped((groups, wg), i32),
                         grouped((groups, wg), i32), grouped((groups, wg), i32), grouped((groups, wg, v), f32),
                         grouped((groups, wg), jnp.bool_))
    ring_kv = grouped((L, groups, ring, kv, tp, d), compute, 1)
    prompts = engine.Prompts(grouped((groups, p_g, tp), i32), grouped((groups, p_g, tp), jnp.bool_),
                             grouped((groups, p_g), i32), ring_kv, ring_kv, grouped((groups, ring, v), f32),
                             jax.ShapeDtypeStruct((), i32))
    n = r.prompts_per_step * r.group_size
    out = engine.Outputs(*(grouped((groups, n // groups, r.max_new_tokens), t) for t in (i32, i32, f32, f32)))
    scalar = jax.ShapeDtypeStruct((), i32, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    loop = engine.Loop(slots, prompts, out, grouped((groups,), i32), scalar, scalar)
    sampling = SamplingConfig(r.max_new_tokens, temperature=r.temperature, num_samples=r.group_size, eos_ids=(0,))
    lim = engine.Limits(n, r.max_new_tokens, r.group_size, (0,), 0, chunk=c)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    place = functools.partial(mesh_lib.constrain_batch, mesh=mesh)
    refill = engine._refill

    def step(state, key, loop, stops):  # choose + forward (the refill left out: counted apart)
        model = nnx.merge(graphdef, state)
        choose = lambda logits, u: choose_tokens(logits, None, sampling, u)  # noqa: E731
        engine._refill = lambda model, sl, pr, nr, lim, place: (sl, pr, nr)  # noqa: E731
        try:
            return engine._iteration(model, choose, jax.random.wrap_key_data(key), stops, lim, place, loop)
        finally:
            engine._refill = refill

    def refill_only(state, loop):
        return refill(nnx.merge(graphdef, state), loop.slots, loop.prompts, loop.next_row, lim, place)

    def prefill_only(state, prompts):
        return engine._prefill_chunk(nnx.merge(graphdef, state), prompts, c, place)

    stops = grouped((groups, n // groups), i32)
    print(f"{cfg.model.path}: {model_cfg.num_params / 1e9:.2f}B params ({param_dtype.name}, compute {compute.name}); "
          f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']} on 8 x H100 "
          f"(compile-only); {w} decode slots, cache view {length} of {tp + r.max_new_tokens} slots, "
          f"prompt chunks of {c} per device")
    keep = lambda tree: jax.tree.map(lambda x: getattr(x, "sharding", None), tree)  # noqa: E731
    programs = {"every step": (step, (key, loop, stops), keep(loop)),
                "per refill": (refill_only, (loop,), keep((slots, prompts, loop.next_row))),
                "per chunk prefill": (prefill_only, (prompts,), keep(prompts))}
    for name, state in (("before", before), ("after", after)):
        for part, (fn, args_, outs) in programs.items():
            start = time.perf_counter()
            # The loop state leaves laid out as it came (inside the sampler it never leaves the loop).
            compiled = jax.jit(fn, out_shardings=outs).lower(state, *args_).compile()
            hlo = compiled.as_text()
            if args.dump:
                pathlib.Path(args.dump).mkdir(parents=True, exist_ok=True)
                (pathlib.Path(args.dump) / f"{name}.{part.replace(' ', '_')}.hlo.txt").write_text(hlo)
            always, branch, per_op = collective_bytes(hlo)
            ops = ", ".join(f"{k} {b / 2**30:.2f} GiB" for k, b in sorted(per_op.items())) or "none"
            print(f"{name:<7} {part:<17}: {(always + branch) / 2**30:8.3f} GiB ({ops}); compiled in "
                  f"{time.perf_counter() - start:.0f} s")
            sys.stdout.flush()

if __name__ == "__main__":
    main()
