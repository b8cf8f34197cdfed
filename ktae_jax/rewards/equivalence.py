"""Is a model's answer equivalent to the reference? The paper's three checks, any one suffices.

1. String equality after MATH normalisation (`normalize.math_normalize`).
2. Sympy equality after PRM800K normalisation: tuples compared element-wise (same brackets,
   same length); two plain fractions must match exactly (an unreduced `2/4` is not `1/2`);
   an integer only equals an integer; otherwise `simplify(a - b) == 0`.
3. math-verify's equivalence of the two parsed answers (numbers to 6 decimals, intervals,
   sets, matrices, percentages, units, equations `x = 3` vs `3`).

Beyond the paper: `4.4e7` is read as scientific notation (math-verify takes `e` for Euler's
number), `a = -2, b = -2` gives its values, ordinals and arc-second marks are dropped, and two
plain numbers must also agree to a relative 1e-5 (math-verify's 6-decimal rounding makes any
two numbers below 5e-7 equal). tests/data/grader_disagreements.json lists what this changes.

Each symbolic check runs under a 1 s CPU-time limit where a signal timer is available (the
main thread of a worker process); the worker pool's hard wall-clock limit bounds the rest.
Answers that the cheap screens in `guard` flag are compared as normalised strings only.

References come as datasets store them: a string, a number, a (nested) list of those, or a
string holding a Python list of strings; matching any element counts.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import logging
import math
import numbers
import re
import signal
import threading
import time
from collections.abc import Iterator

from ktae_jax.rewards.extract import clean_text, extract_boxed
from ktae_jax.rewards.guard import unsafe_to_evaluate
from ktae_jax.rewards.normalize import (
    is_frac_str,
    is_int_str,
    math_normalize,
    prm_normalize,
    split_tuple,
)

CHECK_TIMEOUT_S = 1.0  # per symbolic check, as in the paper's grader

for _name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


class CheckTimeout(BaseException):
    """A symbolic check ran past `CHECK_TIMEOUT_S` (a BaseException: libraries that catch
    Exception and carry on must not swallow it)."""


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Limit on the calling thread's CPU time, on the main thread; elsewhere a no-op.

    CPU time, not wall time, so a verdict does not depend on how busy the machine is; the
    worker pool's wall-clock kill bounds the rest (C code that never yields to a signal).
    The process's profiling timer (SIGPROF) wakes the check up; only this thread's own CPU
    time (`time.thread_time`) decides. That matters where other threads run, and where other
    code sends SIGPROF too: libtpu, once loaded (`--compile-only` for a TPU target), runs a
    100 Hz CPU profiler on SIGPROF.
    """
    if not _on_main_thread() or seconds <= 0:
        yield
        return

    # Python runs a handler at the next bytecode boundary, which may fall after the window
    # closed: the handler acts only while its window is open, and the window closes (one store)
    # before anything is undone, so a late signal neither escapes into unrelated code nor skips
    # the restoring below.
    window = {"open": True}
    start = time.thread_time()

    def _on_sigprof(signum, frame):
        if not window["open"]:
            return
        remaining = seconds - (time.thread_time() - start)
        if remaining > 0:  # another thread's CPU time or another sender: wait for ours
            signal.setitimer(signal.ITIMER_PROF, max(remaining, 0.005))
            return
        window["open"] = False
        raise CheckTimeout

    previous = signal.signal(signal.SIGPROF, _on_sigprof)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        window["open"] = False
        signal.setitimer(signal.ITIMER_PROF, 0)
        # SIG_DFL ends the process on a SIGPROF; Python reports it for a handler installed from C
        # (libtpu's profiler) as well, and restoring it would let that profiler's next signal kill
        # the process ("Profiling timer expired"). Such signals are ignored instead.
        signal.signal(signal.SIGPROF, signal.SIG_IGN if previous in (signal.SIG_DFL, None) else previous)


# ---------------------------------------------------------------- references


def _number_to_str(x: numbers.Number) -> str:
    if isinstance(x, numbers.Integral):
        return str(int(x))
    f = float(x)
    if math.isfinite(f) and f == int(f) and abs(f) < 1e16:
        return str(int(f))
    return repr(f)


def reference_candidates(reference: object) -> list[str]:
    """All accepted answers in a reference as stored by a dataset (flattened, as strings)."""
    if reference is None:
        return []
    if isinstance(reference, bool):
        raise TypeError(f"reference answer must be a string, number or list, got bool {reference}")
    if isinstance(reference, numbers.Number):
        return [_number_to_str(reference)]
    if isinstance(reference, str):
        s = reference.strip()
        # "['a', 'b']" is a Python list of strings; "[1, 2]" stays a closed interval.
        if s.startswith("[") and s.endswith("]") and ("'" in s or '"' in s):
            try:
                value = ast.literal_eval(s)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                value = None
            if isinstance(value, list):
                return reference_candidates(value)
        return [s]
    if isinstance(reference, (list, tuple)):
        return [c for item in reference for c in reference_candidates(item)]
    if hasattr(reference, "tolist"):  # numpy arrays and scalars
        return reference_candidates(reference.tolist())
    raise TypeError(
        f"reference answer must be a string, number or list, got {type(reference).__name__}"
    )


# ---------------------------------------------------------------- check 2: sympy


def _allow_eval(s: str) -> bool:
    """PRM800K's screen: few unknowns, no nested or large exponents (else sympy may crawl)."""
    plain = re.sub(r"\\[a-zA-Z]+", "", s).replace("{", "").replace("}", "")
    letters = {c for c in plain.replace("sqrt", "").replace("frac", "") if c.isalpha()}
    if len(letters) > 2:
        return False
    return re.search(r"\^[0-9]+\^|\^[0-9][0-9]+|\^\(", plain) is None


def _to_sympy(s: str):
    from sympy.parsing import sympy_parser as sp

    if "\\" in s:
        from latex2sympy2_extended import latex2sympy

        return latex2sympy(s)
    transforms = sp.standard_transformations + (sp.implicit_multiplication_application,)
    plain = s.replace("^", "**").replace("{", "(").replace("}", ")")
    return sp.parse_expr(plain, transformations=transforms, evaluate=True)


@functools.cache
def _warm_up() -> None:
    """Import and exercise the symbolic libraries once, outside any time limit. Their first use in a
    process (lazy imports, parser tables, sympy's caches) cost ~0.6 s of CPU here, and up to the
    whole `CHECK_TIMEOUT_S` on a busy machine: the first symbolic check of a process (a grader
    worker's first response) was then cut short and a correct answer scored 0."""
    import sympy
    from latex2sympy2_extended import latex2sympy
    from math_verify import verify

    sympy.simplify(latex2sympy(r"\frac{1}{2}(e^{x} + e^{-x})") - sympy.cosh(sympy.Symbol("x")))
    verify(_math_verify_parse(r"\frac{1}{2}"), _math_verify_parse("0.5"), timeout_seconds=None)


def _sympy_zero_difference(a: str, b: str) -> bool:
    if not (_allow_eval(a) and _allow_eval(b)):
        return False
    import sympy

    _warm_up()
    try:
        with _time_limit(CHECK_TIMEOUT_S):
            diff = sympy.simplify(_to_sympy(a) - _to_sympy(b))
            return bool(diff == 0)
    except (CheckTimeout, Exception):
        return False


def sympy_equal(answer: str, reference: str) -> bool:
    """Check 2: PRM800K-normalised element-wise sympy equality."""
    gt, given = prm_normalize(reference), prm_normalize(answer)
    if gt is None or given is None:
        return False
    if gt == given:
        return True
    if not given or not gt:
        return False
    gt_elems, given_elems = split_tuple(gt), split_tuple(given)
    if len(gt_elems) > 1 and (gt[0] != given[0] or gt[-1] != given[-1]):
        return False  # (1,2) vs [1,2]: different intervals
    if len(gt_elems) != len(given_elems):
        return False
    for g, a in zip(gt_elems, given_elems):
        if is_frac_str(g) and is_frac_str(a):
            ok = g == a  # the reference's unreduced form is the requested one
        elif is_int_str(g) != is_int_str(a):
            ok = False  # `3` and `3.0`: an integer answer must be written as one
        else:
            ok = _sympy_zero_difference(g, a)
        if not ok:
            return False
    return True


# ---------------------------------------------------------------- check 3: math-verify


def _math_verify_parse(s: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if "$" not in s:
        s = f"${s}$"
    return parse(
        s,
        extraction_config=(LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()),
        fallback_mode="no_fallback",
        extraction_mode="first_match",
        parsing_timeout=None,
    )


NUMERIC_RTOL = 1e-5


def _real_value(x: object) -> float | None:
    """The value of a plain real number (no percent sign, no free symbols), else None."""
    import sympy

    if not isinstance(x, sympy.Basic) or not x.is_number or x.has(sympy.UnevaluatedExpr):
        return None
    try:
        v = complex(sympy.N(x, 20))
    except (TypeError, ValueError, OverflowError):
        return None
    return v.real if v.imag == 0 and math.isfinite(v.real) else None


def math_verify_equal(answer: str, reference: str) -> bool:
    """Check 3: math-verify's equivalence, under our CPU-time limit (its own SIGALRM is off).

    math-verify rounds floats to 6 decimals, so `5.11e-19` "equals" `2.88e-19`; for two
    plain real numbers we also require agreement to a relative `NUMERIC_RTOL`.
    """
    from math_verify import verify

    _warm_up()
    try:
        with _time_limit(CHECK_TIMEOUT_S):
            gold = _math_verify_parse(reference)
            pred = _math_verify_parse(answer)
            if not gold or not pred or not verify(gold, pred, timeout_seconds=None):
                return False
            g, p = _real_value(gold[0]), _real_value(pred[0])
            if g is not None and p is not None:
                return abs(g - p) <= NUMERIC_RTOL * max(abs(g), abs(p))
            return True
    except (CheckTimeout, Exception):
        return False


# ---------------------------------------------------------------- extra normal forms

_SCI_FLOAT = re.compile(r"([-+]?\d+(?:\.\d*)?)[eE]([-+]?\d+)")
_ASSIGNMENT = re.compile(r"^\s*[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?P<value>[^=]+)$")


def _latex_scientific(s: str) -> str:
    """`4.4e7` -> `4.4 \\times 10^{7}`: math-verify reads the `e` as Euler's number."""
    m = _SCI_FLOAT.fullmatch(s.strip())
    return f"{m.group(1)} \\times 10^{{{m.group(2)}}}" if m else s


def _assignment_values(s: str) -> str:
    """`a = -2, b = -2` -> `-2, -2` (each element of a comma list named by a variable)."""
    parts = s.split(",")
    values = [_ASSIGNMENT.match(p) for p in parts]
    if len(parts) < 2 or not all(values):
        return s
    return ", ".join(m.group("value").strip() for m in values)


# ---------------------------------------------------------------- entry points


def _prepared(answer: str, reference: str) -> tuple[str, str] | None:
    """The pair in the forms the checks compare, or None when one side is empty."""
    answer, reference = clean_text(answer).strip(), clean_text(reference).strip()
    if "\\boxed" in reference or "\\fbox" in reference:
        reference = extract_boxed(reference) or reference  # a stored full solution
    if not answer or not reference:
        return None
    answer, reference = _latex_scientific(answer), _latex_scientific(reference)
    if "=" not in reference:
        answer = _assignment_values(answer)
    return answer, reference


def _string_match(answer: str, reference: str) -> bool:
    """Check 1 (and, for screened answers, the PRM800K normal form too): no evaluation."""
    norm_answer = math_normalize(answer)
    if norm_answer is not None and norm_answer == math_normalize(reference):
        return True
    if unsafe_to_evaluate(answer) or unsafe_to_evaluate(reference):
        return prm_normalize(answer) == prm_normalize(reference)
    return False


def _symbolic_match(answer: str, reference: str) -> bool:
    """Checks 2 and 3, for answers the screens let through."""
    if unsafe_to_evaluate(answer) or unsafe_to_evaluate(reference):
        return False
    return sympy_equal(answer, reference) or math_verify_equal(answer, reference)


def answer_matches_any(answer: str, references: list[str]) -> bool:
    """Whether an extracted answer matches any reference string.

    Cheap string checks run for every reference before any symbolic one, and duplicates
    (references often repeat with only a trailing newline changed) are checked once.
    """
    pairs = [p for p in dict.fromkeys(_prepared(answer, r) for r in references) if p]
    return any(_string_match(*p) for p in pairs) or any(_symbolic_match(*p) for p in pairs)


def grade_response(response: str, reference: object) -> float:
    """1.0 when the last boxed answer of `response` matches any reference answer, else 0.0."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}")
    answer = extract_boxed(clean_text(response))
    if answer is None:
        return 0.0
    return float(answer_matches_any(answer, reference_candidates(reference)))
