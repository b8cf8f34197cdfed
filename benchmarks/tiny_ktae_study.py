"""Does KTAE help on the tiny task? GRPO vs GRPO+KTAE over several seeds, and a control that spends
the same compute on more supervised training, all from the shipped tiny base.

For each seed: GRPO and GRPO+KTAE runs of `configs/tiny.yaml` (run.seed and data.shuffle_seed =
the seed), and the control: `ktae-pretrain` continued from the base with fresh teacher data for
as many steps as fit in the mean RL wall time. Every final policy is evaluated on the demo's
held-out problems (greedy, and one temperature-1 sample per problem). Prints mean and spread
per recipe and writes every figure to `<out>/study.json`.

    .venv/bin/python benchmarks/tiny_ktae_study.py [--seeds 3] [--steps N] [--held-out 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ktae_jax.config import load_config  # noqa: E402
from ktae_jax.demo import held_out_problems, measure, train_wall_time  # noqa: E402


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{mean:.3f} ± {sd:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="RL steps per run (default: configs/tiny.yaml)")
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "runs" / "study"))
    parser.add_argument("--quick", action="store_true", help="2 seeds, 6 steps, 200 held-out problems")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.held_out = 2, 6, 200

    from ktae_jax.rewards import GraderPool
    from ktae_jax.tiny import ensure_base
    from ktae_jax.tiny.pretrain import PretrainConfig
    from ktae_jax.tiny.pretrain import run as pretrain
    from ktae_jax.train import run

    out = pathlib.Path(args.out)
    problems = held_out_problems(args.held_out)
    base = pathlib.Path(ensure_base())
    results: dict[str, list[dict]] = {"GRPO": [], "GRPO+KTAE": [], "SFT (same compute)": []}
    tiny = REPO / "configs" / "tiny.yaml"
    with GraderPool(2, 5.0) as pool:
        base_cfg = load_config([tiny])
        base_row = dict(zip(("greedy", "sampled"), measure(base, problems, out / "eval" / "base", base_cfg, pool)))
        for seed in range(args.seeds):
            rl_seconds = []
            for name, extra in {"GRPO": [], "GRPO+KTAE": ["ktae.enabled=true"]}.items():
                run_dir = out / f"{name.lower().replace('+', '_')}_seed{seed}"
                overrides = [*extra, f"run.run_dir={run_dir}", f"run.seed={seed}", f"data.shuffle_seed={seed}",
                             "run.progress=false"] + ([f"run.max_steps={args.steps}"] if args.steps else [])
                cfg = load_config([tiny], overrides)
                run(cfg)
                seconds = train_wall_time(run_dir)
                rl_seconds.append(seconds)
                greedy, sampled = measure(run_dir / "hf", problems, out / "eval" / run_dir.name, cfg, pool, seed=seed)
                results[name].append({"seed": seed, "train_s": seconds, "greedy": greedy, "sampled": sampled})
            # The control: supervised steps in the same wall time (calibrated on a short run first).
            calibrate = PretrainConfig(init_from=str(base), seed=1000 + seed, steps=40, warmup_steps=0,
                                       learning_rate=3e-4, eval_problems=0)
            start = time.perf_counter()
            pretrain(calibrate, out / f"sft_calibrate_seed{seed}", progress=False)
            per_step = (time.perf_counter() - start) / calibrate.steps
            steps = max(1, int(statistics.fmean(rl_seconds) / per_step))
            control = PretrainConfig(init_from=str(base), seed=1000 + seed, steps=steps, warmup_steps=0,
                                     learning_rate=3e-4, eval_problems=0)
            start = time.perf_counter()
            folder, _ = pretrain(control, out / f"sft_seed{seed}", progress=False)
            seconds = time.perf_counter() - start
            greedy, sampled = measure(folder, problems, out / "eval" / f"sft_seed{seed}", base_cfg, pool, seed=seed)
            results["SFT (same compute)"].append({"seed": seed, "train_s": seconds, "sft_steps": steps,
                                                  "greedy": greedy, "sampled": sampled})

    (out / "study.json").write_text(json.dumps({"base": base_row, **results}, indent=1))
    header = ("recipe", "seeds", "greedy accuracy", "sampled accuracy (T=1)", "opens with Sum: (T=1)",
              "mean length (greedy)", "train wall s")
    print(f"\n{len(problems)} held-out tiny-task problems; mean ± standard deviation over seeds\n")
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    print(f"| base | - | {base_row['greedy']['accuracy']:.3f} | {base_row['sampled']['accuracy']:.3f} | "
          f"{base_row['sampled']['reliable_share']:.3f} | {base_row['greedy']['mean_length']:.1f} | - |")
    for name, rows in results.items():
        print(f"| {name} | {len(rows)} | {spread([r['greedy']['accuracy'] for r in rows])} | "
              f"{spread([r['sampled']['accuracy'] for r in rows])} | "
              f"{spread([r['sampled']['reliable_share'] for r in rows])} | "
              f"{spread([r['greedy']['mean_length'] for r in rows])} | {spread([r['train_s'] for r in rows])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
