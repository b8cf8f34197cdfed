"""The study's tables and plots from its `study.json` (`tiny_ktae_study.py` calls `report`).

    .venv/bin/python benchmarks/tiny_study_report.py runs/study/study.json [--plots docs/study]

Paired differences (arm minus GRPO, the same seed) with a 95% confidence interval from the
paired t distribution; learning-curve area = trapezoid area / steps (mean accuracy over training).
Writes `<plots>/<task>.png` and `<plots>/summary.json` (per arm: n, seeds, mean measures; the
paired differences; the summed CPU time).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics

import numpy as np
from scipy import stats

RL_ARMS = ("GRPO", "KTAE (released)", "KTAE (beta=2)")
SFT = "SFT (same compute)"


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over pairs, its 95% paired-t interval, and n."""
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    mean = float(d.mean())
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def auc(run: dict) -> float:
    steps = np.asarray(run["curve_steps"], float)
    return float(np.trapezoid(run["curve"], steps) / steps[-1])


def measures(run: dict) -> dict:
    m = {"T=1 acc.": run["final_sampled"]["accuracy"], "len T=1": run["final_sampled"]["mean_length"],
         "shortcuts T=1": run["final_sampled"]["shortcuts"], "CPU s": run["cpu_s"]}
    if run["curve"]:
        m["AUC"] = auc(run)
    return m


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def _ci(p: dict) -> str:
    return f"{p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}] (n={p['n']})"


def task_tables(name: str, task: dict) -> tuple[str, dict]:
    runs = task["runs"]
    cols = ("T=1 acc.", "AUC", "len T=1", "shortcuts T=1", "CPU s")
    lines = [f"### {name}: mean ± sd over seeds", "", "| arm | n | " + " | ".join(cols) + " |",
             "|" + " --- |" * (len(cols) + 2)]
    base = task["base"]
    lines.append(f"| base (greedy: acc. {base['greedy']['accuracy']:.3f}, length {base['greedy']['mean_length']:.1f}) "
                 f"| - | {base['sampled']['accuracy']:.3f} | - | {base['sampled']['mean_length']:.1f} | "
                 f"{base['sampled']['shortcuts']:.2f} | - |")
    per_arm = {arm: [measures(r) for r in rs] for arm, rs in runs.items() if rs}
    for arm, ms in per_arm.items():
        cells = [_ms([m[c] for m in ms]) if c in ms[0] else "-" for c in cols]
        extra = f" ({statistics.fmean(r['sft_steps'] for r in runs[arm]):.0f} steps)" if arm == SFT else ""
        lines.append(f"| {arm}{extra} | {len(ms)} | " + " | ".join(cells) + " |")
    diffs: dict = {}
    lines += ["", f"### {name}: paired differences, mean [95% CI] (n)", "",
              "| comparison | T=1 acc. | AUC | len T=1 | shortcuts T=1 |", "|" + " --- |" * 5]
    by_seed = {arm: {r["seed"]: measures(r) for r in rs} for arm, rs in runs.items()}
    # every arm against GRPO; and the second KTAE setting against the released one (H5)
    for arm, ref in [(a, "GRPO") for a in (*RL_ARMS[1:], SFT)] + [(RL_ARMS[2], RL_ARMS[1])]:
        other, base_runs = by_seed.get(arm, {}), by_seed.get(ref, {})
        seeds = sorted(set(base_runs) & set(other))
        if len(seeds) < 2:
            continue
        keys = ("T=1 acc.", "AUC", "len T=1", "shortcuts T=1")
        row = {k: paired([other[s][k] for s in seeds], [base_runs[s][k] for s in seeds])
               for k in keys if k in other[seeds[0]]}
        diffs[f"{arm} - {ref}"] = row
        lines.append(f"| {arm} - {ref} | " + " | ".join(_ci(row[k]) if k in row else "-" for k in keys) + " |")
    return "\n".join(lines), diffs


def plot(name: str, task: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for arm, color in zip(RL_ARMS, ("tab:blue", "tab:red", "tab:orange")):
        rs = task["runs"].get(arm, [])
        if not rs:
            continue
        x = np.asarray(rs[0]["curve_steps"])
        y = np.asarray([r["curve"] for r in rs])
        mean, sd = y.mean(0), y.std(0, ddof=1) if len(rs) > 1 else np.zeros(len(x))
        ax.plot(x, mean, color=color, label=f"{arm} (n={len(rs)})")
        ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.15)
    sft = task["runs"].get(SFT, [])
    if sft and task["runs"]["GRPO"]:
        ys = [r["final_sampled"]["accuracy"] for r in sft]
        last = task["runs"]["GRPO"][0]["curve_steps"][-1]
        ax.errorbar([last + 0.15], [np.mean(ys)], yerr=[np.std(ys, ddof=1) if len(ys) > 1 else 0], fmt="ks",
                    label=f"SFT, same CPU time (n={len(ys)})")
    ax.set_xlabel("RL step (16 prompts x 8 responses)")
    ax.set_ylabel("held-out accuracy, T = 1")
    ax.set_title(f"tiny task '{name}': mean ± sd over seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)  # the SFT marker sits at the lower right
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results: list[dict], plots: pathlib.Path) -> str:
    """Tables for every task of every `study.json` (one per process); CPU time summed over them."""
    parts, tasks = [], {}
    for one in results:  # merge the processes' runs per task and arm
        for name, task in one["tasks"].items():
            merged = tasks.setdefault(name, {"base": task["base"], "runs": {}})
            if "greedy" in task["base"]:
                merged["base"] = task["base"]
            for arm, runs in task["runs"].items():  # a seed run twice (two processes): the first file's counts
                have = {r["seed"] for r in merged["runs"].setdefault(arm, [])}
                merged["runs"][arm].extend(r for r in runs if r["seed"] not in have)
    summary: dict = {"tasks": {}}
    for name, task in tasks.items():
        task["base"].setdefault("greedy", {"accuracy": math.nan, "mean_length": math.nan})
        text, diffs = task_tables(name, task)
        plot(name, task, plots / f"{name}.png")
        parts.append(text)
        summary["tasks"][name] = {"base": task["base"], "paired": diffs, "arms": {
            arm: {"n": len(rs), "seeds": sorted(r["seed"] for r in rs),
                  **{k: statistics.fmean(m[k] for m in map(measures, rs)) for k in measures(rs[0])}}
            for arm, rs in task["runs"].items() if rs}}
    cpu = sum(r.get("cpu_s", math.nan) for r in results)
    wall = max(r.get("wall_s", math.nan) for r in results)
    summary.update(cpu_s=cpu, machine_minutes=cpu / 2 / 60, longest_process_wall_s=wall)
    plots.mkdir(parents=True, exist_ok=True)
    (plots / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    parts.append(f"\nstudy: {cpu:.0f} CPU s (user + sys, all processes) = {cpu / 2 / 60:.1f} min of the 2-core "
                 f"machine; wall {wall / 60:.1f} min (longest process); plots and summary.json in {plots}")
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study_json", nargs="+")
    ap.add_argument("--plots", default=str(pathlib.Path(__file__).resolve().parents[1] / "docs" / "study"))
    args = ap.parse_args()
    print(report([json.loads(pathlib.Path(p).read_text()) for p in args.study_json], pathlib.Path(args.plots)))


if __name__ == "__main__":
    main()
