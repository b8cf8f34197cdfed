"""The demo on a small budget: GRPO and GRPO+KTAE from the shipped tiny base really learn."""

import json

import numpy as np

from ktae_jax import demo


def test_demo_learns_from_the_shipped_base(tmp_path):
    assert demo.main(["--out", str(tmp_path), "--steps", "8", "--held-out", "200"]) == 0
    results = {row["model"]: row for row in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert set(results) == {"base", "GRPO", "GRPO+KTAE"}
    assert (tmp_path / "reward_curves.png").stat().st_size > 10_000
    assert "| GRPO+KTAE |" in (tmp_path / "results.md").read_text()
    for name in ("GRPO", "GRPO+KTAE"):
        metrics = [json.loads(line) for line in (tmp_path / name.lower().replace("+", "_") / "metrics.jsonl").open()]
        rewards = [m["reward/mean"] for m in metrics]
        assert len(rewards) == 8
        # Training reward rises above its start (fixed seed), and the policy moves to the reliable style.
        assert np.mean(rewards[-3:]) > np.mean(rewards[:2]), rewards
        assert results[name]["sampled"]["reliable_share"] > results["base"]["sampled"]["reliable_share"] + 0.05
        assert results[name]["greedy"]["accuracy"] > results["base"]["greedy"]["accuracy"]
    ktae = [json.loads(line) for line in (tmp_path / "grpo_ktae" / "metrics.jsonl").open()]
    # KTAE's strongest positive key tokens include the reliable style's opener ("Sum:" is spelled out).
    positives = "".join(token for step in ktae for token, _ in step["ktae/top_positive"])
    assert "S" in positives or "u" in positives
    # A second run resumes everything: no training step and no evaluation is redone.
    before = (tmp_path / "grpo" / "metrics.jsonl").read_text()
    assert demo.main(["--out", str(tmp_path), "--steps", "8", "--held-out", "200"]) == 0
    assert (tmp_path / "grpo" / "metrics.jsonl").read_text() == before
