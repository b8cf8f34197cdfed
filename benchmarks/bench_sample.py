"""Rollout throughput: our jitted group sampler vs transformers PyTorch `generate`, same weights, CPU.

    .venv/bin/python benchmarks/bench_sample.py [--quick]

G=16 responses to each of 8 prompts (64 prompt tokens), 128 new tokens, temperature 1, on the
random ~100M-parameter Qwen2-shaped checkpoint of bench_forward.py. No stop ids, so every row
generates all 128 tokens in both. Also prints our decode time per step against the time to
read all weights once from memory (the bandwidth bound).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_forward import BANDWIDTH_BYTES_PER_S, FULL_SHAPE, QUICK_SHAPE, build_checkpoint  # noqa: E402


def ours(folder: pathlib.Path, prompts, new_tokens: int, groups: int) -> dict[str, float]:
    import jax
    import numpy as np

    from ktae_jax.models import load_pretrained
    from ktae_jax.sample import SamplingConfig, sample

    model, _ = load_pretrained(folder)
    mask = np.ones_like(prompts)
    full = SamplingConfig(new_tokens, temperature=1.0, num_samples=groups)
    prefill_only = SamplingConfig(1, temperature=1.0, num_samples=groups)
    run = lambda cfg, seed: jax.block_until_ready(sample(model, prompts, mask, jax.random.key(seed), cfg))  # noqa: E731
    start = time.perf_counter()
    run(full, 0)
    run(prefill_only, 0)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = run(full, 1)
    total = time.perf_counter() - start
    start = time.perf_counter()
    run(prefill_only, 2)
    first = time.perf_counter() - start
    assert int(out.lengths.min()) == new_tokens
    return {"total": total, "prefill": first, "step": (total - first) / (new_tokens - 1), "compile": compile_s}


def theirs(folder: pathlib.Path, prompts, new_tokens: int, groups: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor(prompts, dtype=torch.long)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  num_return_sequences=groups, eos_token_id=None, pad_token_id=0)

    def run(n):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

    run(2)  # warm-up
    start = time.perf_counter()
    out = run(new_tokens)
    total = time.perf_counter() - start
    start = time.perf_counter()
    run(1)
    first = time.perf_counter() - start
    assert out.shape == (len(prompts) * groups, prompts.shape[1] + new_tokens)
    return {"total": total, "prefill": first, "step": (total - first) / (new_tokens - 1)}


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, 2 prompts x 4, 16 tokens (smoke run)")
    args = ap.parse_args()
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    num_prompts, groups, prompt_len, new_tokens = (2, 4, 16, 16) if args.quick else (8, 16, 64, 128)
    prompts = np.random.default_rng(0).integers(0, shape["vocab_size"], (num_prompts, prompt_len)).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_checkpoint(pathlib.Path(tmp) / "qwen2", shape)
        from ktae_jax.models import ModelConfig

        import json

        config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        a = ours(folder, prompts, new_tokens, groups)
        b = theirs(folder, prompts, new_tokens, groups)
    tokens = num_prompts * groups * new_tokens
    weight_bytes = config.num_params * 4
    bound = weight_bytes / BANDWIDTH_BYTES_PER_S
    print(f"{num_prompts} prompts x G={groups}, {prompt_len}-token prompts, {new_tokens} new tokens, T=1; "
          f"Qwen2 {config.num_params / 1e6:.1f}M params float32")
    print(f"1-min load average (2 shared cores): {os.getloadavg()[0]:.1f}")
    print(f"{'':<28}{'ours (JAX)':>14}{'transformers':>14}")
    print(f"{'tokens/s':<28}{tokens / a['total']:>14.1f}{tokens / b['total']:>14.1f}")
    print(f"{'total time (s)':<28}{a['total']:>14.2f}{b['total']:>14.2f}")
    print(f"{'prefill + 1 token (s)':<28}{a['prefill']:>14.2f}{b['prefill']:>14.2f}")
    print(f"{'decode per step (ms)':<28}{a['step'] * 1e3:>14.1f}{b['step'] * 1e3:>14.1f}")
    print(f"{'step / bandwidth bound':<28}{a['step'] / bound:>14.2f}{b['step'] / bound:>14.2f}"
          f"   (bound: {weight_bytes / 1e6:.0f} MB / 31.8 GB/s = {bound * 1e3:.1f} ms)")
    print(f"speed-up (tokens/s): {b['total'] / a['total']:.2f}x; our compile time {a['compile']:.1f} s (excluded)")


if __name__ == "__main__":
    main()
