"""The KTAE study's bookkeeping (`benchmarks/tiny_study_report.py`, `tiny_ktae_study.load_done`):
paired differences against scipy's paired t test, the merge of per-process files, and --resume.
Cheap: synthetic run records, no model (the study itself is a benchmark, not a test)."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import tiny_ktae_study  # noqa: E402
import tiny_study_report  # noqa: E402


def _run(seed: int, acc: float, curve: list[float], cpu: float = 10.0, **extra) -> dict:
    return {"seed": seed, "curve_steps": [0, 6, 12], "curve": curve, "cpu_s": cpu, "wall_s": cpu,
            "train_reward": [], "final_sampled": {"accuracy": acc, "mean_length": 20.0 + seed, "shortcuts": 0.1},
            **extra}


def _study(runs: dict, cpu: float) -> dict:
    base = {"sampled": {"accuracy": 0.3, "mean_length": 20.0, "shortcuts": 0.5}}
    return {"cpu_s": cpu, "wall_s": cpu, "tasks": {"t": {"base": base, "runs": runs}}}


def test_paired_difference_matches_scipy_paired_t():
    rng = np.random.default_rng(0)
    a, b = rng.random(10), rng.random(10)
    got = tiny_study_report.paired(list(a), list(b))
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert got["n"] == 10
    assert got["mean"] == pytest.approx(float(np.mean(a - b)))
    assert (got["low"], got["high"]) == pytest.approx((ci.low, ci.high))


def test_report_merges_processes_pairs_by_seed_and_writes_summary(tmp_path):
    grpo = [_run(s, 0.4 + 0.01 * s, [0.3, 0.35, 0.4 + 0.01 * s]) for s in range(3)]
    ktae = [_run(s, 0.45 + 0.02 * s, [0.3, 0.4, 0.45 + 0.02 * s]) for s in (2, 1, 0)]  # order must not matter
    sft = [_run(s, 0.2, [], sft_steps=50) for s in (0, 1)]
    first = _study({"GRPO": grpo[:2], "KTAE (released)": ktae, "SFT (same compute)": sft}, cpu=100.0)
    # A second process: seed 2's GRPO, and a repeat of SFT seed 0 that the merge must ignore.
    second = _study({"GRPO": grpo[2:], "SFT (same compute)": [_run(0, 0.9, [], sft_steps=1)]}, cpu=50.0)
    text = tiny_study_report.report([first, second], tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "t.png").stat().st_size > 0 and "150 CPU s" in text
    t = summary["tasks"]["t"]
    assert t["arms"]["GRPO"]["seeds"] == [0, 1, 2] and t["arms"]["SFT (same compute)"]["n"] == 2
    diff = t["paired"]["KTAE (released) - GRPO"]["T=1 acc."]
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(np.mean([0.05, 0.06, 0.07]))
    # AUC: trapezoid over steps 0, 6, 12 divided by 12 = (c0 + 2 c6 + c12) / 4.
    auc = t["paired"]["KTAE (released) - GRPO"]["AUC"]["mean"]
    expected = np.mean([(0.3 + 0.8 + 0.45 + 0.02 * s) / 4 - (0.3 + 0.7 + 0.4 + 0.01 * s) / 4 for s in range(3)])
    assert auc == pytest.approx(expected)
    assert t["paired"]["SFT (same compute) - GRPO"]["T=1 acc."]["mean"] == pytest.approx(np.mean([-0.2, -0.21]))
    assert summary["cpu_s"] == 150.0


def test_resume_lists_done_runs_and_grpo_cpu(tmp_path):
    path = tmp_path / "study.json"
    path.write_text(json.dumps(_study({"GRPO": [_run(3, 0.5, [0.1, 0.2, 0.5], cpu=17.5)],
                                       "KTAE (beta=2)": [_run(4, 0.5, [0.1, 0.2, 0.5])]}, cpu=1.0)))
    done, grpo_cpu = tiny_ktae_study.load_done([str(path)])
    assert done == {("t", "GRPO", 3), ("t", "KTAE (beta=2)", 4)}
    assert grpo_cpu == {("t", 3): 17.5}
    with pytest.raises(SystemExit, match="nope.json"):
        tiny_ktae_study.load_done([str(tmp_path / "nope.json")])
