"""Cheap screens for answers that symbolic grading must not evaluate.

`9^{9^{9^{9}}}` or `(10^{10^{100}})!` make sympy (or Python's big integers, in C, where no
signal can interrupt) run for hours. Such an answer is still graded, but by string equality
only: an answer that is literally the reference still scores, and nothing is evaluated.
The worker pool's hard time limit is the backstop for whatever these screens miss.
"""

from __future__ import annotations

import re

MAX_ANSWER_CHARS = 2_000  # no reference in the evaluation sets is within 10x of this
MAX_BRACE_DEPTH = 24  # ANTLR's recursive parser and sympy's printers recurse per level
MAX_EXPONENT = 10_000  # 9^10000 has ~9,500 digits: cheap; 9^(10^6) is not
MAX_FACTORIAL = 2_000

# An exponent that itself holds an exponent: `a^{b^{c}}`, `a^b^c`.
_TOWER = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\(?[\w.]+\)?\s*\^")
_EXPONENT_INT = re.compile(r"\^\s*\{?\s*(\d+)")
_FACTORIAL_INT = re.compile(r"(\d+)\s*!")
# Factorial of a group (`(...)!`, `{...}!`) whose content has a power: value unbounded.
_FACTORIAL_OF_POWER = re.compile(r"\^[^!]*[)}]\s*!")
_POWER_WORDS = re.compile(r"\\uparrow|\\underbrace|\\cdots\s*\^")


def _brace_depth(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "{(":
            depth += 1
            best = max(best, depth)
        elif c in "})":
            depth -= 1
    return best


def unsafe_to_evaluate(answer: str) -> str | None:
    """Why `answer` must not be evaluated symbolically, or None when it is safe."""
    if len(answer) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    if _brace_depth(answer) > MAX_BRACE_DEPTH:
        return f"nested deeper than {MAX_BRACE_DEPTH} levels"
    if _TOWER.search(answer):
        return "tower of exponents"
    if any(len(e) > 5 or int(e) > MAX_EXPONENT for e in _EXPONENT_INT.findall(answer)):
        return f"exponent above {MAX_EXPONENT}"
    if any(len(n) > 5 or int(n) > MAX_FACTORIAL for n in _FACTORIAL_INT.findall(answer)):
        return f"factorial above {MAX_FACTORIAL}!"
    if _FACTORIAL_OF_POWER.search(answer) or _POWER_WORDS.search(answer):
        return "factorial of a power or iterated power"
    return None
