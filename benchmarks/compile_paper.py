"""Do the paper's recipes fit their hardware? Every recipe in configs/paper compiled ahead of time
(`ktae-train --compile-only`) for its target, the goals of issue #12 beside XLA's figures.

    python benchmarks/compile_paper.py [--quick] [--only 7b|1.5b] [--set key=value ...]

Targets: the 7B recipes on one host of 8 x H100 (configs/mesh/gpu_1x8.yaml), the 1.5B recipes on
a v5p-128 slice (configs/mesh/tpu_v5p_128.yaml). Recipes that compile to the same programs (KTAE
only changes the advantages, computed outside these programs; the reward kind changes no shape)
are compiled once and the figures shared; the table says which. This holds per program: the
sampler reads only the model, data, rollout, mesh and LoRA settings, the log-prob pass those and
the mini-batch slicing, so DAPO and GRPO of a size share them (the state alive beside each
program is still each recipe's own). Each recipe's compiles run in their own process (minutes each
on a 2-core machine; memory is returned between them); compile times are wall seconds, with the
process's CPU seconds beside them (the machine is shared: wall time says more about the load).

Goals: every program fits with >= 10% of the usable memory to spare; the 7B DAPO+KTAE update peak
<= 40 GiB per H100 (issue #12 measured 104.7 GiB before); the 1.5B GRPO+KTAE update peak <= 12 GiB
per v5p chip (before: ~45 GiB). The dry run's shape estimates are printed beside XLA's totals.
"""

from __future__ import annotations

import argparse
import json
import os
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


# What each program reads of the config (`aot.program_inputs`); the update reads all of it but
# KTAE, the reward and the run section (advantages and rewards are computed outside the programs).
PROGRAM_READS = {
    "sampler": {"model": None, "data": None, "rollout": None, "mesh": None, "lora": None},
    "logprobs": {"model": None, "data": None, "rollout": None, "mesh": None, "lora": None,
                 "algo": ("mini_batch_prompts", "micro_batch_per_device", "logprob_micro_batch_per_device")},
}


def program_keys(recipe: pathlib.Path, mesh: str, overrides: list[str]) -> dict[str, str]:
    """Per program, the part of the config that reaches it: equal keys, equal compiled programs."""
    sys.path.insert(0, str(REPO))
    from ktae_jax.config import load_config

    cfg = load_config([recipe, REPO / mesh], overrides).to_dict()
    update = {k: v for k, v in cfg.items() if k not in ("ktae", "reward", "run")}
    keys = {"update": json.dumps(update, sort_keys=True)}
    for name, reads in PROGRAM_READS.items():
        part = {k: cfg[k] if fields is None else {f: cfg[k][f] for f in fields} for k, fields in reads.items()}
        keys[name] = json.dumps(part, sort_keys=True)
    return keys


def compile_report(recipe: pathlib.Path, mesh: str, target: str, overrides: list[str], programs: list[str]) -> dict:
    """`ktae-train --compile-only --target --json`'s report for `programs` (run in a fresh process),
    with the state alive beside every program, compiled or not."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", str(recipe), str(REPO / mesh), target,
           ",".join(programs), *overrides]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if res.returncode != 0:
        raise SystemExit(f"{recipe.name} on {target}: the compile exited {res.returncode}:\n{res.stderr[-3000:]}")
    report = json.loads(res.stdout.strip().splitlines()[-1])
    report["wall_s"] = time.perf_counter() - start
    return report


def worker(recipe: str, mesh: str, target_name: str, programs: str, overrides: list[str]) -> None:
    """The compile-only report (`aot.compile_only`, as `ktae-train --compile-only --json` prints it)
    of some programs, each with its CPU seconds, and every program's resident bytes."""
    sys.path.insert(0, str(REPO))
    from ktae_jax import aot, hardware
    from ktae_jax import mesh as mesh_lib
    from ktae_jax.config import load_config

    cfg = load_config([recipe, mesh], overrides)
    target = hardware.target(target_name)
    plan = aot.plan_mesh(cfg, target)
    cfg.validate(num_batch_devices=mesh_lib.batch_devices(plan))
    inputs = aot.program_inputs(cfg, plan, aot.abstract_run(cfg, plan))
    report = {"usable_bytes": target.usable_bytes, "resident_bytes": {k: v[2] for k, v in inputs.items()},
              "programs": {}}
    for name in filter(None, programs.split(",")):
        cpu = time.process_time()
        report["programs"][name] = aot.compile_program(*inputs[name], target.usable_bytes)
        report["programs"][name]["cpu_s"] = time.process_time() - cpu
    print(json.dumps(report))


def shared_figures(source: dict, resident: int, usable: int) -> dict:
    """A program compiled for another recipe, with this recipe's state alive beside it."""
    p = dict(source, resident_bytes=resident, total_bytes=source["peak_bytes"] + resident)
    p["fits"] = p["total_bytes"] <= usable and source["compiled"] and "ran out of memory" not in source["reason"]
    return p


def dry_run_estimates(recipe: pathlib.Path, mesh: str, overrides: list[str]) -> dict[str, float]:
    """The --dry-run shape estimates (GiB per device) of the update and the sampler."""
    from ktae_jax.config import load_config
    from ktae_jax.plan import dry_run

    text = dry_run(load_config([recipe, REPO / mesh], overrides))
    return {name: float(re.search(rf"  {name}\s+\(.*?\)\s+([\d.]+) GiB", text).group(1)) for name in ("update", "sampler")}


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:6], sys.argv[6:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(PLANS), help="only the recipes of this size")
    parser.add_argument("--quick", action="store_true", help="only the two recipes with a peak goal")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every recipe compiled (to try settings before a recipe takes them)")
    parser.add_argument("--reports", type=pathlib.Path, metavar="DIR",
                        help="keep each recipe's compile report here, and reuse the ones already there")
    args = parser.parse_args()
    rows, compiled, ok = [], {}, True  # compiled: (program, key) -> (recipe it was compiled for, figures)
    for recipe in recipes(args.only):
        if args.quick and not any(recipe.stem == goal for goal, _ in PEAK_GOALS):
            continue
        size = "7b" if recipe.stem.endswith("_7b") else "1.5b"
        mesh, target = PLANS[size]
        keys = program_keys(recipe, mesh, args.set)
        todo = [name for name, key in keys.items() if (name, key) not in compiled]
        saved = args.reports / f"{recipe.stem}.json" if args.reports else None
        if saved is not None and saved.exists() and json.loads(saved.read_text())["key"] == [keys, todo, args.set]:
            report = json.loads(saved.read_text())["report"]
        else:
            print(f"compiling {recipe.stem} for {target}: {', '.join(todo) or 'nothing new'} ...", file=sys.stderr,
                  flush=True)
            report = compile_report(recipe, mesh, target, args.set, todo)
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps({"key": [keys, todo, args.set], "report": report}))
        for name, p in report["programs"].items():
            compiled[name, keys[name]] = (recipe.stem, p)
        estimate = dry_run_estimates(recipe, mesh, args.set)
        usable = report["usable_bytes"]
        for name in keys:
            source, p = compiled[name, keys[name]]
            p = shared_figures(p, report["resident_bytes"][name], usable)
            spare = 1 - p["total_bytes"] / usable
            goal = PEAK_GOALS.get((recipe.stem, name))
            met = p["fits"] and spare >= SPARE_GOAL and (goal is None or p["peak_bytes"] <= goal)
            ok &= met
            rows.append([recipe.stem, f"{target} ({pathlib.Path(mesh).stem})", name,
                         f"{p['peak_bytes'] / GiB:.1f}", f"{p['total_bytes'] / GiB:.1f}", f"{usable / GiB:.1f}",
                         f"{spare:.0%}", f"<= {goal / GiB:.0f}" if goal else ">= 10% spare",
                         BEFORE.get((recipe.stem, name), ""), f"{estimate[name]:.1f}" if name in estimate else "",
                         f"{p['compile_s']:.0f} / {p.get('cpu_s', 0):.0f}"
                         + ("" if source == recipe.stem else f" (= {source})"),
                         "yes" if met else "NO"])
    header = ["recipe", "target (mesh)", "program", "XLA peak GiB", "peak + resident GiB", "usable GiB", "spare",
              "goal", "before GiB", "dry-run estimate GiB", "compile s (wall / CPU)", "goal met"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nall goals met: {ok}" + (f" (with {' '.join(args.set)})" if args.set else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
