"""The study's task variants (`ktae_jax/tiny/variants.py`): teacher solutions and grading on
hand-computed cases, the split, the teacher's error rates, and that the decision is not the
first response token. Cheap: no model is built."""

from __future__ import annotations

import pytest

from ktae_jax.tiny.task import split_of
from ktae_jax.tiny.tokenizer import build_tokenizer
from ktae_jax.tiny.variants import (
    VariantConfig, grade, late_solution, make_problems, make_sft_examples, shortcuts_taken, steps_solution,
)


def test_late_solutions_by_hand():
    # 47+85 = 132, 132+69 = 201; the wrong guess rounds 201 to 200.
    assert late_solution([47, 85, 69], shortcut=False, wrong=False) == "Sum: 47+85=132, 132+69=201. \\boxed{201}"
    assert late_solution([47, 85, 69], shortcut=True, wrong=False) == "Sum: 47+85=132, Guess: \\boxed{201}"
    assert late_solution([47, 85, 69], shortcut=True, wrong=True) == "Sum: 47+85=132, Guess: \\boxed{200}"
    # 10+20+30 = 60 is round: the wrong guess is 70, never the answer.
    assert late_solution([10, 20, 30], shortcut=True, wrong=True).endswith("\\boxed{70}")


def test_steps_solutions_by_hand():
    terms = [47, 85, 69, 33]  # running sums 132, 201, 234
    assert steps_solution(terms, [False] * 3, [False] * 3) == "47+85=132, 132+69=201, 201+33=234. \\boxed{234}"
    # A wrong jump at step 2 (201 -> 200) carries on: 200+33 = 233.
    wrong = steps_solution(terms, [False, True, False], [False, True, False])
    assert wrong == "47+85=132, ~200, 200+33=233. \\boxed{233}"
    assert steps_solution(terms, [True] * 3, [False] * 3) == "~132, ~201, ~234. \\boxed{234}"
    assert not grade(wrong, "234") and grade("~132, ~201, ~234. \\boxed{234}", "234")


def test_steps3_solutions_by_hand():
    # steps3: the same design on three terms (running sums 132, 201), two choices.
    terms = [47, 85, 69]
    assert steps_solution(terms, [False] * 2, [False] * 2) == "47+85=132, 132+69=201. \\boxed{201}"
    assert steps_solution(terms, [False, True], [False, True]) == "47+85=132, ~200. \\boxed{200}"
    # A wrong first jump (132 -> 130) carries on: 130+69 = 199.
    assert steps_solution(terms, [True, False], [True, False]) == "~130, 130+69=199. \\boxed{199}"


@pytest.mark.parametrize("response, answer, expected", [
    ("Sum: 1+2=3. \\boxed{3}", "3", True),
    ("\\boxed{ 201 }", "201", True),
    ("\\boxed{1}, then \\boxed{201}", "201", True),  # the last box counts
    ("\\boxed{201}, then \\boxed{1}", "201", False),
    ("\\boxed{2010}", "201", False),
    ("201", "201", False),  # no box, no credit
    ("\\boxed{201", "201", False),  # unclosed
])
def test_grade(response, answer, expected):
    assert grade(response, answer) is expected


def test_shortcuts_counted():
    assert shortcuts_taken(VariantConfig("late"), "Sum: 47+85=132, Guess: \\boxed{200}") == 1
    assert shortcuts_taken(VariantConfig("late"), "Sum: 47+85=132, 132+69=201. \\boxed{201}") == 0
    assert shortcuts_taken(VariantConfig("steps"), "47+85=132, ~200, ~233. \\boxed{233}") == 2
    assert shortcuts_taken(VariantConfig("steps3"), "~130, 130+69=199. \\boxed{199}") == 1


def test_problems_split_and_shape():
    for name, terms in (("late", 3), ("steps", 4), ("steps3", 3)):
        config = VariantConfig(name)
        test = make_problems(config, 200, seed=1, split="test")
        train = make_problems(config, 200, seed=1, split="train")
        assert all(split_of(p["problem"]) == "test" for p in test)
        assert all(split_of(p["problem"]) == "train" for p in train)
        assert all(len(p["terms"]) == terms and all(10 <= t <= 99 for t in p["terms"]) for p in test)
        assert all(int(p["answer"]) == sum(p["terms"]) for p in train)
        assert make_problems(config, 50, seed=3) == make_problems(config, 50, seed=3)  # seeded


def test_teacher_error_rates():
    # late: wrong only after a shortcut (1/2) that is wrong (1/2): accuracy 3/4.
    # steps: each of 3 steps wrong with 1/4 -> (3/4)^3 = 0.42 (two wrong jumps can also cancel, rarely);
    # steps3: 2 steps -> (3/4)^2 = 0.56.
    for name, expected in (("late", 0.75), ("steps", 0.75**3), ("steps3", 0.75**2)):
        ex = make_sft_examples(VariantConfig(name), 4000, seed=0)
        accuracy = sum(e["teacher_correct"] for e in ex) / len(ex)
        assert abs(accuracy - expected) < 0.03, (name, accuracy)
        assert all(grade(e["solution"], e["answer"]) == e["teacher_correct"] for e in ex)


def test_decision_is_not_the_first_token_and_fits_the_budget():
    tok = build_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    reliable = ids(late_solution([47, 85, 69], False, False))
    shortcut = ids(late_solution([47, 85, 69], True, False))
    first_diff = next(i for i, (a, b) in enumerate(zip(reliable, shortcut)) if a != b)
    assert first_diff >= 6 and tok.convert_ids_to_tokens(shortcut[first_diff]) == "Guess:"
    assert len(ids("~")) == 1
    for name in ("late", "steps", "steps3"):
        config = VariantConfig(name)
        longest = max(len(ids(e["solution"] + tok.eos_token)) for e in make_sft_examples(config, 500, seed=0))
        worst, choices = [99] * config.num_terms, config.num_terms - 1
        full = late_solution(worst, False, False) if name == "late" else steps_solution(worst, [False] * choices,
                                                                                          [False] * choices)
        assert longest <= len(ids(full + tok.eos_token)) <= config.max_new_tokens


def test_bad_variant_name():
    with pytest.raises(ValueError, match="variant name"):
        VariantConfig("first")


def test_pretrain_takes_variant_examples_and_checks_their_count():
    from ktae_jax.tiny.pretrain import PretrainConfig, train

    config = PretrainConfig(steps=3, batch_size=4)
    too_few = make_sft_examples(VariantConfig("steps"), 11, seed=0)
    with pytest.raises(ValueError, match="need steps \\* batch_size = 12"):
        train(config, build_tokenizer(), progress=False, examples=too_few)
