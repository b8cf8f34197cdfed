"""A grading worker process: `python -m ktae_jax.rewards.worker READ_FD WRITE_FD`.

Started by `pool.GraderPool` as a fresh interpreter (spawned, never forked: the trainer's
process holds jax threads, and math-verify's own timeouts need SIGALRM on the main thread,
which here is the worker's). Messages are pickled over two pipes:

    parent -> worker: ("grade", [(index, response, reference_candidates), ...]) | ("stop",)
    worker -> parent: ("ready", pid) once, then ("done", index, score, status) per item

The parent times every item and kills a worker that overruns; nothing here has to be trusted
to return.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from multiprocessing.connection import Connection


def _warm_up() -> None:
    """Pay the lazy imports (sympy, the ANTLR LaTeX parser) before reporting ready."""
    from ktae_jax.rewards.equivalence import grade_response

    grade_response("so \\boxed{\\frac{1}{2}}", ["0.5"])
    grade_response("so \\boxed{x^2+1}", ["1+x^{2}"])


# Fault injection for the pool's tests (off unless this variable is set): with "1", a response
# holding HANG_MARKER blocks every signal and sleeps, as a C-level loop would, and CRASH_MARKER
# exits; with "fail-start", the worker exits before it is ready (a broken environment).
FAULTS_ENV = "KTAE_GRADER_FAULTS"
HANG_MARKER = "<<grader-test-hang>>"
CRASH_MARKER = "<<grader-test-crash>>"


def _inject_fault(response: str) -> None:
    if HANG_MARKER in response:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
        time.sleep(3600)
    if CRASH_MARKER in response:
        os._exit(3)


def serve(inbox: Connection, outbox: Connection) -> None:
    from ktae_jax.rewards.equivalence import answer_matches_any
    from ktae_jax.rewards.extract import clean_text, extract_boxed

    faults = os.environ.get(FAULTS_ENV) == "1"
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if message[0] == "stop":
            return
        for index, response, candidates in message[1]:
            if faults:
                _inject_fault(response)
            try:
                answer = extract_boxed(clean_text(response))
                if answer is None:
                    score, status = 0.0, "no_answer"
                else:
                    score = float(answer_matches_any(answer, candidates))
                    status = "ok"
            except Exception as exc:  # a grader bug must cost one item, not the pool
                score, status = 0.0, f"error: {type(exc).__name__}: {exc}"[:300]
            outbox.send(("done", index, score, status))


def main(argv: list[str]) -> None:
    # Ctrl-C in the trainer reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get(FAULTS_ENV) == "fail-start":
        sys.exit(2)
    inbox = Connection(int(argv[1]), writable=False)
    outbox = Connection(int(argv[2]), readable=False)
    _warm_up()
    serve(inbox, outbox)


if __name__ == "__main__":
    main(sys.argv)
