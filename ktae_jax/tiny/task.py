"""The tiny task: sums of a few small numbers, solved in one of two styles a key-token method can see.

A problem is "47+85+69=?" (kept terse: every prompt token costs CPU time) with the answer "201". Supervised (teacher) solutions come in two
styles, and the style is decided by the FIRST response token, so RL can move the choice and KTAE
can score it:

  reliable  "Sum: 47+85=132, 132+69=201. \\boxed{201}"   partial sums written out; teacher always right
  shortcut  "Guess: \\boxed{200}"                          the answer at once; the teacher is wrong
                                                           `shortcut_error_rate` of the time

A wrong guess is the sum rounded to the nearest ten (plus ten when that rounding is exact), so a
model imitating the teacher mostly writes round numbers after "Guess:": the shortcut is cheap and
usually wrong, the partial sums are longer and usually right. `num_terms` and `digits` are the
difficulty knobs. Problems are split into train and test by a hash of their text, so held-out
problems never appear in supervised data.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable
from typing import Literal

import numpy as np

RELIABLE_OPENER = "Sum:"  # the first response token of the reliable style
SHORTCUT_OPENER = "Guess:"  # the first response token of the shortcut style
BOX_OPEN = "\\boxed{"
Split = Literal["train", "test", "any"]
Style = Literal["reliable", "shortcut", "other"]
TEST_FRACTION_MOD = 10  # a problem is held out when crc32(text) % 10 == 0 (10% of the space)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs and the supervised data's mix of styles and teacher errors."""

    num_terms: int = 3  # numbers added per problem (>= 2); more terms = more partial sums
    digits: int = 2  # digits per number (each drawn uniformly from [10^(d-1), 10^d - 1])
    reliable_fraction: float = 0.5  # share of supervised solutions written in the reliable style
    shortcut_error_rate: float = 0.5  # P(the teacher's shortcut answer is wrong)
    reliable_error_rate: float = 0.0  # P(the teacher's reliable solution has a slip in its last sum)
    seed: int = 0  # default seed of `make_problems` / `make_sft_examples`

    def __post_init__(self) -> None:
        if self.num_terms < 2:
            raise ValueError(f"task.num_terms={self.num_terms}: must be >= 2")
        if not 1 <= self.digits <= 6:
            raise ValueError(f"task.digits={self.digits}: must be in [1, 6]")
        for name in ("reliable_fraction", "shortcut_error_rate", "reliable_error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"task.{name}={value}: must be in [0, 1]")


# ---------------------------------------------------------------------- problems
def problem_text(terms: Iterable[int]) -> str:
    return "+".join(str(t) for t in terms) + "=?"


def split_of(problem: str) -> Literal["train", "test"]:
    """Which split a problem text belongs to (a fixed hash, independent of any seed)."""
    return "test" if zlib.crc32(problem.encode()) % TEST_FRACTION_MOD == 0 else "train"


def _draw_terms(rng: np.random.Generator, config: TaskConfig, split: Split) -> list[int]:
    low, high = 10 ** (config.digits - 1), 10**config.digits  # 1 digit: 1..9 (no zero terms)
    low = max(low, 1)
    while True:
        terms = [int(t) for t in rng.integers(low, high, size=config.num_terms)]
        if split == "any" or split_of(problem_text(terms)) == split:
            return terms


def make_problems(
    n: int, *, seed: int | None = None, config: TaskConfig = TaskConfig(), split: Split = "train",
) -> list[dict]:
    """`n` problems as dicts {"problem", "answer" (string), "terms"} from `split`.

    RL prompts come from "train" (the default); evaluate on `split="test"`, which no training
    data (supervised or RL) ever draws from.
    """
    if n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    rng = np.random.default_rng(config.seed if seed is None else seed)
    out = []
    for _ in range(n):
        terms = _draw_terms(rng, config, split)
        out.append({"problem": problem_text(terms), "answer": str(sum(terms)), "terms": terms})
    return out


# ---------------------------------------------------------------------- solutions
def wrong_guess(answer: int) -> int:
    """The shortcut's typical error: the sum rounded to the nearest ten, never the exact answer."""
    rounded = (answer + 5) // 10 * 10
    return rounded if rounded != answer else answer + 10


def reliable_solution(terms: list[int], *, slip: bool = False) -> str:
    """'Sum: a+b=s1, s1+c=s2. \\boxed{s2}'; with `slip`, the last partial sum (and answer) is off by 10."""
    parts, total = [], terms[0]
    for i, t in enumerate(terms[1:]):
        new = total + t
        if slip and i == len(terms) - 2:
            new += 10
        parts.append(f"{total}+{t}={new}")
        total = new
    return f"{RELIABLE_OPENER} " + ", ".join(parts) + f". {BOX_OPEN}{total}}}"


def shortcut_solution(answer: int) -> str:
    return f"{SHORTCUT_OPENER} {BOX_OPEN}{answer}}}"


def make_sft_examples(
    n: int, *, seed: int | None = None, config: TaskConfig = TaskConfig(), split: Split = "train",
) -> list[dict]:
    """`n` supervised examples: {"problem", "answer", "solution", "style", "teacher_correct"}.

    The style is drawn per example (reliable with probability `reliable_fraction`), then the
    teacher errs with that style's error rate. `solution` has no EOS; the tokenizer adds it.
    """
    rng = np.random.default_rng(config.seed if seed is None else seed)
    examples = []
    for problem in make_problems(n, seed=int(rng.integers(2**63)), config=config, split=split):
        terms, answer = problem["terms"], int(problem["answer"])
        if rng.random() < config.reliable_fraction:
            slip = bool(rng.random() < config.reliable_error_rate)
            style, solution, correct = "reliable", reliable_solution(terms, slip=slip), not slip
        else:
            wrong = bool(rng.random() < config.shortcut_error_rate)
            style, correct = "shortcut", not wrong
            solution = shortcut_solution(wrong_guess(answer) if wrong else answer)
        examples.append({**problem, "solution": solution, "style": style, "teacher_correct": correct})
    return examples


def response_style(response: str) -> Style:
    """The style a response opens with ("other" when it opens with neither marker)."""
    text = response.lstrip()
    if text.startswith(RELIABLE_OPENER):
        return "reliable"
    if text.startswith(SHORTCUT_OPENER):
        return "shortcut"
    return "other"
