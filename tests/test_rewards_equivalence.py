"""Answer extraction and equivalence: hand-written cases, each with the reason for its verdict."""

import pytest

from ktae_jax.rewards import answer_matches_any, extract_boxed, grade_response
from ktae_jax.rewards.equivalence import reference_candidates
from ktae_jax.rewards.guard import unsafe_to_evaluate
from ktae_jax.rewards.normalize import math_normalize


def answers_equivalent(answer: str, reference: str) -> bool:
    """One extracted answer against one reference string (any of the grader's three checks)."""
    return answer_matches_any(answer, [reference])


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{3}", "3"),
        (r"\boxed{1} then \boxed{2}", "2"),  # the last box wins
        (r"\boxed{\frac{1}{2}}.", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not grouping
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),  # unbalanced escaped brace
        (r"\fbox{7}", "7"),
        (r"\boxed{1} and \fbox{8}", "8"),
        (r"the answer is $\boxed 5$.", "5"),  # TeX's brace-less argument
        (r"\boxed {x+1}", "x+1"),
        ("no box here", None),
        (r"truncated \boxed{\frac{1}{2", None),  # an unclosed last box is no answer
        (r"\boxed{}", ""),
        (r"\boxed{4} \boxedsomething", "4"),  # another macro, not a box
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_in_a_megabyte_is_fast():
    import time

    text = "x" * 1_000_000 + r"\boxed{42}" + "y" * 1000
    t0 = time.perf_counter()
    assert extract_boxed(text) == "42"
    assert extract_boxed("{" * 1_000_000 + r"\boxed{" + "{" * 100_000) is None
    assert time.perf_counter() - t0 < 1.0


# ---------------------------------------------------------------- equivalence

EQUAL = [
    ("1/2", r"\frac{1}{2}", "a/b is written as a fraction"),
    (r"\dfrac{1}{2}", r"\frac12", "dfrac and brace-less frac arguments"),
    ("0.5", r"\frac{1}{2}", "decimal equal to the fraction"),
    (r"x = 3", "3", "a variable assignment names the value"),
    (r"10^\circ", "10", "degrees are a unit"),
    (r"5 \text{ cm}", "5", "a trailing unit"),
    (r"50\%", "50", "a percent sign"),
    (r"\$18.90", "18.90", "a dollar sign"),
    ("1,000", "1000", "thousands separator"),
    (r"\sqrt{8}", r"2\sqrt{2}", "symbolic: sqrt(8) = 2 sqrt(2)"),
    (r"(x+1)^2", r"x^2+2x+1", "symbolic: polynomial identity"),
    (r"\cosh(at)", r"\frac{1}{2}(e^{at} + e^{-at})", "symbolic: definition of cosh"),
    (r"(1, 2)", r"(1,2)", "tuple, spacing"),
    (r"[-1, \frac{3}{2})", r"[-1, 1.5)", "half-open interval, element-wise"),
    (r"\{3, 1, 2\}", r"\{1,2,3\}", "set order does not matter"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", "matrix"),
    ("4.4e7", r"4.4 \times 10^7", "scientific notation, e not Euler's number"),
    (r"12^{\text{th}}", "12", "an ordinal suffix"),
    (r"0.003^{\prime\prime}", "0.003", "arc seconds are a unit"),
    ("a = -2, b = -2", "-2,-2", "a list of assignments names the values"),
    (r"\frac{1}{3}", "0.333333", "math-verify: 6 decimals of a repeating fraction"),
    (r"\text{(B)}", r"\text{(B)}", "identical strings"),
    ("2/4", r"\frac{1}{2}", "same value: math-verify accepts what the exact-fraction rule refuses"),
]

NOT_EQUAL = [
    ("2/3", r"\frac{3}{2}", "a fraction is not its reciprocal"),
    ("3", "4", "different integers"),
    ("5.11 \\times 10^{-19}", "2.88 \\times 10^{-19}", "tiny numbers differing in value"),
    ("4.57 \\times 10^{-24}", "4.6 \\times 10^{-24}", "3 significant figures differ"),
    ("(1, 2)", "[1, 2]", "open and closed intervals differ"),
    ("(1, 2, 3)", "(1, 2)", "tuples of different lengths"),
    ("x^2", "x^3", "different polynomials"),
    ("E_1", r"E_1 \text{ and } E_2", "a part of a compound answer is not the answer"),
    (r"10^{33}\%", "3.3e-10", "a percentage is not a tiny number"),
    ("1", "", "an empty reference matches nothing"),
    ("", "0", "an empty answer matches nothing"),
]


@pytest.mark.parametrize("answer, reference, reason", EQUAL)
def test_equal(answer, reference, reason):
    assert answers_equivalent(answer, reference), reason


@pytest.mark.parametrize("answer, reference, reason", NOT_EQUAL)
def test_not_equal(answer, reference, reason):
    assert not answers_equivalent(answer, reference), reason


def test_math_normalisation_by_hand():
    # Hendrycks' MATH rules, applied step by step on paper.
    assert math_normalize(r"\left( \dfrac{1}{2}, 3 \right)") == r"(\frac{1}{2},3)"
    assert math_normalize(r"\sqrt3") == r"\sqrt{3}"
    assert math_normalize(r"\frac1{72}") == r"\frac{1}{72}"
    assert math_normalize(".5") == r"\frac{1}{2}"
    assert math_normalize(r"\text{east}") == "east"


# ---------------------------------------------------------------- references as stored


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("3", ["3"]),
        (3, ["3"]),
        (142.0, ["142"]),  # AMC references are floats
        (0.25, ["0.25"]),
        (["1", "2"], ["1", "2"]),
        ([["6630.65\n", "6630\n"]], ["6630.65", "6630"]),  # nested, stripped
        ("['a', 'b']", ["a", "b"]),  # a Python list stored as a string
        ("[1, 2]", ["[1, 2]"]),  # a closed interval, not a list
        (None, []),
    ],
)
def test_reference_candidates(reference, expected):
    assert reference_candidates(reference) == expected


def test_reference_of_wrong_type_is_named():
    with pytest.raises(TypeError, match="dict"):
        reference_candidates({"a": 1})


@pytest.mark.parametrize(
    "response, reference, score",
    [
        (r"so \boxed{6630}", [["6630.65\n", "6630\n"]], 1.0),  # any element matches
        (r"so \boxed{6631}", [["6630.65\n", "6630\n"]], 0.0),
        (r"\boxed{142}", [142.0], 1.0),
        (r"\boxed{b}", "['a', 'b']", 1.0),
        ("142", [142.0], 0.0),  # no box, no answer
        (r"\boxed{5}", r"Thus \boxed{5}.", 1.0),  # a reference stored as a full solution
    ],
)
def test_grade_response(response, reference, score):
    assert grade_response(response, reference) == score


# ---------------------------------------------------------------- screens


@pytest.mark.parametrize(
    "answer",
    [
        r"9^{9^{9^{9}}}",
        r"10^{10^{100}}!",
        "2^3^4",
        r"9^{123456789}",
        "100000!",
        "{" * 30 + "1" + "}" * 30,
        "1" * 5000,
    ],
)
def test_pathological_answers_are_screened(answer):
    assert unsafe_to_evaluate(answer)


@pytest.mark.parametrize("answer", [r"\frac{100!}{2^{50}}", r"2^{1009}", r"x^{2}+y^{2}", "10^{-19}"])
def test_ordinary_answers_pass_the_screen(answer):
    assert unsafe_to_evaluate(answer) is None


def test_screened_answer_still_matches_itself():
    # Screened answers are compared as strings, so a literal match still scores.
    assert answers_equivalent(r"9^{9^{9^{9}}}", r"9^{9^{9^{9}}}")
    assert not answers_equivalent(r"9^{9^{9^{9}}}", "9")


def test_cpu_time_limit_fires_inside_its_window_and_never_after():
    import os
    import signal
    import threading
    import time

    from ktae_jax.rewards.equivalence import CheckTimeout, _time_limit

    after = lambda before: signal.SIG_IGN if before == signal.SIG_DFL else before  # noqa: E731
    before = signal.getsignal(signal.SIGPROF)
    with pytest.raises(CheckTimeout):
        with _time_limit(0.05):
            while True:  # CPU-bound on this thread: its time runs out
                sum(range(1000))
    assert signal.getsignal(signal.SIGPROF) == after(before)
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    # SIGPROF from elsewhere (libtpu's profiler) and other threads' CPU time do not count.
    spin = threading.Thread(target=lambda: [sum(range(1000)) for _ in range(40_000)])
    with _time_limit(0.2):
        handler = signal.getsignal(signal.SIGPROF)
        for _ in range(20):
            os.kill(os.getpid(), signal.SIGPROF)
        spin.start()
        t0 = time.process_time()
        while spin.is_alive() and time.process_time() - t0 < 1.0:
            time.sleep(0.01)
        spin.join()
    handler(signal.SIGPROF, None)  # a signal handled after the window closed is ignored, not raised
    assert signal.getsignal(signal.SIGPROF) == after(before) and signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


def test_first_symbolic_check_of_a_process_imports_nothing_inside_its_time_limit():
    """The symbolic libraries' first use in a process (imports, parser tables: ~0.6 s of CPU here)
    happens before the CPU-time limit starts: inside it, on a busy machine it used the whole second
    and a correct answer scored 0 (a fresh-clone run: cosh against its definition)."""
    import subprocess
    import sys

    code = r"""
import contextlib, sys
from ktae_jax.rewards import equivalence as eq
imported, limited = [], eq._time_limit
@contextlib.contextmanager
def spy(seconds):
    before = set(sys.modules)
    with limited(seconds):
        yield
    imported.extend(sorted(set(sys.modules) - before))
eq._time_limit = spy
assert eq.answer_matches_any(r"\cosh(at)", [r"\frac{1}{2}(e^{at} + e^{-at})"])
assert eq.answer_matches_any(r"\sqrt{8}", [r"2\sqrt{2}"])
print(imported)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout[-2000:]
