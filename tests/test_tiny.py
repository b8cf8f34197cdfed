"""The tiny task: generator and grading, tokenizer, `ktae-pretrain`, and the shipped base model."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from ktae_jax.rewards import grade_batch
from ktae_jax.tiny import base_checkpoint_path, is_complete
from ktae_jax.tiny.task import (
    RELIABLE_OPENER, SHORTCUT_OPENER, TaskConfig, make_problems, make_sft_examples, response_style, split_of,
)
from ktae_jax.tiny.tokenizer import build_tokenizer, prompt_text

_TERMS = re.compile(r"^(\d+(?:\+\d+)+)=\?$")


def _terms(problem: str) -> list[int]:
    m = _TERMS.match(problem)
    assert m, problem
    return [int(t) for t in m.group(1).split("+")]


def _binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1


# ---------------------------------------------------------------------- generator
def test_problems_answers_split_and_seeds():
    config = TaskConfig()
    problems = make_problems(300, seed=3, config=config, split="test")
    for p in problems:
        terms = _terms(p["problem"])
        assert len(terms) == 3 and all(10 <= t <= 99 for t in terms)
        assert p["answer"] == str(sum(terms)) and isinstance(p["answer"], str)
        assert split_of(p["problem"]) == "test"
    assert make_problems(300, seed=3, config=config, split="test") == problems
    assert make_problems(300, seed=4, config=config, split="test") != problems
    train = {e["problem"] for e in make_sft_examples(2000, seed=0, config=config)}
    train |= {p["problem"] for p in make_problems(2000, seed=0, config=config)}  # RL prompts: the default split
    assert all(split_of(p) == "train" for p in train)
    assert not train & {p["problem"] for p in problems}  # held out means never trained on


def test_difficulty_knobs_change_the_problems():
    hard = make_problems(100, seed=0, config=TaskConfig(num_terms=4, digits=3))
    for p in hard:
        terms = _terms(p["problem"])
        assert len(terms) == 4 and all(100 <= t <= 999 for t in terms) and p["answer"] == str(sum(terms))
    with pytest.raises(ValueError, match="num_terms"):
        TaskConfig(num_terms=1)
    with pytest.raises(ValueError, match="shortcut_error_rate"):
        TaskConfig(shortcut_error_rate=1.5)


def _check_solution_arithmetic(example: dict) -> bool:
    """Independent re-check of a teacher solution: every written sum, and the boxed answer."""
    sol, terms = example["solution"], _terms(example["problem"])
    boxed = int(re.search(r"\\boxed\{(\d+)\}$", sol).group(1))
    if example["style"] == "shortcut":
        assert sol == f"{SHORTCUT_OPENER} \\boxed{{{boxed}}}"
        return boxed == sum(terms)
    steps = re.findall(r"(\d+)\+(\d+)=(\d+)", sol)
    assert [int(b) for _, b, _ in steps] == terms[1:] and int(steps[0][0]) == terms[0]
    for (a, b, c), nxt in zip(steps, steps[1:] + [None]):
        if nxt is not None:
            assert int(nxt[0]) == int(c)  # each partial sum is carried into the next line
    return all(int(a) + int(b) == int(c) for a, b, c in steps) and boxed == int(steps[-1][2]) == sum(terms)


def test_sft_examples_mix_error_rates_and_arithmetic():
    config = TaskConfig(reliable_fraction=0.3, shortcut_error_rate=0.6, reliable_error_rate=0.1)
    examples = make_sft_examples(4000, seed=1, config=config)
    reliable = [e for e in examples if e["style"] == "reliable"]
    shortcut = [e for e in examples if e["style"] == "shortcut"]
    assert _binomial_ok(len(reliable), 4000, 0.3)
    assert all(e["solution"].startswith(RELIABLE_OPENER + " ") for e in reliable)
    for group, rate in ((shortcut, 0.6), (reliable, 0.1)):
        wrong = sum(not e["teacher_correct"] for e in group)
        assert _binomial_ok(wrong, len(group), rate), (wrong, len(group), rate)
        assert all(_check_solution_arithmetic(e) == e["teacher_correct"] for e in group)
    # A wrong guess is a round number (the shortcut's systematic error).
    assert all(int(e["solution"][len("Guess: \\boxed{"):-1]) % 10 == 0 for e in shortcut if not e["teacher_correct"])
    clean = make_sft_examples(500, seed=2, config=TaskConfig(shortcut_error_rate=0.0))
    assert all(e["teacher_correct"] for e in clean)


def test_real_grader_scores_teacher_solutions():
    examples = make_sft_examples(120, seed=5, config=TaskConfig(shortcut_error_rate=0.5, reliable_error_rate=0.2))
    scores = grade_batch([e["solution"] for e in examples], [e["answer"] for e in examples])
    assert scores == [1.0 if e["teacher_correct"] else 0.0 for e in examples]
    assert {e["teacher_correct"] for e in examples} == {True, False}
    assert [response_style(e["solution"]) for e in examples] == [e["style"] for e in examples]
    assert response_style("  The answer is 3") == "other"
    rows = make_problems(5, seed=0)
    assert len(rows) == 5 and all(set(r) >= {"problem", "answer"} for r in rows)  # the fields of real data sets


# ---------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_style_tokens():
    tok = build_tokenizer()
    rng = np.random.default_rng(0)
    alphabet = list("0123456789+=?,. abcxyzSGQ:{}\\\n") + ["Sum:", "Guess:", "\\boxed{"]
    texts = ["".join(rng.choice(alphabet, size=rng.integers(1, 40))) for _ in range(200)]
    texts += [e["solution"] for e in make_sft_examples(50, seed=0)]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # Each style opens with one distinct token id; digits are one token each.
    sum_ids = tok(RELIABLE_OPENER + " 12+34", add_special_tokens=False)["input_ids"]
    guess_ids = tok(SHORTCUT_OPENER + " \\boxed{46}", add_special_tokens=False)["input_ids"]
    assert sum_ids[0] != guess_ids[0] and len(sum_ids) == 7 and len(guess_ids) == 6
    assert sum_ids[0] not in guess_ids[1:] and guess_ids[0] not in sum_ids[1:]


def test_autotokenizer_loads_offline_with_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    # With a qwen2 config.json, transformers 5 rebuilds the tokenizer as Qwen2Tokenizer: it must agree.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12+34+56=?"}]
    text = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>Be brief.<|end|><|user|>12+34+56=?<|end|><|assistant|>"
    assert text == prompt_text(tok, "12+34+56=?", system="Be brief.")
    full = text + "Sum: 12+34=46, 46+56=102. \\boxed{102}" + loaded.eos_token
    assert loaded(full, add_special_tokens=False)["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    ids = loaded(full, add_special_tokens=False)["input_ids"]
    assert ids[-1] == loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == 0
    assert loaded.decode(ids, skip_special_tokens=True) == "Be brief.12+34+56=?Sum: 12+34=46, 46+56=102. \\boxed{102}"


# ---------------------------------------------------------------------- ktae-pretrain
_SMALL = ["eval_problems=0", "hidden_size=32", "num_heads=2", "num_kv_heads=1", "intermediate_size=64",
          "num_layers=2", "batch_size=8"]


def test_pretrain_cli_writes_a_checkpoint_both_loaders_agree_on(tmp_path):
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from ktae_jax.cli.pretrain import main
    from ktae_jax.models import load_pretrained

    out = tmp_path / "base"
    assert main(["--out", str(out), "--steps", "3", "--seed", "7", "--quiet", *_SMALL]) == 0
    report = json.loads((out / "pretrain_report.json").read_text())
    assert report["config"]["steps"] == 3 and report["config"]["seed"] == 7 and np.isfinite(report["final_loss"])
    model, tok = load_pretrained(out)
    assert model.config.family == "qwen2" and model.config.num_layers == 2 and tok.eos_token_id == 1
    ids = tok([prompt_text(tok, "12+34+56=?") + "Sum: 12+34=46"], add_special_tokens=False)["input_ids"]
    ours = np.asarray(model(jnp.asarray(ids)))
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    # The same seed gives the same bytes (what base/BUILD.md promises for the shipped model).
    again = tmp_path / "again"
    assert main(["--out", str(again), "--steps", "3", "--seed", "7", "--quiet", *_SMALL]) == 0
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert sha(out / "model.safetensors") == sha(again / "model.safetensors")


def test_pretrain_cli_rejects_bad_overrides(tmp_path, capsys):
    from ktae_jax.cli.pretrain import main

    assert main(["--out", str(tmp_path), "task.no_such_knob=3"]) == 2
    assert "no_such_knob" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "learning_rate=fast"]) == 2
    assert "learning_rate" in capsys.readouterr().err


# ---------------------------------------------------------------------- the shipped base
def test_shipped_base_uses_both_styles_and_scores_in_band():
    from ktae_jax.models import load_pretrained
    from ktae_jax.tiny.measure import measure_styles

    folder = base_checkpoint_path()
    assert is_complete(folder), f"{folder} is missing files; rebuild it with the command in base/BUILD.md"
    model, tok = load_pretrained(folder)
    report = measure_styles(model, tok, TaskConfig(), n=300, seed=11)
    sampled, greedy = report["sampled"], report["greedy"]
    # Temperature 1 (what RL samples): both styles, the reliable one clearly more accurate.
    assert 0.25 <= sampled["mix"]["reliable"] <= 0.75 and sampled["mix"]["other"] <= 0.05
    by_style = sampled["accuracy_by_style"]
    assert by_style["reliable"] - by_style["shortcut"] >= 0.3, by_style
    assert 0.25 <= sampled["accuracy"] <= 0.65, sampled
    assert 0.05 <= greedy["accuracy"] <= 0.95, greedy


def test_ensure_base_keeps_a_complete_folder(tmp_path):
    import shutil

    from ktae_jax.tiny import ensure_base

    assert ensure_base() == base_checkpoint_path()
    copy = tmp_path / "base"
    shutil.copytree(base_checkpoint_path(), copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    assert ensure_base(copy, progress=False) == copy  # complete: nothing is rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == before
    (copy / "model.safetensors").unlink()
    assert not is_complete(copy)
