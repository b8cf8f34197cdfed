"""Measuring a model on the tiny task: accuracy overall and per style, and the mix of styles.

Responses are sampled with `ktae_jax.sample` (greedy or temperature 1, no top-k/p), graded by
the real grader (`ktae_jax.rewards.grade_batch` on the `\\boxed{}` answer) and classified by
their opening token (`task.response_style`). The demo can call `style_report` on its own
rollouts, or `measure_styles` on a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ktae_jax.models import Transformer
from ktae_jax.rewards import grade_batch
from ktae_jax.sample import SamplingConfig, sample
from ktae_jax.tiny.task import TaskConfig, make_problems, reliable_solution, response_style
from ktae_jax.tiny.tokenizer import prompt_text

STYLES = ("reliable", "shortcut", "other")


def max_response_tokens(tokenizer: Any, task: TaskConfig) -> int:
    """Tokens in the longest reliable solution of `task` plus EOS, with a little slack."""
    biggest = [10**task.digits - 1] * task.num_terms
    return len(tokenizer(reliable_solution(biggest, slip=True), add_special_tokens=False)["input_ids"]) + 4


def generate(
    model: Transformer, tokenizer: Any, problems: Sequence[str], *, greedy: bool, seed: int,
    max_new_tokens: int, batch_size: int = 500,
) -> tuple[list[str], np.ndarray]:
    """(response texts without special tokens, token lengths [N]) for one response per problem."""
    encoded = [tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in problems]
    width = max(map(len, encoded))
    config = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=1.0, greedy=greedy,
        eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id,
    )
    texts, lengths = [], []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        # Pad the last chunk with copies of the first prompt: one shape, one compile.
        rows = chunk + [chunk[0]] * (batch_size - len(chunk)) if len(encoded) > batch_size else chunk
        ids = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, p in enumerate(rows):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
        key = jax.random.fold_in(jax.random.key(seed), start)
        out = jax.device_get(sample(model, ids, mask, key, config))
        for i in range(len(chunk)):
            n = int(out.lengths[i])
            texts.append(tokenizer.decode(out.tokens[i, :n].tolist(), skip_special_tokens=True))
            lengths.append(n)
    return texts, np.asarray(lengths)


def style_report(responses: Sequence[str], scores: Sequence[float], lengths: Sequence[int] | None = None) -> dict:
    """{"n", "accuracy", "mix": {style: share}, "accuracy_by_style": {style: acc or None}, ...}."""
    styles = [response_style(r) for r in responses]
    scores_N = np.asarray(scores, np.float64)
    n = len(styles)
    report: dict[str, Any] = {"n": n, "accuracy": float(scores_N.mean()) if n else 0.0, "mix": {}, "accuracy_by_style": {}}
    for s in STYLES:
        picked = np.asarray([st == s for st in styles], bool)
        report["mix"][s] = float(picked.mean()) if n else 0.0
        report["accuracy_by_style"][s] = float(scores_N[picked].mean()) if picked.any() else None
    if lengths is not None:
        report["mean_length"] = float(np.mean(lengths)) if n else 0.0
    return report


def measure_styles(
    model: Transformer, tokenizer: Any, task: TaskConfig, *, n: int = 1000, seed: int = 1,
    modes: Sequence[str] = ("greedy", "sampled"),
) -> dict[str, dict]:
    """Style reports on `n` held-out problems for greedy decoding and/or temperature-1 sampling."""
    problems = make_problems(n, seed=seed, config=task, split="test")
    out = {}
    for mode in modes:
        if mode not in ("greedy", "sampled"):
            raise ValueError(f"mode {mode!r}: expected 'greedy' or 'sampled'")
        texts, lengths = generate(
            model, tokenizer, [p["problem"] for p in problems], greedy=mode == "greedy", seed=seed,
            max_new_tokens=max_response_tokens(tokenizer, task),
        )
        scores = grade_batch(texts, [p["answer"] for p in problems])
        out[mode] = style_report(texts, scores, lengths)
    return out


def opener_key_scores(
    model: Transformer, tokenizer: Any, task: TaskConfig, *, prompts: int = 64, group_size: int = 8, seed: int = 2,
) -> dict:
    """KTAE key scores of the two style openers in groups of `group_size` temperature-1 rollouts.

    Only groups with both correct and wrong rollouts carry a signal (KTAE scores 0 elsewhere);
    the means are over those groups where the opener occurs. Also reports GRPO's view: the
    mean group-normalised advantage of rollouts opening with each style.
    """
    from ktae_jax.ktae import KTAEConfig, key_token_scores

    problems = make_problems(prompts, seed=seed, config=task, split="train")
    encoded = [tokenizer(prompt_text(tokenizer, p["problem"]), add_special_tokens=False)["input_ids"] for p in problems]
    width = max(map(len, encoded))
    ids = np.full((prompts, width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((prompts, width), np.int32)
    for i, p in enumerate(encoded):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    config = SamplingConfig(
        max_new_tokens=max_response_tokens(tokenizer, task), eos_ids=(tokenizer.eos_token_id,),
        pad_id=tokenizer.pad_token_id, num_samples=group_size,
    )
    out = jax.device_get(sample(model, ids, mask, jax.random.key(seed), config))
    texts = [tokenizer.decode(out.tokens[i, : out.lengths[i]].tolist(), skip_special_tokens=True)
             for i in range(prompts * group_size)]
    rewards_N = np.asarray(grade_batch(texts, [p["answer"] for p in problems for _ in range(group_size)]))
    opener_ids = {s: tokenizer.convert_tokens_to_ids(o) for s, o in (("reliable", "Sum:"), ("shortcut", "Guess:"))}
    keys: dict[str, list[float]] = {s: [] for s in opener_ids}
    advs: dict[str, list[float]] = {s: [] for s in opener_ids}
    styles = np.asarray([response_style(t) for t in texts])
    for g in range(prompts):
        rows = slice(g * group_size, (g + 1) * group_size)
        r = rewards_N[rows]
        if r.min() == r.max():
            continue
        key_V = np.asarray(key_token_scores(out.tokens[rows], out.mask[rows], r, vocab_size=len(tokenizer),
                                            config=KTAEConfig()))
        adv = (r - r.mean()) / (r.std() + 1e-6)
        for s, tid in opener_ids.items():
            present = styles[rows] == s
            if present.any():
                keys[s].append(float(key_V[tid]))
                advs[s].extend(adv[present].tolist())
    return {
        "groups": prompts, "mixed_groups": sum(1 for g in range(prompts)
                                               if np.ptp(rewards_N[g * group_size:(g + 1) * group_size]) > 0),
        "accuracy": float(rewards_N.mean()),
        "key_score": {s: float(np.mean(v)) if v else None for s, v in keys.items()},
        "grpo_advantage": {s: float(np.mean(v)) if v else None for s, v in advs.items()},
    }
