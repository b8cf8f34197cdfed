"""String normalisations of math answers, as the paper's grader applies them.

Two independent normal forms (see `../shared/grader/README.md`):

* `math_normalize`: Hendrycks et al.'s MATH normalisation, used for plain string equality
  (LaTeX spacing, `\\left`/`\\right`, degrees, dollars, trailing `\\text{ unit}`, percent
  signs, `x = ` prefixes, `\\sqrt3`, `\\frac12`, `a/b`, `0.5` are made canonical).
* `prm_normalize`: PRM800K's normalisation before a sympy comparison (units as words,
  thousands separators, `million`, `\\text{}` wrappers, braces, case).

Both return None for input they cannot normalise; the caller then treats the check as failed.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------- MATH (Hendrycks) form

_TEXT_WRAPPER = re.compile(r"^\\text\{(?P<text>.+?)\}$")
# Marks that qualify a number without changing it: ordinals (`12^{\text{th}}`) and arc
# minutes/seconds (`0.003^{\prime\prime}`), the latter being units like `^\circ`.
_QUALIFIERS = re.compile(
    r"\^\s*\{?\s*(?:\\(?:text|mathrm)\{\s*(?:st|nd|rd|th)\s*\}|(?:\\prime\s*)+|'+)\s*\}?"
)

_TRAILING_UNIT = re.compile(r"\s*\\text\{ [^{}]*\}(?:\s*(?:\^\{?-?\d+\}?|\\text\{[^{}]*\}))*\s*$")


def strip_qualifiers(s: str) -> str:
    """`12^{\\text{th}}` -> `12`, `0.003^{\\prime\\prime}` -> `0.003`."""
    return _QUALIFIERS.sub("", s)


def _brace_bare_args(s: str, macro: str, nargs: int) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\sqrt3` -> `\\sqrt{3}`: wrap single-character arguments."""
    parts = s.split(macro)
    out = [parts[0]]
    for part in parts[1:]:
        rest, args = part, []
        for _ in range(nargs):
            if rest.startswith("{"):
                depth = 0
                for k, c in enumerate(rest):
                    depth += c == "{"
                    depth -= c == "}"
                    if depth == 0:
                        break
                args.append(rest[: k + 1])
                rest = rest[k + 1 :]
            elif rest:
                args.append("{" + rest[0] + "}")
                rest = rest[1:]
        out.append(macro + "".join(args) + rest)
    return "".join(out)


def _slash_to_frac(s: str) -> str:
    """`3/4` -> `\\frac{3}{4}` when both sides are integers."""
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def math_normalize(answer: str | None) -> str | None:
    """Hendrycks' MATH string normal form of an answer (no evaluation)."""
    if answer is None:
        return None
    s = answer.strip()
    m = _TEXT_WRAPPER.match(s)
    if m:
        s = m.group("text").strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = strip_qualifiers(s)
    s = s.replace("\\$", "").replace("$", "")
    # Trailing units written as `\text{ cm}` (the space marks a unit, not a word answer).
    # Hendrycks cuts at the first `\text{ `; we cut only when a unit really ends the answer,
    # so `E_1 \text{ and } E_2` does not become `E_1`.
    s = _TRAILING_UNIT.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    # `x = 3` -> `3` (a short variable name on the left only).
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:
        s = sides[1]
    s = _brace_bare_args(s, "\\sqrt", 1)
    s = s.replace(" ", "")
    s = _brace_bare_args(s, "\\frac", 2)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


# ---------------------------------------------------------------- PRM800K form

_UNIT_WORDS = (
    "degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day",
    "week", "month", "year", "foot", "feet", "inch", "yard", "liter",
)  # fmt: skip
_UNITS = re.compile(r"(?:" + "|".join(_UNIT_WORDS) + r")(?:es)?(?:s)? *(?:\^[0-9]+)?")
_THOUSANDS = re.compile(r"(\d),(\d\d\d)(?!\d)")


def is_float_str(s: str) -> bool:
    try:
        float(s)
    except (ValueError, OverflowError):
        return False
    return True


def is_int_str(s: str) -> bool:
    """An integer written as such, thousands separators allowed (`1,000`, `-3`)."""
    return re.fullmatch(r"-?\d+", s.replace(",", "")) is not None if s else False


def is_frac_str(s: str) -> bool:
    return re.fullmatch(r"-?\d+/\d+", s) is not None


def prm_normalize(answer: str | None) -> str | None:
    """PRM800K's normal form: a lower-case plain-text expression without units or braces.

    LaTeX macros are kept (the sympy check parses them); words like `million` become powers.
    """
    if answer is None:
        return None
    s = answer.strip()
    m = _TEXT_WRAPPER.match(s)
    if m:
        s = m.group("text")
    # `\text{ and }`, `\text{ cm}`: PRM800K renders LaTeX to text first, so words and units
    # inside \text are handled like bare ones below.
    s = strip_qualifiers(s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    s = s.replace(" or ", " , ").replace(" and ", " , ")
    s = s.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    s = _UNITS.sub("", s)
    s = re.sub(r"\^ *\\circ", "", s)
    s = re.sub(r"\^ *\{\\circ\}", "", s)
    if len(s) > 1 and s[0] == "{" and s[-1] == "}":
        s = s[1:-1]
    s = re.sub(r",\\! *", "", s)
    if is_float_str(s) and re.fullmatch(r"-?\d+(\.0*)?", s.strip()):
        s = str(int(float(s))) if len(s) < 16 else s.split(".")[0]
    s = re.sub(r"- *", "-", s)
    # `7 3/4` is a mixed number: 7 + 3/4.
    s = re.sub(r"(\d+) +(\d+/\d+)", r"\1+\2", s)
    s = s.replace(" ", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.lower()
    if is_int_str(s):
        s = str(int(s.replace(",", ""))) if len(s) < 4000 else s
    return s


def split_tuple(s: str) -> list[str]:
    """`(1,2)` / `[1,2]` -> elements; anything else is one element. Thousands commas are kept."""
    s = _THOUSANDS.sub(r"\1\2", s)
    if len(s) > 2 and s[0] in "([" and s[-1] in ")]" and all(c not in s[1:-1] for c in "()[]"):
        return [e.strip() for e in s[1:-1].split(",")]
    return [s]
