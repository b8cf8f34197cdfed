"""The grading pool: bounded time on adversarial input, hung and killed workers, API contract."""

import json
import os
import signal
import time

import pytest

from ktae_jax.rewards import GraderPool, grade_batch
from ktae_jax.rewards.worker import CRASH_MARKER, FAULTS_ENV, HANG_MARKER

TIMEOUT_S = 2.0

ADVERSARIAL = [
    (r"so \boxed{9^{9^{9^{9}}}}", "3", 0.0),  # power tower: value has ~10^(3.7e8) digits
    (r"\boxed{10^{10^{100}}!}", "3", 0.0),  # factorial of a googolplex
    (r"\boxed{9^{999999999}}", "3", 0.0),  # one huge exponent
    ("x" * 1_000_000 + r" \boxed{3}", "3", 1.0),  # a 1 MB response still has its answer
    (r"\boxed{" * 5000 + "3", "3", 0.0),  # unbalanced braces
    ("}" * 5000 + r"\boxed{3}}}}", "3", 1.0),
    ("\\boxed{3\x00\x01\x1b\x7f}", "3", 1.0),  # NUL and control characters are dropped
    ("\\boxed{\ud800\udfff 3}", "3", 1.0),  # lone surrogates (non-UTF-8 text) are dropped
    ("\\boxed{" + r"\frac{1}{" * 300 + "2" + "}" * 300 + "}", "3", 0.0),  # deep fractions
    ("\\boxed{" + r"\frac{1}{" * 10 + "2" + "}" * 10 + "}", "1024", 0.0),  # moderately deep
    ("\\boxed{" + "(" * 2000 + "1" + ")" * 2000 + "}", "1", 0.0),  # deep parentheses
    (r"\boxed{" + "1+" * 20_000 + "1}", "20001", 0.0),  # a very long sum
    ("\\boxed{" + "x" * 100_000 + "}", "x", 0.0),
    (r"\boxed{\frac{1}{0}}", "0", 0.0),  # division by zero
    (r"\boxed{\sqrt{-1}^{\sqrt{-1}}}", "1", 0.0),
    (r"\boxed{3}", "3", 1.0),
]


@pytest.fixture(scope="module")
def pool():
    # Fault injection only for this module's pool (workers read the variable at start).
    os.environ[FAULTS_ENV] = "1"
    try:
        p = GraderPool(num_workers=2, timeout_s=TIMEOUT_S)
    finally:
        del os.environ[FAULTS_ENV]
    p.grade([r"\boxed{1}"], ["1"])  # wait for start-up outside the timed tests
    yield p
    p.close()


def test_adversarial_inputs_are_graded_in_bounded_time(pool):
    responses, refs, expected = zip(*ADVERSARIAL)
    t0 = time.monotonic()
    result = pool.grade(list(responses), list(refs))
    wall = time.monotonic() - t0
    assert result.scores == list(expected)
    assert result.crashes == 0 and result.errors == 0
    # Every item ends within its limit (+1 s); with 2 workers the batch as a whole does too
    # unless several items each run to the limit, which the screens are there to prevent.
    assert result.timeouts == 0, result.timed_out
    assert wall < TIMEOUT_S + 1.0, wall


def test_hung_worker_is_killed_and_replaced(pool):
    responses = [rf"\boxed{{{k}}}" for k in range(20)]
    responses[7] = HANG_MARKER + r" \boxed{7}"
    pids_before = set(pool.worker_pids())
    t0 = time.monotonic()
    result = pool.grade(responses, [str(k) for k in range(20)])
    wall = time.monotonic() - t0
    assert result.timed_out == (7,) and result.timeouts == 1
    assert result.scores == [0.0 if k == 7 else 1.0 for k in range(20)]
    assert wall < TIMEOUT_S + 1.0, wall  # the hung item costs its limit, not more
    assert len(set(pool.worker_pids()) - pids_before) == 1  # exactly one replacement
    # The replacement works.
    assert pool.grade([r"\boxed{2}"] * 4, ["2"] * 4).scores == [1.0] * 4


def test_two_hangs_in_one_batch(pool):
    responses = [HANG_MARKER, r"\boxed{1}", HANG_MARKER, r"\boxed{1}", r"\boxed{2}"]
    t0 = time.monotonic()
    result = pool.grade(responses, ["1"] * 5)
    assert result.timed_out == (0, 2)
    assert result.scores == [0.0, 1.0, 0.0, 1.0, 0.0]
    # Both workers hang at once, so both limits overlap; then a replacement must start.
    assert time.monotonic() - t0 < TIMEOUT_S + 1.0 + 30.0


def test_crashing_worker_costs_one_item(pool):
    responses = [r"\boxed{1}"] * 6 + [CRASH_MARKER] + [r"\boxed{1}"] * 6
    result = pool.grade(responses, ["1"] * 13)
    assert result.crashed == (6,) and result.crashes == 1 and result.timeouts == 0
    assert result.scores == [1.0] * 6 + [0.0] + [1.0] * 6


def _real_rows(shared_dir, n):
    path = shared_dir / "grader" / "grpo_ktae_7b_outputs.jsonl"
    with open(path) as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return rows


def test_worker_killed_mid_batch_from_outside(pool, shared_dir):
    rows = _real_rows(shared_dir, 300)  # no known disagreement among the first 600
    # A hung first item keeps the batch running past its 2 s limit, so the kill below
    # lands mid-batch however fast the machine is.
    responses = [HANG_MARKER] + [r["response"] for r in rows]
    future = pool.submit(responses, ["0"] + [r["gt"] for r in rows])
    time.sleep(0.5)
    victim = pool.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    result = future.result(timeout=120)
    assert victim not in pool.worker_pids()  # noticed during the batch and replaced
    assert result.scores[0] == 0.0 and 0 in result.timed_out + result.crashed
    assert result.crashes <= 1  # the item the victim held
    for i, row in enumerate(rows, start=1):
        if i not in result.crashed:
            assert result.scores[i] == row["reward"], (i, row["gt"])


def test_grading_from_a_jax_process_on_any_thread(pool):
    import threading

    import jax
    import jax.numpy as jnp

    assert float(jax.jit(lambda x: x * 2)(jnp.float32(2))) == 4.0  # jax is live here
    out = {}
    thread = threading.Thread(
        target=lambda: out.setdefault("r", pool.grade([r"\boxed{\frac12}"], ["0.5"]))
    )
    thread.start()
    thread.join(60)
    assert out["r"].scores == [1.0]


def test_grade_batch_keeps_order_and_reuses_its_pool():
    responses = [rf"\boxed{{{k}}}" for k in range(12)]
    refs = [str(k if k % 3 else k + 1) for k in range(12)]
    assert grade_batch(responses, refs, num_workers=1) == [float(k % 3 != 0) for k in range(12)]
    from ktae_jax.rewards import shared_pool

    first = shared_pool(1, 5.0)
    assert grade_batch([r"\boxed{x}"], ["x"], num_workers=1) == [1.0]
    assert shared_pool(1, 5.0) is first
    assert grade_batch([], [], num_workers=1) == []
    first.close()


def test_bad_batches_name_the_problem(pool):
    with pytest.raises(ValueError, match="2 responses but 1 references"):
        pool.grade(["a", "b"], ["1"])
    with pytest.raises(TypeError, match=r"responses\[1\] must be a str"):
        pool.grade(["a", b"b"], ["1", "2"])
    with pytest.raises(TypeError, match=r"references\[0\].*dict"):
        pool.grade(["a"], [{"x": 1}])
    with pytest.raises(ValueError, match="num_workers"):
        GraderPool(num_workers=0)


def test_closed_pool_refuses_work():
    p = GraderPool(num_workers=1, timeout_s=1.0)
    p.close()
    with pytest.raises(RuntimeError, match="after close"):
        p.grade([r"\boxed{1}"], ["1"])


def test_workers_that_cannot_start_give_a_clear_error(monkeypatch):
    monkeypatch.setenv(FAULTS_ENV, "fail-start")
    p = GraderPool(num_workers=1, timeout_s=1.0)
    try:
        with pytest.raises(RuntimeError, match="exit during start-up"):
            p.grade([r"\boxed{1}"], ["1"])
    finally:
        p.close()


# The child only closes the pool and exits, so jax's threads (a fork hazard) are never used.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_a_forked_child_cannot_stop_the_pool(pool):
    pid = os.fork()
    if pid == 0:  # e.g. a data-loader process holding a copy of the trainer's objects
        pool.close()
        pool.__del__()
        os._exit(0)
    os.waitpid(pid, 0)
    assert pool.grade([r"\boxed{1}"] * 3, ["1"] * 3).scores == [1.0] * 3
