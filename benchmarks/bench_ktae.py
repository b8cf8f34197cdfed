"""KTAE at the paper's scale: ours (jitted JAX) vs a straightforward and a well-vectorised NumPy.

Paper-shaped inputs: groups of 16 rollouts x 3,072 tokens, Zipf-distributed ids over the 151,665
ids of the Qwen2.5 tokenizer (151,936 embedding rows), response lengths uniform in 200..3,072,
about half the rollouts correct. For 16 and 256 groups it prints, side by side in one run:

  * ours on one device, and sharded over every CPU core (one simulated device per core,
    `shard_map` over groups), time per group after compilation, tokens per second, and the
    compiled program's temporary memory plus the process's peak RSS;
  * the vectorised NumPy implementation (sort / bincount, tabulated Fisher p-values);
  * the straightforward NumPy implementation (a loop over groups and distinct ids, scipy's
    `fisher_exact`), timed on a few groups only because it is slow.

Run from the repository root: `.venv/bin/python benchmarks/bench_ktae.py [--quick]`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import time

# One simulated XLA device per core, so the sharded run can use both cores of this machine.
_CORES = os.cpu_count() or 1
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_CORES}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from ktae_reference import naive_ktae_advantages, vectorised_ktae_advantages  # noqa: E402

from ktae_jax.advantages import token_advantages  # noqa: E402
from ktae_jax.ktae import KTAEConfig  # noqa: E402

GROUP, LENGTH, VOCAB_ROWS, VOCAB_IDS, EOS = 16, 3072, 151_936, 151_665, 151_643
AUTHORS_S_PER_GROUP = 0.22  # the released code on this machine (issue 2)


def make_inputs(n_groups: int, seed: int = 0, zipf_s: float = 1.1):
    """Paper-shaped tokens [B, L], mask [B, L], rewards [B] with B = n_groups * 16."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, VOCAB_IDS + 1, dtype=np.float64)
    probs = ranks**-zipf_s
    cdf = np.cumsum(probs / probs.sum())
    id_of_rank = rng.permutation(VOCAB_IDS).astype(np.int32)
    B = n_groups * GROUP
    tokens = id_of_rank[np.minimum(np.searchsorted(cdf, rng.random((B, LENGTH))), VOCAB_IDS - 1)]
    lengths = rng.integers(200, LENGTH + 1, size=B)
    mask = (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.int8)
    tokens[np.arange(B), lengths - 1] = EOS  # responses end with EOS (ignored by KTAE)
    tokens = np.where(mask > 0, tokens, EOS)  # and are padded with it
    rewards = (rng.random(B) < 0.5).astype(np.float32)
    return tokens, mask, rewards


def time_call(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def bench_ours(tokens, mask, rewards, config: KTAEConfig, mesh, repeats: int):
    kwargs = dict(group_size=GROUP, vocab_size=VOCAB_ROWS, ktae=config, mesh=mesh)
    if mesh is None:
        args = [jnp.asarray(x) for x in (tokens, mask, rewards)]
    else:
        sharding = NamedSharding(mesh, PartitionSpec("data"))
        args = [jax.device_put(x, sharding) for x in (tokens, mask, rewards)]
    compiled = token_advantages.lower(*args, **kwargs).compile()
    memory = compiled.memory_analysis()
    temp_mb = getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory is not None else float("nan")
    seconds = time_call(lambda: compiled(*args), repeats)
    return seconds, temp_mb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (4 and 16 groups)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    sizes = (4, 16) if args.quick else (16, 256)
    config = KTAEConfig(ignore_token_ids=(EOS,))
    hyper = dict(ignore_ids=(EOS,))
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    print(f"KTAE benchmark: groups of {GROUP} x {LENGTH} tokens, vocab {VOCAB_ROWS}, jax {jax.__version__}, "
          f"{len(devices)} CPU device(s) for the sharded run")

    rows = []
    for n_groups in sizes:
        tokens, mask, rewards = make_inputs(n_groups)
        n_tokens = int(mask.sum())
        ours_1, temp_1 = bench_ours(tokens, mask, rewards, config, None, args.repeats)
        ours_n, temp_n = bench_ours(tokens, mask, rewards, config, mesh, args.repeats)
        ours = np.asarray(token_advantages(tokens, mask, rewards, group_size=GROUP, vocab_size=VOCAB_ROWS,
                                           ktae=config).advantages)

        vec_groups = min(n_groups, 16)
        sl = slice(0, vec_groups * GROUP)
        # Warm up: the NumPy version builds its Fisher table once per group size, like ours.
        vectorised_ktae_advantages(tokens[:GROUP], mask[:GROUP], rewards[:GROUP], group_size=GROUP,
                                   vocab_size=VOCAB_ROWS, **hyper)
        start = time.perf_counter()
        vec = vectorised_ktae_advantages(tokens[sl], mask[sl], rewards[sl], group_size=GROUP, vocab_size=VOCAB_ROWS,
                                         **hyper)
        vec_s = (time.perf_counter() - start) / vec_groups
        max_diff = float(np.abs(vec - ours[sl]).max())

        naive_groups = 1
        sl1 = slice(0, naive_groups * GROUP)
        start = time.perf_counter()
        naive_ktae_advantages(tokens[sl1], mask[sl1], rewards[sl1], group_size=GROUP, **hyper)
        naive_s = (time.perf_counter() - start) / naive_groups
        rows.append((n_groups, n_tokens, ours_1, temp_1, ours_n, temp_n, vec_s, vec_groups, naive_s, max_diff))

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    header = ("groups", "ours 1 dev ms/grp", "ours all cores ms/grp", "Mtok/s (all cores)", "XLA temp MB (1 dev)",
              "NumPy vectorised ms/grp", "NumPy straightforward ms/grp", "speed-up vs vectorised (1 dev / all)",
              "vs authors' 220 ms/grp", "max |ours - NumPy|")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for n_groups, n_tokens, o1, t1, on, tn, vs, vg, ns, diff in rows:
        print(" | ".join([
            str(n_groups), f"{o1 / n_groups * 1e3:.3f}", f"{on / n_groups * 1e3:.3f}", f"{n_tokens / on / 1e6:.1f}",
            f"{t1:.0f}", f"{vs * 1e3:.2f} ({vg} grp)", f"{ns * 1e3:.0f} (1 grp)",
            f"{vs / (o1 / n_groups):.1f}x / {vs / (on / n_groups):.1f}x",
            f"{AUTHORS_S_PER_GROUP / (o1 / n_groups):.0f}x", f"{diff:.1e}",
        ]))
    print(f"\npeak RSS of this process: {peak_rss:.0f} MB (inputs of the largest size: "
          f"{rows[-1][0] * GROUP * LENGTH * 5 / 2**20:.0f} MB)")
    print("goal: <= 1 ms per group, >= 2x the vectorised NumPy; one paper step (1,024 groups) would take "
          f"{rows[-1][4] / rows[-1][0] * 1024:.2f} s on all cores here")


if __name__ == "__main__":
    main()
