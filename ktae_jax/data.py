"""Training prompts: JSONL / Parquet rows -> templated, tokenised, left-padded prompt batches (grain).

1. READ every row of every file; a malformed row is an error naming the file and line.
2. TEMPLATE each problem: the tokenizer's chat template with the system prompt (the Qwen2.5-Math
   protocol), or the plain problem text.
3. TOKENISE without added special tokens; prompts longer than `max_prompt_len` are filtered or
   left-truncated (keeping the end, where the question is asked), and counted.
4. ORDER with grain: a seeded shuffle, a new permutation per epoch, fixed-size batches. The
   iterator's position is a small dict saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from ktae_jax import builtin
from ktae_jax.config import DataSection
from ktae_jax.policy import pad_token_id

# Used when a tokenizer has no chat template of its own (Qwen2.5's chat format).
QWEN_CHAT_FALLBACK = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


class DataError(ValueError):
    """A malformed data file or row; the message names the file and line."""


def read_rows(path: str | pathlib.Path, prompt_field: str, answer_field: str) -> list[dict[str, Any]]:
    """Rows of a JSONL or Parquet file as {"problem": str, "answer": reference, "source": "file:line"}."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".parquet":
        raw = _parquet_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        raw = []
        with path.open("rb") as handle:  # decoded line by line: an undecodable line is named
            for number, data in enumerate(handle, 1):
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{number}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                raw.append((f"{path}:{number}", row))
    else:
        raise DataError(f"{path}: unsupported data file type {path.suffix!r} (use .jsonl or .parquet)")
    rows = [_checked_row(where, row, prompt_field, answer_field) for where, row in raw]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _parquet_rows(path: pathlib.Path) -> list[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0][:200]})") from None
    return [(f"{path}:row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


def _checked_row(where: str, row: Any, prompt_field: str, answer_field: str) -> dict[str, Any]:
    """One row as the trainer keeps it, or DataError naming the row: every row is checked when the
    file is read, so a bad one stops the run before any work, not at the step that meets it."""
    from ktae_jax.rewards.equivalence import reference_candidates

    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    for field in (prompt_field, answer_field):
        if field not in row or row[field] is None:
            raise DataError(f"{where}: missing field {field!r} (has: {', '.join(map(str, row))})")
    if not isinstance(row[prompt_field], str) or not row[prompt_field].strip():
        raise DataError(f"{where}: field {prompt_field!r} must be a non-empty string")
    answer = row[answer_field]
    try:
        candidates = reference_candidates(answer)
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: field {answer_field!r}: {err}") from None
    if not [c for c in candidates if c.strip()]:
        raise DataError(f"{where}: field {answer_field!r} is empty ({answer!r}): no response could ever match it")
    if any(c.strip().lower() in ("nan", "inf", "-inf") for c in candidates) and not isinstance(answer, str):
        raise DataError(f"{where}: field {answer_field!r} is not a finite number ({answer!r})")
    return {"problem": row[prompt_field], "answer": answer, "source": where}


def format_prompt(problem: str, tokenizer: Any, cfg: DataSection) -> str:
    """The prompt text for one problem (step 2)."""
    if cfg.template == "plain":
        return problem
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages = system + [{"role": "user", "content": problem}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return QWEN_CHAT_FALLBACK.format(system=cfg.system_prompt, user=problem)  # Qwen's format always has one


@dataclasses.dataclass
class PromptStats:
    rows: int = 0  # rows read
    filtered: int = 0  # dropped as too long
    truncated: int = 0  # left-truncated to max_prompt_len

    def summary(self, max_prompt_len: int) -> str:
        return (f"data: {self.rows} rows, {self.rows - self.filtered} usable prompts; {self.filtered} filtered and "
                f"{self.truncated} truncated as longer than data.max_prompt_len={max_prompt_len}")


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    ids: np.ndarray  # [P, Tp] int32, left-padded
    mask: np.ndarray  # [P, Tp] int32
    answers: list[Any]  # references, as the dataset stores them
    problems: list[str]

    def trimmed(self) -> "PromptBatch":
        """Without the left-padding columns no prompt of the batch needs, to a bucket width (see
        `bucket_width`): less prefill work and a smaller cache, at the price of one compilation
        per width met."""
        width = bucket_width(int(self.mask.sum(axis=1).max()), self.ids.shape[1])
        return dataclasses.replace(self, ids=self.ids[:, -width:], mask=self.mask[:, -width:])


def bucket_width(longest: int, limit: int) -> int:
    """The smallest of 8, 12, 16, 24, 32, 48, ... (8 or 12 times a power of 2) that holds `longest`,
    at most `limit`: few distinct widths (each one compiled once), and at most a third of them padding."""
    width = 8
    while width < longest:
        width = width * 3 // 2 if width & (width - 1) == 0 else width * 4 // 3
    return min(width, limit)


def tokenize_prompts(rows: Sequence[dict[str, Any]], tokenizer: Any, cfg: DataSection) -> tuple[list[dict], PromptStats]:
    """Steps 2 and 3 for every row: adds "ids" (a list of ints) and drops or truncates long prompts."""
    stats = PromptStats(rows=len(rows))
    texts = [format_prompt(row["problem"], tokenizer, cfg) for row in rows]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    kept = []
    for row, ids in zip(rows, encoded):
        if len(ids) > cfg.max_prompt_len:
            if cfg.overlong_prompts == "filter":
                stats.filtered += 1
                continue
            stats.truncated += 1
            ids = ids[-cfg.max_prompt_len:]
        kept.append({**row, "ids": list(ids)})
    if not kept:
        raise DataError(f"every one of the {len(rows)} prompts is longer than data.max_prompt_len={cfg.max_prompt_len}")
    return kept, stats


def left_pad(sequences: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, length - len(seq):] = seq
            mask[i, length - len(seq):] = 1
    return ids, mask


class PromptData:
    """An endless (or `num_epochs`-long) stream of prompt batches with a checkpointable position.

    The position counts prompts, not batches, so a resumed run continues at the same prompt even
    when `rollout.prompts_per_step` changed: batch k of P prompts is items [n, n + P) of the
    shuffled, repeated stream, where n prompts have been handed out before it.
    """

    def __init__(self, rows: Sequence[dict[str, Any]], tokenizer: Any, cfg: DataSection, batch_prompts: int,
                 pad_id: int | None = None):
        self.cfg = cfg
        self.batch_prompts = batch_prompts
        self.examples, self.stats = tokenize_prompts(rows, tokenizer, cfg)
        if len(self.examples) < batch_prompts:
            raise DataError(f"only {len(self.examples)} usable prompts ({self.stats.filtered} of {self.stats.rows} "
                            f"filtered as longer than data.max_prompt_len={cfg.max_prompt_len}), fewer than one "
                            f"step's rollout.prompts_per_step={batch_prompts}")
        self.pad_id = pad_token_id(tokenizer) if pad_id is None else pad_id
        epochs = None if cfg.num_epochs < 0 else cfg.num_epochs
        self._stream = grain.MapDataset.source(self.examples).shuffle(seed=cfg.shuffle_seed).repeat(epochs)
        self._total = None if epochs is None else len(self.examples) * epochs
        self.position = 0  # prompts handed out so far

    def __next__(self) -> PromptBatch:
        start, stop = self.position, self.position + self.batch_prompts
        if self._total is not None and stop > self._total:
            raise StopIteration(f"data exhausted after data.num_epochs={self.cfg.num_epochs}")
        examples = [self._stream[i] for i in range(start, stop)]
        self.position = stop
        ids, mask = left_pad([e["ids"] for e in examples], self.cfg.max_prompt_len, self.pad_id)
        return PromptBatch(ids, mask, [e["answer"] for e in examples], [e["problem"] for e in examples])

    def __iter__(self):
        return self

    def steps_left(self) -> int | None:
        """Whole batches left before the data is exhausted (None: endless)."""
        return None if self._total is None else (self._total - self.position) // self.batch_prompts

    def metrics(self) -> dict[str, int]:
        return {"data/prompts_used": self.position, "data/prompts_usable": len(self.examples),
                "data/prompts_filtered": self.stats.filtered, "data/prompts_truncated": self.stats.truncated}

    def get_state(self) -> dict[str, Any]:
        return {"prompts": self.position, "usable_prompts": len(self.examples)}

    def set_state(self, state: dict[str, Any], *, saved_batch_prompts: int | None = None) -> None:
        """`state` from `get_state`, or grain's {"next_index": batches} of older checkpoints (batches of
        `saved_batch_prompts`, the checkpoint's rollout.prompts_per_step)."""
        if "prompts" in state:
            self.position = int(state["prompts"])
        elif "next_index" in state:
            self.position = int(state["next_index"]) * (saved_batch_prompts or self.batch_prompts)
        else:
            raise DataError(f"unrecognised data position in the checkpoint: {state}")


def load_rows(cfg: DataSection) -> list[dict[str, Any]]:
    """Rows of every configured file; a built-in name ("tiny": the generated tiny task) stands for its rows."""
    rows: list[dict[str, Any]] = []
    for name in cfg.train_files:
        named = builtin.dataset_rows(name, cfg)
        rows.extend(named if named is not None else read_rows(name, cfg.prompt_field, cfg.answer_field))
    return rows
