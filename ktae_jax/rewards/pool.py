"""A pool of grading processes with a hard per-answer time limit enforced from outside.

The trainer keeps one `GraderPool` alive across steps (a worker's start-up, ~2 s of imports,
is paid once). `grade` blocks; `submit` returns a future so grading overlaps device work.

How the limit is kept: each worker streams back one result per item, so the parent always
knows when the item a worker is on began. A worker still on one item `timeout_s` after it
began is killed (SIGKILL: a C-level big-integer loop ignores everything else), the item scores
0 and counts as a timeout, the rest of its chunk goes back to the queue, and a replacement
starts. A worker that dies on its own costs its item the same way (counted as a crash).
No signal is used in the caller's process, so any thread may call `grade`.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

from ktae_jax.rewards.equivalence import reference_candidates

_PACKAGE_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
STARTUP_TIMEOUT_S = 120.0  # imports on a loaded 2-core machine; a hang here is a broken env


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """Scores of one batch, in input order, with what went wrong while grading it."""

    scores: list[float]  # 1.0 correct, 0.0 otherwise (including timeouts and crashes)
    timeouts: int  # items whose worker was killed at the time limit
    crashes: int  # items whose worker died by itself
    errors: int  # items whose grading raised (a grader bug; scored 0)
    no_answer: int  # responses without a boxed answer
    wall_s: float  # time `grade` took
    timed_out: tuple[int, ...] = ()  # indices of the timed-out items
    crashed: tuple[int, ...] = ()  # indices of the items whose worker died

    def metrics(self) -> dict[str, float]:
        n = max(len(self.scores), 1)
        return {
            "reward/accuracy": sum(self.scores) / n,
            "reward/timeouts": float(self.timeouts),
            "reward/crashes": float(self.crashes),
            "reward/errors": float(self.errors),
            "reward/no_answer_frac": self.no_answer / n,
            "reward/grade_s": self.wall_s,
        }


class _Worker:
    """One worker process and the items it holds (the head of `inflight` is being graded)."""

    def __init__(self, environ: dict[str, str]) -> None:
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        env = dict(environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        # Workers do no linear algebra worth threads; keep them to one each.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ktae_jax.rewards.worker", str(p2c_r), str(c2p_w)],
            pass_fds=(p2c_r, c2p_w),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        os.close(p2c_r)
        os.close(c2p_w)
        self.outbox = Connection(p2c_w, readable=False)
        self.inbox = Connection(c2p_r, writable=False)
        self.ready = False
        self.started = time.monotonic()
        self.inflight: collections.deque[int] = collections.deque()
        self.item_started = 0.0

    def send(self, chunk: list[tuple[int, str, list[str]]]) -> None:
        self.outbox.send(("grade", chunk))
        self.inflight.extend(i for i, _, _ in chunk)
        self.item_started = time.monotonic()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for conn in (self.inbox, self.outbox):
            conn.close()

    def stop(self) -> None:
        try:
            self.outbox.send(("stop",))
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class GraderPool:
    """`num_workers` grading processes; `grade(responses, references) -> GradeResult`."""

    def __init__(self, num_workers: int | None = None, timeout_s: float = 5.0) -> None:
        num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self.restarts = 0  # workers replaced over the pool's life
        # Replacements start with the environment the pool was made with.
        self._environ = dict(os.environ)
        # A forked child (e.g. a data-loader process) inherits this object; only the process
        # that started the workers may stop them.
        self._owner_pid = os.getpid()
        self._workers = [_Worker(self._environ) for _ in range(num_workers)]

    # ------------------------------------------------------------ public API

    def grade(self, responses: Sequence[str], references: Sequence[object]) -> GradeResult:
        """Grade `responses[i]` against `references[i]`; blocks until every item has a score."""
        items = _validated_items(responses, references)
        with self._lock:
            if self._closed:
                raise RuntimeError("GraderPool.grade called after close()")
            return self._run(items)

    def submit(
        self, responses: Sequence[str], references: Sequence[object]
    ) -> concurrent.futures.Future[GradeResult]:
        """`grade` in a background thread; `.result()` gives the `GradeResult`."""
        items = _validated_items(responses, references)  # bad input fails here, not later
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, "grader-pool")
        return self._executor.submit(self._locked_run, items)

    def close(self) -> None:
        if self._closed or os.getpid() != self._owner_pid:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        with self._lock:
            for w in self._workers:
                w.stop()
            self._workers = []

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if os.getpid() != self._owner_pid:
                return
            for w in getattr(self, "_workers", []):
                w.kill()
        except Exception:
            pass

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    # ------------------------------------------------------------ scheduling

    def _locked_run(self, items: list[tuple[int, str, list[str]]]) -> GradeResult:
        with self._lock:
            return self._run(items)

    def _run(self, items: list[tuple[int, str, list[str]]]) -> GradeResult:
        try:
            return self._schedule(items)
        except BaseException:
            # An aborted batch (start-up failure, Ctrl-C) must not leave items of its own in
            # flight, or the next batch would receive their results.
            for w in list(self._workers):
                if w.inflight:
                    w.inflight.clear()
                    self._replace(w)
            raise

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self._environ)
        self.restarts += 1

    def _schedule(self, items: list[tuple[int, str, list[str]]]) -> GradeResult:
        batch = _Batch(items)
        while batch.remaining:
            self._assign(batch)
            ready = self._wait()
            self._collect(batch, ready)
            self._enforce(batch)
        return batch.result()

    def _assign(self, batch: _Batch) -> None:
        """ASSIGN: idle ready workers take a chunk; small chunks keep the tail short."""
        chunk_size = max(1, min(16, -(-len(batch.queue) // (4 * self.num_workers))))
        for w in self._workers:
            if w.ready and not w.inflight and batch.queue:
                chunk = [batch.queue.popleft() for _ in range(min(chunk_size, len(batch.queue)))]
                try:
                    w.send(chunk)
                except OSError:  # died while idle: requeue, replace
                    w.inflight.clear()
                    batch.queue.extendleft(reversed(chunk))
                    self._replace(w)

    def _wait(self) -> list[object]:
        """WAIT: until a message arrives or the earliest deadline passes; the inboxes ready to read."""
        now = time.monotonic()
        deadlines = [w.item_started + self.timeout_s for w in self._workers if w.inflight]
        deadlines += [w.started + STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
        wait_s = max(0.0, min(deadlines) - now) if deadlines else None
        return wait([w.inbox for w in self._workers], timeout=wait_s)

    def _collect(self, batch: _Batch, ready: list[object]) -> None:
        """COLLECT: results stream in one per item; a worker that died costs its current item."""
        for w in list(self._workers):
            if w.inbox not in ready:
                continue
            try:
                while w.inbox.poll():
                    message = w.inbox.recv()
                    if message[0] == "ready":
                        w.ready, batch.failed_starts = True, 0
                        continue
                    _, index, score, status = message
                    head = w.inflight.popleft()
                    if head != index:
                        raise RuntimeError(f"worker answered item {index}, expected {head}")
                    batch.record(index, score, status)
                    w.item_started = time.monotonic()
            except (EOFError, OSError):
                if not w.ready:
                    batch.failed_starts += 1
                    if batch.failed_starts > 2 * self.num_workers:
                        raise RuntimeError(
                            "grading workers exit during start-up (see their stderr above);"
                            f" command: {w.proc.args}"
                        ) from None
                self._fail_head(batch, w, "crash")

    def _enforce(self, batch: _Batch) -> None:
        """ENFORCE: kill whatever ran past its limit."""
        now = time.monotonic()
        for w in list(self._workers):
            if w.inflight and now - w.item_started > self.timeout_s:
                self._fail_head(batch, w, "timeout")
            elif not w.ready and now - w.started > STARTUP_TIMEOUT_S:
                raise RuntimeError(
                    f"a grading worker did not start within {STARTUP_TIMEOUT_S:.0f} s"
                )

    def _fail_head(self, batch: _Batch, w: _Worker, status: str) -> None:
        """The worker's current item scores 0 with `status`; the rest are re-queued; `w` is replaced."""
        if w.inflight:
            batch.record(w.inflight.popleft(), 0.0, status)
            batch.queue.extendleft(batch.items[i] for i in reversed(w.inflight))
            w.inflight.clear()
        self._replace(w)


class _Batch:
    """One `grade` call's state: a score and a status per item, the items not yet sent to a worker."""

    def __init__(self, items: list[tuple[int, str, list[str]]]) -> None:
        self.t0 = time.monotonic()
        self.items = items
        self.scores = [0.0] * len(items)
        self.statuses: list[str | None] = [None] * len(items)
        self.queue = collections.deque(items)
        self.remaining = len(items)
        self.failed_starts = 0  # workers in a row that died before they were ready

    def record(self, index: int, score: float, status: str | None) -> None:
        self.scores[index], self.statuses[index] = score, status
        self.remaining -= 1

    def result(self) -> GradeResult:
        statuses = self.statuses
        timed_out = tuple(i for i, s in enumerate(statuses) if s == "timeout")
        crashed = tuple(i for i, s in enumerate(statuses) if s == "crash")
        return GradeResult(
            scores=self.scores,
            timeouts=len(timed_out),
            crashes=len(crashed),
            errors=sum(s is not None and s.startswith("error") for s in statuses),
            no_answer=sum(s == "no_answer" for s in statuses),
            wall_s=time.monotonic() - self.t0,
            timed_out=timed_out,
            crashed=crashed,
        )


def _validated_items(
    responses: Sequence[str], references: Sequence[object]
) -> list[tuple[int, str, list[str]]]:
    """(index, response, accepted answers) per item; wrong types fail here, naming the item."""
    if isinstance(responses, str) or isinstance(references, str):
        raise TypeError("responses and references must be sequences (one per item), not a str")
    if len(responses) != len(references):
        raise ValueError(
            f"got {len(responses)} responses but {len(references)} references; need one each"
        )
    items = []
    for i, (response, reference) in enumerate(zip(responses, references)):
        if not isinstance(response, str):
            raise TypeError(f"responses[{i}] must be a str, got {type(response).__name__}")
        try:
            candidates = reference_candidates(reference)
        except TypeError as exc:
            raise TypeError(f"references[{i}]: {exc}") from None
        items.append((i, response, candidates))
    return items


# ------------------------------------------------------------ one-call entry point

_shared: GraderPool | None = None
_shared_lock = threading.Lock()


def shared_pool(num_workers: int | None = None, timeout_s: float = 5.0) -> GraderPool:
    """A process-wide pool, kept between calls and rebuilt when its settings change."""
    global _shared
    with _shared_lock:
        want = (os.cpu_count() or 1) if num_workers is None else num_workers
        if _shared is None or (_shared.num_workers, _shared.timeout_s) != (want, timeout_s):
            if _shared is not None:
                _shared.close()
            _shared = GraderPool(want, timeout_s)
        return _shared


def grade_batch(
    responses: Sequence[str],
    references: Sequence[object],
    *,
    timeout_s: float = 5.0,
    num_workers: int | None = None,
) -> list[float]:
    """1.0 (correct) or 0.0 per response, in order; each answer graded within `timeout_s`."""
    return shared_pool(num_workers, timeout_s).grade(responses, references).scores


def _close_shared() -> None:
    if _shared is not None:
        _shared.close()


atexit.register(_close_shared)
