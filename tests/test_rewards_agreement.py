"""Agreement with the paper's grader on 1,560 real graded responses (../shared/grader/).

Every response where we disagree must be listed, with the reason, in
tests/data/grader_disagreements.json; an unlisted disagreement (or a listed one that no
longer disagrees) fails, so the list stays the exact account of the differences.
"""

import collections
import json
import pathlib

from ktae_jax.rewards import GraderPool, equivalence

DISAGREEMENTS = pathlib.Path(__file__).parent / "data" / "grader_disagreements.json"


def test_agreement_with_the_papers_grader(shared_dir, monkeypatch):
    with open(shared_dir / "grader" / "grpo_ktae_7b_outputs.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1560
    listed = {d["index"]: d for d in json.loads(DISAGREEMENTS.read_text())["disagreements"]}
    assert all(d["reason"] and d["verdict"] in ("ours right", "known difference") for d in listed.values())

    # A generous wall limit: verdicts depend on the checks' CPU-time limits, not on how busy
    # the machine is; the wall limit (tested in test_rewards_pool) is only the backstop.
    with GraderPool(num_workers=2, timeout_s=30.0) as pool:
        result = pool.grade([r["response"] for r in rows], [r["gt"] for r in rows])

    assert result.timeouts == 0 and result.crashes == 0 and result.errors == 0
    confusion = collections.Counter((int(r["reward"]), int(s)) for r, s in zip(rows, result.scores))
    agreement = (confusion[(0, 0)] + confusion[(1, 1)]) / len(rows)
    print(
        f"\nagreement {agreement:.2%}; paper 1 / ours 1: {confusion[(1, 1)]}, paper 1 / ours 0:"
        f" {confusion[(1, 0)]}, paper 0 / ours 1: {confusion[(0, 1)]}, paper 0 / ours 0:"
        f" {confusion[(0, 0)]}; timeouts {result.timeouts}, {result.wall_s:.1f} s"
    )
    assert agreement >= 0.98

    found = {i for i, (r, s) in enumerate(zip(rows, result.scores)) if s != r["reward"]}
    # A symbolic check that needs more than its CPU-time limit scores 0, in the paper's grader too;
    # on a slower CPU than usual a correct answer's check can run out (row 647, a math-verify check
    # of fractional powers: 1.31 s of CPU on this machine on Dec 2, under 1 s on other days). Such
    # a row must agree when graded again with 3x the limit; any other disagreement fails.
    monkeypatch.setattr(equivalence, "CHECK_TIMEOUT_S", 3 * equivalence.CHECK_TIMEOUT_S)
    slow = {i for i in found - set(listed)  # graded here, on the main thread: the CPU-time limit applies
            if equivalence.grade_response(rows[i]["response"], rows[i]["gt"]) == rows[i]["reward"]}
    if slow:
        print(f"agree only with 3x the CPU-time limit on this machine: {sorted(slow)}")
    found -= slow
    unexplained = sorted(found - set(listed))
    assert not unexplained, [(i, rows[i]["gt"], rows[i]["reward"]) for i in unexplained]
    stale = sorted(set(listed) - found)
    assert not stale, f"listed disagreements that no longer disagree: {stale}"
    for i in found:
        assert listed[i]["ours"] == result.scores[i] and listed[i]["paper"] == rows[i]["reward"]

