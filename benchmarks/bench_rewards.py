"""Grading throughput on the 1,560 real responses: our pool (1 and 2 workers) vs serial baselines.

    .venv/bin/python benchmarks/bench_rewards.py            # full: 1,560 responses
    .venv/bin/python benchmarks/bench_rewards.py --quick    # first 200 responses
    .venv/bin/python benchmarks/bench_rewards.py --big      # also a 16,384-response batch

Baselines run in a fresh process each, one response after another, as a trainer without a pool would:
(a) plain math-verify (`verify(parse(gt), parse(response))`), (b) our checks, unpooled.
Pool figures exclude worker start-up (paid once per training run), which is printed apart.
Also prints agreement with the paper's grader and the confusion matrix.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ktae_jax.rewards import GraderPool, grade_response  # noqa: E402
from ktae_jax.rewards.equivalence import reference_candidates  # noqa: E402

DATA = REPO.parent / "shared" / "grader" / "grpo_ktae_7b_outputs.jsonl"


def plain_math_verify(response: str, reference: object) -> float:
    from math_verify import parse, verify

    pred = parse(response)
    return float(any(verify(parse(f"${c}$"), pred) for c in reference_candidates(reference)))


def serial(name: str, n: int) -> tuple[float, list[float]]:
    """Run a serial baseline in a fresh interpreter: cold caches, like a new worker."""
    out = subprocess.run(
        [sys.executable, __file__, "--_serial", name, "--_n", str(n)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    return payload["seconds"], payload["scores"]


def _serial_child(name: str, n: int) -> None:
    rows = [json.loads(line) for line in DATA.open()][:n]
    fn = {"ours": grade_response, "math-verify": plain_math_verify}[name]
    fn(r"\boxed{1}", "1")  # imports
    t0 = time.perf_counter()
    scores = [fn(r["response"], r["gt"]) for r in rows]
    print(json.dumps({"seconds": time.perf_counter() - t0, "scores": scores}))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to see sharing of a busy machine."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pooled(num_workers: int, rows, timeout_s: float):
    t0 = time.perf_counter()
    with GraderPool(num_workers, timeout_s) as pool:
        pool.grade([r"\boxed{1}"] * num_workers, ["1"] * num_workers)  # wait for start-up
        startup = time.perf_counter() - t0
        pids = pool.worker_pids()
        cpu0 = sum(cpu_seconds(p) for p in pids)
        result = pool.grade([r["response"] for r in rows], [r["gt"] for r in rows])
        same_workers = pool.worker_pids() == pids
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0 if same_workers else float("nan")
    return startup, result.wall_s, cpu, result.scores, result.timeouts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first 200 responses only")
    ap.add_argument("--big", action="store_true", help="also grade 16,384 responses (2 workers)")
    ap.add_argument("--timeout-s", type=float, default=5.0)
    ap.add_argument("--_serial", help=argparse.SUPPRESS)
    ap.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._serial:
        return _serial_child(args._serial, args._n)
    if not DATA.is_file():
        raise FileNotFoundError(f"expected the graded responses at {DATA}")
    rows = [json.loads(line) for line in DATA.open()]
    if args.quick:
        rows = rows[:200]
    n = len(rows)
    load = os.getloadavg()[0]
    print(f"{n} real responses from {DATA.name}; {os.cpu_count()} cores, load {load:.2f}\n")
    print(f"{'grader':<44}{'seconds':>9}{'responses/s':>13}")

    def line(name: str, seconds: float) -> None:
        print(f"{name:<44}{seconds:>9.2f}{n / seconds:>13.1f}", flush=True)

    t_mv, _ = serial("math-verify", n)
    line("baseline: plain math-verify, serial", t_mv)
    t_ours, serial_scores = serial("ours", n)
    line("baseline: our checks, serial in-process", t_ours)
    results = {}
    for workers in (1, 2):
        startup, wall, cpu, scores, timeouts = pooled(workers, rows, args.timeout_s)
        results[workers] = scores
        line(f"ours: GraderPool({workers} worker{'s' if workers > 1 else ''})", wall)
        used = f"{cpu:.1f} CPU-s = {cpu / wall:.2f} cores" if cpu == cpu else "n/a (replaced)"
        print(f"    (start-up {startup:.2f} s, once; timeouts {timeouts}; workers used {used})")

    scores = results[2]
    confusion = collections.Counter((int(r["reward"]), int(s)) for r, s in zip(rows, scores))
    agree = (confusion[(1, 1)] + confusion[(0, 0)]) / n
    print(f"\nagreement with the paper's grader: {agree:.2%} ({n} responses)")
    print("                paper 1   paper 0")
    print(f"  ours 1      {confusion[(1, 1)]:>8}  {confusion[(0, 1)]:>8}")
    print(f"  ours 0      {confusion[(1, 0)]:>8}  {confusion[(0, 0)]:>8}")
    same = sum(a == b for a, b in zip(scores, serial_scores))
    print(f"pool vs serial in-process: {same}/{n} identical")

    if args.big:
        big = (rows * (16_384 // n + 1))[:16_384]
        with GraderPool(2, args.timeout_s) as pool:
            pool.grade([r"\boxed{1}"] * 2, ["1"] * 2)
            result = pool.grade([r["response"] for r in big], [r["gt"] for r in big])
        ideal = t_ours * len(big) / n / 2
        print(
            f"\n16,384 responses, 2 workers: {result.wall_s:.1f} s"
            f" (serial time / 2 = {ideal:.1f} s; timeouts {result.timeouts})"
        )


if __name__ == "__main__":
    main()
