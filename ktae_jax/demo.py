"""`make demo`: GRPO vs GRPO+KTAE from the same tiny base model, on a laptop CPU, in minutes.

  1. BASE      the shipped tiny base (ktae_jax/tiny/base), evaluated on held-out problems
  2. TRAIN     GRPO and GRPO+KTAE with `configs/tiny.yaml`, the same steps and seed each
  3. EVALUATE  both final policies on the same held-out problems (greedy, the real grader)
  4. REPORT    a table (accuracy, mean response length, wall time), reward curves as a PNG,
               every metric as JSONL

Everything lands in `runs/demo/`; an interrupted demo resumes where it stopped (checkpoints
for training, per-item records for evaluation).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from ktae_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 20261127  # training problems use data.shuffle_seed; the held-out set its own stream
RECIPES = {"GRPO": [], "GRPO+KTAE": ["ktae.enabled=true"]}


def held_out_problems(n: int) -> list[dict]:
    from ktae_jax.tiny import make_problems

    return [{"problem": p["problem"], "answer": p["answer"]}
            for p in make_problems(n, seed=HELD_OUT_SEED, split="test")]  # never among the RL prompts


def evaluate_policy(policy, problems: list[dict], out_dir: pathlib.Path, cfg, pool) -> dict:
    """Greedy, the paper's protocol with the training run's template and length limit."""
    from ktae_jax.evaluate import Protocol, evaluate

    summary = evaluate(policy.model, policy.tokenizer, {"tiny": problems}, out_dir=out_dir,
                       protocol=Protocol.of_run(cfg), batch_prompts=250, pool=pool, stop_ids=policy.stop_ids,
                       label=policy.folder.name, progress=True)
    return summary["benchmarks"]["tiny"]


def sampled_accuracy(policy, problems: list[dict], cfg, pool, *, seed: int = 0, batch_prompts: int = 250) -> dict:
    """One temperature-1 sample per problem, graded: the policy's own success rate and style mix."""
    from ktae_jax.tiny.measure import generate, style_report

    texts, lengths = generate(policy.model, policy.tokenizer, [p["problem"] for p in problems], greedy=False,
                              seed=seed, max_new_tokens=cfg.rollout.max_new_tokens, batch_size=batch_prompts)
    report = style_report(texts, pool.grade(texts, [p["answer"] for p in problems]).scores, lengths)
    return {"accuracy": report["accuracy"], "mean_length": report["mean_length"],
            "reliable_share": report["mix"]["reliable"]}


def measure(folder, problems: list[dict], out_dir: pathlib.Path, cfg, pool, *, seed: int = 0) -> tuple[dict, dict]:
    """(greedy evaluation, sampled accuracy) of the policy in `folder` ("tiny": the shipped base)."""
    from ktae_jax.policy import load_policy

    policy = load_policy(folder)
    return (evaluate_policy(policy, problems, out_dir, cfg, pool),
            sampled_accuracy(policy, problems, cfg, pool, seed=seed))


def train_wall_time(run_dir: pathlib.Path) -> float:
    """Seconds of training, from the per-step timings (so a resumed run reports its whole time)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(line).get("time/step_s", 0.0) for line in lines if line.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "demo"), help="where runs, evaluations and plots go")
    parser.add_argument("--steps", type=int, help="training steps per recipe (default: configs/tiny.yaml)")
    parser.add_argument("--held-out", type=int, default=1000, help="held-out problems (>= 1,000 separates the runs)")
    parser.add_argument("overrides", nargs="*", help="section.key=value for both runs")
    args = parser.parse_args(argv)

    from ktae_jax.rewards import GraderPool
    from ktae_jax.train import run
    from ktae_jax.viz import plot_metrics

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base_cfg = load_config([REPO / "configs" / "tiny.yaml"], args.overrides)
    problems = held_out_problems(args.held_out)

    rows = {}
    with GraderPool(base_cfg.reward.num_workers or None, base_cfg.reward.timeout_s) as pool:
        # 1. BASE
        print(f"[1/4] evaluating the tiny base model on {len(problems)} held-out problems")
        rows["base"] = (*measure("tiny", problems, out / "eval" / "base", base_cfg, pool), 0.0)

        # 2. TRAIN and 3. EVALUATE each recipe, from the same base with the same seed.
        for i, (name, extra) in enumerate(RECIPES.items()):
            run_dir = out / name.lower().replace("+", "_")
            overrides = [*args.overrides, *extra, f"run.run_dir={run_dir}"]
            if args.steps:
                overrides.append(f"run.max_steps={args.steps}")
            cfg = load_config([REPO / "configs" / "tiny.yaml"], overrides)
            print(f"[{2 + i}/4] training {name} for {cfg.run.max_steps} steps -> {run_dir}")
            run(cfg)
            rows[name] = (*measure(run_dir / "hf", problems, out / "eval" / name.lower().replace("+", "_"), cfg, pool),
                          train_wall_time(run_dir))

    # 4. REPORT
    plot = out / "reward_curves.png"
    plot_metrics({name: out / name.lower().replace("+", "_") for name in RECIPES}, plot)
    table = ["| model | held-out accuracy, greedy | accuracy, sampled (T = 1) | opens with \"Sum:\" (T = 1) "
             "| mean response length (greedy) | training wall time |", "| --- | --- | --- | --- | --- | --- |"]
    for name, (greedy, sampled, seconds) in rows.items():
        table.append(f"| {name} | {100 * greedy['accuracy']:.1f}% | {100 * sampled['accuracy']:.1f}% | "
                     f"{100 * sampled['reliable_share']:.0f}% | {greedy['mean_length']:.1f} tokens | {seconds:.0f} s |")
    table.append(f"\n{len(problems)} held-out problems, graded by the real grader; "
                 f"{rows['GRPO'][0]['items']} evaluated per model.")
    report = "\n".join(table)
    (out / "results.md").write_text(report + "\n")
    with (out / "results.jsonl").open("w") as handle:
        for name, (greedy, sampled, seconds) in rows.items():
            handle.write(json.dumps({"model": name, "greedy": greedy, "sampled": sampled, "train_wall_s": seconds}) + "\n")
    print("\n" + report)
    print(f"\nreward curves: {plot}\nmetrics: {out}/<run>/metrics.jsonl; results: {out}/results.md "
          f"(demo wall time {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
