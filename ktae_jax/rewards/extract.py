"""Answer extraction: the last `\\boxed{...}` / `\\fbox{...}` of a response, by brace matching.

The paper's grader takes the *last* box in the text; a response without one has no answer
(reward 0). `\\boxed 5` (TeX's brace-less argument) is accepted; a box whose braces never
close (a truncated response) gives no answer.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Characters that end a brace-less argument (`\boxed 5$` -> "5").
_BARE_ARG = re.compile(r"[^\s$]+")
# C0 controls except tab/newline, DEL, and lone UTF-16 surrogates: never part of a math answer.
_JUNK = re.compile("[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Drop control characters, NUL bytes and lone surrogates (they can only break parsers)."""
    return _JUNK.sub("", text)


def _last_box_start(text: str) -> tuple[int, int]:
    """(index of the last box command, index just after its name), or (-1, -1)."""
    best, end = -1, -1
    for cmd in _BOX_COMMANDS:
        pos = text.rfind(cmd)
        # `\boxedx` is another macro: skip matches followed by a letter.
        while pos >= 0 and pos + len(cmd) < len(text) and text[pos + len(cmd)].isalpha():
            pos = text.rfind(cmd, 0, pos)
        if pos > best:
            best, end = pos, pos + len(cmd)
    return best, end


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{}` or `\\fbox{}` in `text`, or None when there is none.

    Nested braces are matched (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); an unclosed last box
    gives None; `\\boxed 5` gives `5`.
    """
    if not isinstance(text, str):
        return None
    start, i = _last_box_start(text)
    if start < 0:
        return None
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        m = _BARE_ARG.match(text, i)
        return m.group(0) if m else None
    depth, j = 0, i
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2  # `\{` and `\}` are literal braces, not grouping
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None
