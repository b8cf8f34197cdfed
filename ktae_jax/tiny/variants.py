"""Tiny-task variants whose correctness is decided in the middle of the response, not by its first token.

The shipped tiny task (`task.py`) decides a response's style with its first token ("Sum:" or
"Guess:"), where sequence-level GRPO already assigns credit well. These variants move the decision
later or spread it over the response (issue 17); both use the tiny tokenizer (digits and
punctuation are single tokens, "Sum:", "Guess:" and "\\boxed{" whole tokens), so no new vocabulary.

  late   three 2-digit terms. Every response starts with the same prefix, the first partial sum;
         only then comes the choice (the deciding token is the 7th-8th of the response):
           reliable  "Sum: 47+85=132, 132+69=201. \\boxed{201}"   (always right in the teacher data)
           shortcut  "Sum: 47+85=132, Guess: \\boxed{200}"         (teacher wrong half the time)
  steps  four 2-digit terms, three running sums; at EACH step the teacher either writes the
         addition out (verbose, always right) or jumps to the new total with "~" (terse, wrong half
         the time: the true total rounded to ten, as the shipped task's wrong guess). A wrong
         shortcut carries on into the later steps, so a response is right only if every shortcut
         it took was right:
           "47+85=132, ~200, 200+33=233. \\boxed{233}"   (second step a shortcut, here wrong)
         The verbose style is longer, so this variant also tests the claim that KTAE gives
         shorter responses (it can only do so here by keeping shortcuts, which cost accuracy).
         (Its base could not add four terms, see `bases/BUILD.md`: replaced in the study by steps3.)
  steps3 the `steps` design on three 2-digit terms: two running sums, two choices (the first at
         the first response token, the second in the middle, after the first sum):
           "47+85=132, ~200. \\boxed{200}"   (second step a shortcut, here wrong)
         (Its base is below the study's registered acceptance floor, 13.3% at T=1 against 15%; the
         study ran it under a disclosed amendment, see `bases/BUILD.md` and the study's docstring.)

The teacher picks each choice with probability 1/2. Problems are split into train / test by the
same text hash as the shipped task (`task.split_of`), so held-out problems never appear in
supervised or RL data. `grade` is exact: the content of the last "\\boxed{...}" must equal the
integer answer's decimal string (these tasks have no other valid forms).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Literal

import numpy as np

from ktae_jax.tiny.task import BOX_OPEN, SHORTCUT_OPENER, RELIABLE_OPENER, problem_text, split_of, wrong_guess

Variant = Literal["late", "steps", "steps3"]
VARIANTS: tuple[str, ...] = ("late", "steps", "steps3")
SHORTCUT_STEP = "~"  # the "steps" variant's terse jump to a new running total


@dataclasses.dataclass(frozen=True)
class VariantConfig:
    """One variant and its teacher: how often it takes the shortcut and how often that is wrong."""

    name: str = "late"  # one of VARIANTS
    shortcut_rate: float = 0.5  # P(the teacher takes the shortcut at a choice)
    shortcut_error_rate: float = 0.5  # P(a shortcut the teacher takes is wrong)

    def __post_init__(self) -> None:
        if self.name not in VARIANTS:
            raise ValueError(f"variant name={self.name!r}: must be one of {VARIANTS}")
        for key in ("shortcut_rate", "shortcut_error_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"variant {key}={getattr(self, key)}: must be in [0, 1]")

    @property
    def num_terms(self) -> int:
        return 4 if self.name == "steps" else 3

    @property
    def max_new_tokens(self) -> int:
        """Longest teacher response in tokens, EOS included, plus slack (see `tests`)."""
        return 48 if self.name == "steps" else 36


# ---------------------------------------------------------------------- problems
def make_problems(config: VariantConfig, n: int, *, seed: int, split: str = "train") -> list[dict]:
    """`n` problems {"problem", "answer" (string), "terms"} of 2-digit terms drawn from `split`."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        terms = [int(t) for t in rng.integers(10, 100, size=config.num_terms)]
        text = problem_text(terms)
        if split == "any" or split_of(text) == split:
            out.append({"problem": text, "answer": str(sum(terms)), "terms": terms})
    return out


# ---------------------------------------------------------------------- teacher solutions
def late_solution(terms: list[int], shortcut: bool, wrong: bool) -> str:
    first = terms[0] + terms[1]
    prefix = f"{RELIABLE_OPENER} {terms[0]}+{terms[1]}={first}, "
    if not shortcut:
        return prefix + f"{first}+{terms[2]}={first + terms[2]}. {BOX_OPEN}{first + terms[2]}}}"
    total = sum(terms)
    return prefix + f"{SHORTCUT_OPENER} {BOX_OPEN}{wrong_guess(total) if wrong else total}}}"


def steps_solution(terms: list[int], shortcuts: list[bool], wrongs: list[bool]) -> str:
    """Running sums, step i written out or jumped to with "~" (a wrong jump: rounded true total)."""
    parts, total = [], terms[0]
    for t, short, wrong in zip(terms[1:], shortcuts, wrongs):
        new = total + t
        if short:
            new = wrong_guess(new) if wrong else new
            parts.append(f"{SHORTCUT_STEP}{new}")
        else:
            parts.append(f"{total}+{t}={new}")
        total = new
    return ", ".join(parts) + f". {BOX_OPEN}{total}}}"


def make_sft_examples(config: VariantConfig, n: int, *, seed: int, split: str = "train") -> list[dict]:
    """`n` teacher examples {"problem", "answer", "solution", "shortcuts", "teacher_correct"}."""
    rng = np.random.default_rng(seed)
    examples = []
    for p in make_problems(config, n, seed=int(rng.integers(2**63)), split=split):
        choices = 1 if config.name == "late" else config.num_terms - 1
        shortcuts = [bool(rng.random() < config.shortcut_rate) for _ in range(choices)]
        wrongs = [bool(s and rng.random() < config.shortcut_error_rate) for s in shortcuts]
        if config.name == "late":
            solution = late_solution(p["terms"], shortcuts[0], wrongs[0])
        else:
            solution = steps_solution(p["terms"], shortcuts, wrongs)
        examples.append({**p, "solution": solution, "shortcuts": sum(shortcuts),
                         # two wrong jumps can land back on the true total: judge the final answer
                         "teacher_correct": grade(solution, p["answer"])})
    return examples


# ---------------------------------------------------------------------- grading
_BOXED = re.compile(re.escape(BOX_OPEN) + r"([^{}]*)\}")


def grade(response: str, answer: str) -> bool:
    """True when the last "\\boxed{...}" in `response` holds exactly `answer` (spaces stripped)."""
    found = _BOXED.findall(response)
    return bool(found) and found[-1].strip() == answer


def shortcuts_taken(config: VariantConfig, response: str) -> int:
    """How many shortcuts a response took ("Guess:" for late, "~" jumps for steps and steps3)."""
    return response.count(SHORTCUT_OPENER) if config.name == "late" else response.count(SHORTCUT_STEP)


# ---------------------------------------------------------------------- base models
BASES = pathlib.Path(__file__).resolve().parent / "bases"  # bases/<variant>/: one shipped base per variant


# How each base is trained (`PretrainConfig` fields over its defaults): both continue from the
# shipped tiny base, which already writes additions with carries, for 200 steps of 64 on the
# variant's teacher data (a from-scratch build, 1,500 steps, did not fit the loaded machine).
BASE_RECIPES: dict[str, dict] = {
    "late": {"init_from": "tiny", "steps": 200, "learning_rate": 1e-3, "warmup_steps": 20},
    "steps": {"init_from": "tiny", "steps": 200, "learning_rate": 1e-3, "warmup_steps": 20},
    "steps3": {"init_from": "tiny", "steps": 200, "learning_rate": 1e-3, "warmup_steps": 20},
}


def build_base(config: VariantConfig, out: str | pathlib.Path, *, seed: int = 0, progress: bool = False):
    """Trains a variant's base (`BASE_RECIPES`) on this variant's teacher data; saves it with
    `pretrain_report.json`. `init_from: tiny` is the shipped tiny base."""
    import json

    from ktae_jax.models import save_pretrained
    from ktae_jax.tiny import base_checkpoint_path
    from ktae_jax.tiny.pretrain import PretrainConfig, train
    from ktae_jax.tiny.tokenizer import build_tokenizer

    recipe = dict(BASE_RECIPES[config.name])
    if recipe.get("init_from") == "tiny":
        recipe["init_from"] = str(base_checkpoint_path())
    pre = PretrainConfig(seed=seed, eval_problems=0, **recipe)
    tokenizer = build_tokenizer()
    examples = make_sft_examples(config, pre.steps * pre.batch_size, seed=seed)
    model, report = train(pre, tokenizer, progress=progress, examples=examples)
    folder = save_pretrained(model, tokenizer, out)
    report = {"variant": dataclasses.asdict(config), "pretrain": dataclasses.asdict(pre) | BASE_RECIPES[config.name],
              "num_params": model.config.num_params, **report}
    (folder / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return folder


def ensure_base(name: str, *, progress: bool = False) -> pathlib.Path:
    """The shipped base of variant `name` (built first, seed 0, if its files are missing)."""
    from ktae_jax.tiny import is_complete

    folder = BASES / name
    if not is_complete(folder):
        build_base(VariantConfig(name), folder, progress=progress)
    return folder
