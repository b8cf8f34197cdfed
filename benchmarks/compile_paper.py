"""Do the paper's recipes fit their hardware? Every recipe in configs/paper compiled ahead of time
(`ktae-train --compile-only`) for its target, the goals of issue #12 beside XLA's figures.

    python benchmarks/compile_paper.py [--quick] [--only 7b|1.5b] [--set key=value ...]

Targets: the 7B recipes on one host of 8 x H100 (configs/mesh/gpu_1x8.yaml), the 1.5B recipes on
a v5p-128 slice (configs/mesh/tpu_v5p_128.yaml). Recipes that compile to the same programs (KTAE
only changes the advantages, computed outside these programs; the reward kind changes no shape)
are compiled once and the figures shared; the table says which. Each compile runs in its own
process (minutes each on a 2-core machine; memory is returned between them).

Goals: every program fits with >= 10% of the usable memory to spare; the 7B DAPO+KTAE update peak
<= 40 GiB per H100 (issue #12 measured 104.7 GiB before); the 1.5B GRPO+KTAE update peak <= 12 GiB
per v5p chip (before: ~45 GiB). The dry run's shape estimates are printed beside XLA's totals.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
GiB = 2**30
PLANS = {  # recipe size -> (mesh file, target)
    "7b": ("configs/mesh/gpu_1x8.yaml", "h100x8"),
    "1.5b": ("configs/mesh/tpu_v5p_128.yaml", "v5p-128"),
}
PEAK_GOALS = {("dapo_ktae_7b", "update"): 40 * GiB, ("grpo_ktae_1.5b", "update"): 12 * GiB}
BEFORE = {("dapo_ktae_7b", "update"): "104.7", ("grpo_ktae_1.5b", "update"): "~45"}
SPARE_GOAL = 0.10


def recipes(only: str | None) -> list[pathlib.Path]:
    files = sorted((REPO / "configs/paper").glob("*.yaml"))
    files = [f for f in files if re.search(r"_(1\.5b|7b)\.yaml$", f.name)]
    return [f for f in files if only is None or f.stem.endswith("_" + only)]


def program_key(recipe: pathlib.Path, mesh: str, overrides: list[str]) -> str:
    """The config minus what does not reach the compiled programs (KTAE, reward, run)."""
    sys.path.insert(0, str(REPO))
    from ktae_jax.config import load_config

    cfg = load_config([recipe, REPO / mesh], overrides).to_dict()
    for section in ("ktae", "reward", "run"):
        cfg.pop(section)
    return json.dumps(cfg, sort_keys=True)


def compile_report(recipe: pathlib.Path, mesh: str, target: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "ktae_jax.cli.train", "--config", str(recipe), "--config", str(REPO / mesh),
           *overrides, "--compile-only", "--target", target, "--json"]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ,
                                                                             "JAX_PLATFORMS": "cpu"})
    if res.returncode not in (0, 1):
        raise SystemExit(f"{recipe.name} on {target}: ktae-train exited {res.returncode}:\n{res.stderr[-3000:]}")
    report = json.loads(res.stdout.strip().splitlines()[-1])
    report["wall_s"] = time.perf_counter() - start
    return report


def dry_run_estimates(recipe: pathlib.Path, mesh: str, overrides: list[str]) -> dict[str, float]:
    """The --dry-run shape estimates (GiB per device) of the update and the sampler."""
    from ktae_jax.config import load_config
    from ktae_jax.plan import dry_run

    text = dry_run(load_config([recipe, REPO / mesh], overrides))
    return {name: float(re.search(rf"  {name}\s+\(.*?\)\s+([\d.]+) GiB", text).group(1)) for name in ("update", "sampler")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(PLANS), help="only the recipes of this size")
    parser.add_argument("--quick", action="store_true", help="only the two recipes with a peak goal")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every recipe compiled (to try settings before a recipe takes them)")
    args = parser.parse_args()
    rows, cache, ok = [], {}, True
    for recipe in recipes(args.only):
        if args.quick and not any(recipe.stem == goal for goal, _ in PEAK_GOALS):
            continue
        size = "7b" if recipe.stem.endswith("_7b") else "1.5b"
        mesh, target = PLANS[size]
        key = program_key(recipe, mesh, args.set)
        shared = cache.get(key)
        if shared is None:
            print(f"compiling {recipe.stem} for {target} ...", file=sys.stderr, flush=True)
            cache[key] = (recipe.stem, compile_report(recipe, mesh, target, args.set))
            shared = cache[key]
        source, report = shared
        estimate = dry_run_estimates(recipe, mesh, args.set)
        usable = report["usable_bytes"]
        for name, p in report["programs"].items():
            spare = 1 - p["total_bytes"] / usable
            goal = PEAK_GOALS.get((recipe.stem, name))
            met = p["fits"] and spare >= SPARE_GOAL and (goal is None or p["peak_bytes"] <= goal)
            ok &= met
            rows.append([recipe.stem, f"{target} ({pathlib.Path(mesh).stem})", name,
                         f"{p['peak_bytes'] / GiB:.1f}", f"{p['total_bytes'] / GiB:.1f}", f"{usable / GiB:.1f}",
                         f"{spare:.0%}", f"<= {goal / GiB:.0f}" if goal else ">= 10% spare",
                         BEFORE.get((recipe.stem, name), ""), f"{estimate[name]:.1f}" if name in estimate else "",
                         f"{p['compile_s']:.0f}" + ("" if source == recipe.stem else f" (= {source})"),
                         "yes" if met else "NO"])
    header = ["recipe", "target (mesh)", "program", "XLA peak GiB", "peak + resident GiB", "usable GiB", "spare",
              "goal", "before GiB", "dry-run estimate GiB", "compile s", "goal met"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nall goals met: {ok}" + (f" (with {' '.join(args.set)})" if args.set else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
