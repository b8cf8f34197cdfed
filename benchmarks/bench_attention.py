"""Attention kernels and the layer stack on this CPU: ours side by side with the materialised baseline.

    .venv/bin/python benchmarks/bench_attention.py [--quick]

1. One attention's forward + backward (Qwen2-1.5B heads: 12 query / 2 key-value heads of 128, one
   row, float32) at several lengths T: `xla` (the [T, T] scores materialised, the baseline) vs
   `blockwise` (online softmax over 512-key blocks): median time and XLA's temporary bytes. This is
   what `model.attention=auto` decides on for CPU (`attention.CPU_XLA_MAX_PAIRS`).
2. Compile time of a model's gradient (the shared-prompt log-prob pass) at 4 and 28 layers, the
   layers as one `lax.scan` (`model.scan_layers=true`) vs unrolled (the baseline): the scan's
   compile time should not grow with depth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ktae_jax.models import ModelConfig, init_random, response_logprobs  # noqa: E402
from ktae_jax.models import attention as attn_lib  # noqa: E402
from ktae_jax.models.config import ModelOptions  # noqa: E402


def attention_row(t: int, impl: str, repeats: int) -> tuple[float, int]:
    kv, g, d = 2, 6, 128
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (1, kv, g, t, d))
    k = jax.random.normal(keys[1], (1, kv, t, d))
    v = jax.random.normal(keys[2], (1, kv, t, d))
    mask = attn_lib.Mask(jnp.ones((1, t), bool), np.int32(0))
    loss = lambda q, k, v: jnp.sum(attn_lib.attend(q, k, v, mask, impl, 512)) ** 2  # noqa: E731
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = fn.lower(q, k, v).compile()
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, compiled.memory_analysis().temp_size_in_bytes


def compile_seconds(layers: int, scan: bool) -> float:
    cfg = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=256, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))
    options = ModelOptions(attention="xla", scan_layers=scan)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_random(cfg, options=options)))
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731

    def loss(state, p_ids, p_mask, r_ids, r_mask):
        return response_logprobs(nnx.merge(graphdef, state), p_ids, p_mask, r_ids, r_mask)[0].sum()

    start = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(state, ints(2, 32), ints(2, 32), ints(8, 32), ints(8, 32)).compile()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
    args = ap.parse_args()
    lengths = [128, 512, 1024] if args.quick else [128, 256, 512, 1024, 2048]
    repeats = 3 if args.quick else 7
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; 1-min load average: {os.getloadavg()[0]:.1f}")
    print("\n== one attention, forward + backward (12/2 heads of 128, 1 row, float32) ==")
    print(f"{'T':>6} {'xla ms':>9} {'blockwise ms':>13} {'xla temp MiB':>13} {'blockwise temp MiB':>19}  auto picks")
    for t in lengths:
        x_ms, x_mem = attention_row(t, "xla", repeats)
        b_ms, b_mem = attention_row(t, "blockwise", repeats)
        pick = attn_lib.resolve("auto", "cpu", t, t)
        print(f"{t:>6} {x_ms:>9.1f} {b_ms:>13.1f} {x_mem / 2**20:>13.1f} {b_mem / 2**20:>19.1f}  {pick}")
    print("\n== compile time of the log-prob pass's gradient (hidden 128), seconds ==")
    print(f"{'layers':>6} {'unrolled (baseline)':>20} {'scan':>8}")
    for layers in (4, 28):
        print(f"{layers:>6} {compile_seconds(layers, False):>20.1f} {compile_seconds(layers, True):>8.1f}")


if __name__ == "__main__":
    main()
