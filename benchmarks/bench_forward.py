"""Prefill and per-token decode time: our Flax NNX Qwen2 vs transformers PyTorch, same weights, CPU.

    .venv/bin/python benchmarks/bench_forward.py [--quick]

Builds a random ~100M-parameter Qwen2-shaped checkpoint with transformers (hidden 768, 12 layers,
12/2 heads, head dim 64, MLP 2048, vocab 32000, tied), loads it into both, and prints medians
side by side. JAX runs float32 (XLA on this CPU has no fast bf16 path); torch uses 2 threads.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FULL_SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2,
                  head_dim=64, intermediate_size=2048, vocab_size=32000, tie_word_embeddings=True)
QUICK_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, intermediate_size=768, vocab_size=8000, tie_word_embeddings=True)
BANDWIDTH_BYTES_PER_S = 31.8e9  # measured read bandwidth of this machine (CPU_PERF_NOTES.md)


def build_checkpoint(folder: pathlib.Path, shape: dict) -> pathlib.Path:
    """A random Qwen2 checkpoint of `shape`, written by transformers."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=4096, **shape))
    model.save_pretrained(str(folder))
    return folder


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(folder: pathlib.Path, batch: int, prompt_len: int, steps: int, reps: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ktae_jax.models import init_cache, load_pretrained

    model, _ = load_pretrained(folder)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, prompt_len)), jnp.int32)
    mask = jnp.ones_like(ids)

    @jax.jit
    def prefill(state, ids, mask):
        cache = init_cache(model.config, batch, prompt_len + steps + 1)
        return nnx.merge(graphdef, state)(ids, mask, cache=cache)

    @jax.jit  # the cache would be donated in a real loop; here it is reused for repeatable timing
    def decode(state, token, cache):
        return nnx.merge(graphdef, state)(token, jnp.ones_like(token), cache=cache)

    logits, cache = prefill(state, ids, mask)
    jax.block_until_ready(logits)
    t_prefill = median_time(lambda: jax.block_until_ready(prefill(state, ids, mask)), reps)
    token = ids[:, -1:]
    jax.block_until_ready(decode(state, token, cache))
    t_decode = median_time(lambda: jax.block_until_ready(decode(state, token, cache)), reps * 3)
    return {"prefill": t_prefill, "decode": t_decode}


def theirs(folder: pathlib.Path, batch: int, prompt_len: int, reps: int) -> dict[str, float]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, prompt_len)))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        t_prefill = median_time(lambda: model(ids, use_cache=True), reps)
        cache, token = out.cache, ids[:, -1:]

        def step():
            model(token, cache=cache, use_cache=True)
            cache.crop(-1)  # drop the new token: the cache length stays fixed across repetitions

        step()
        t_decode = median_time(step, reps * 3)
    return {"prefill": t_prefill, "decode": t_decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, few repetitions (smoke run)")
    args = ap.parse_args()
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    reps = 2 if args.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_checkpoint(pathlib.Path(tmp) / "qwen2", shape)
        from ktae_jax.models import ModelConfig, load_pretrained

        config = load_pretrained(folder)[0].config
        assert isinstance(config, ModelConfig)
        weight_bytes = config.num_params * 4
        print(f"Qwen2-shaped model: {config.num_params / 1e6:.1f}M parameters, float32 "
              f"({weight_bytes / 1e6:.0f} MB); bandwidth bound per decode step "
              f"{weight_bytes / BANDWIDTH_BYTES_PER_S * 1e3:.1f} ms")
        print(f"1-min load average (2 shared cores): {os.getloadavg()[0]:.1f}")
        print(f"{'case':<34}{'ours (JAX)':>14}{'transformers':>14}{'speed-up':>10}")
        for batch, prompt_len in ([(1, 64), (8, 64)] if not args.quick else [(1, 16), (4, 16)]):
            a = ours(folder, batch, prompt_len, steps=8, reps=reps)
            b = theirs(folder, batch, prompt_len, reps=reps)
            for key, label in (("prefill", f"prefill B={batch} T={prompt_len}"),
                               ("decode", f"decode step B={batch} (ctx {prompt_len})")):
                print(f"{label:<34}{a[key] * 1e3:>11.1f} ms{b[key] * 1e3:>11.1f} ms{b[key] / a[key]:>9.2f}x")
            if batch == 1:
                ratio = a["decode"] / (weight_bytes / BANDWIDTH_BYTES_PER_S)
                print(f"{'  B=1 decode / bandwidth bound':<34}{ratio:>12.2f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
