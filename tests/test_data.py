"""Prompt data: reading JSONL / Parquet, errors naming file and line, templates, length policy, order."""

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _model_helpers import make_tokenizer

from ktae_jax.config import DataSection
from ktae_jax.data import DataError, PromptBatch, PromptData, bucket_width, format_prompt, read_rows


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reads_jsonl_and_parquet(tmp_path, shared_dir):
    rows = read_rows(shared_dir / "eval" / "math500.jsonl", "problem", "answer")
    assert len(rows) == 500 and rows[0]["source"].endswith("math500.jsonl:1")
    table = pa.table({"question": ["1+1?", "2+2?"], "solution": ["2", "4"]})
    pq.write_table(table, tmp_path / "d.parquet")
    rows = read_rows(tmp_path / "d.parquet", "question", "solution")
    assert [r["answer"] for r in rows] == ["2", "4"] and rows[1]["source"].endswith("row 2")


@pytest.mark.parametrize("bad, message", [
    ('{"problem": "x", "answer": "1"}\n{"problem": "y"', r"bad.jsonl:2: not valid JSON"),
    ('{"problem": "x", "answer": "1"}\n{"question": "y", "answer": 2}', r"bad.jsonl:2: missing field 'problem'"),
    ('{"problem": "", "answer": "1"}', r"bad.jsonl:1: field 'problem' must be a non-empty string"),
    ('[1, 2]', r"bad.jsonl:1: a row must be an object"),
    # Answers are checked when the file is read, not at the step that meets them:
    ('{"problem": "x", "answer": "1"}\n{"problem": "y", "answer": ""}', r"bad.jsonl:2: field 'answer' is empty"),
    ('{"problem": "x", "answer": "  "}', r"bad.jsonl:1: field 'answer' is empty"),
    ('{"problem": "x", "answer": []}', r"bad.jsonl:1: field 'answer' is empty"),
    ('{"problem": "x", "answer": {"value": 3}}', r"bad.jsonl:1: field 'answer': .*got dict"),
    ('{"problem": "x", "answer": [1, {"a": 2}]}', r"bad.jsonl:1: field 'answer': .*got dict"),
    ('{"problem": "x", "answer": true}', r"bad.jsonl:1: field 'answer': .*bool"),
    ('{"problem": "x", "answer": NaN}', r"bad.jsonl:1: field 'answer' is not a finite number"),
])
def test_malformed_rows_name_file_and_line(tmp_path, bad, message):
    (tmp_path / "bad.jsonl").write_text(bad + "\n")
    with pytest.raises(DataError, match=message):
        read_rows(tmp_path / "bad.jsonl", "problem", "answer")


def test_templates():
    tok = make_tokenizer()
    cfg = DataSection(system_prompt="be brief")
    chat = format_prompt("what is 1 plus 1 ?", tok, cfg)
    assert chat.startswith("<|im_start|> system be brief") and chat.endswith("<|im_start|> assistant ")
    assert format_prompt("what is 1 ?", tok, DataSection(template="plain")) == "what is 1 ?"


def test_length_policy_and_checkpointable_order(tmp_path):
    tok = make_tokenizer()
    rows = [{"problem": "what is " + " plus ".join(["1"] * n) + " ?", "answer": str(n)} for n in range(1, 13)]
    rows = read_rows(_write_jsonl(tmp_path / "d.jsonl", rows), "problem", "answer")
    cfg = DataSection(template="plain", max_prompt_len=12, overlong_prompts="filter", shuffle_seed=3)
    data = PromptData(rows, tok, cfg, batch_prompts=2)
    lengths = [len(e["ids"]) for e in data.examples]
    assert data.stats.filtered == sum(2 * n + 1 > 12 for n in range(1, 13)) and max(lengths) <= 12
    truncating = PromptData(rows, tok, DataSection(template="plain", max_prompt_len=12, overlong_prompts="truncate"), 2)
    assert truncating.stats.truncated == data.stats.filtered and len(truncating.examples) == 12
    assert tok.decode(truncating.examples[-1]["ids"]).endswith("1?")  # keeps the end of the question

    first = next(data)
    assert first.ids.shape == (2, 12) and np.all(first.mask[:, -1] == 1)  # left-padded
    assert np.all(first.ids[first.mask == 0] == tok.pad_token_id)
    state = data.get_state()
    following = [next(data).problems for _ in range(4)]
    again = PromptData(rows, tok, cfg, batch_prompts=2)
    again.set_state(state)
    assert [next(again).problems for _ in range(4)] == following
    # Epochs: every usable prompt once per epoch, a new order each epoch.
    fresh = PromptData(rows, tok, cfg, batch_prompts=1)
    n = len(fresh.examples)
    epoch1 = [next(fresh).problems[0] for _ in range(n)]
    epoch2 = [next(fresh).problems[0] for _ in range(n)]
    assert sorted(epoch1) == sorted(epoch2) and len(set(epoch1)) == n and epoch1 != epoch2


def test_bucket_widths_are_few_and_hold_the_longest_prompt():
    widths = {bucket_width(n, 1024) for n in range(1, 1025)}
    assert sorted(widths) == [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    for n in range(1, 1025):
        w = bucket_width(n, 1024)
        assert n <= w and (w == 8 or n > w * 2 // 3)  # the smallest bucket that holds n
    assert bucket_width(21, 20) == 20 and bucket_width(200, 150) == 150  # never wider than the padded batch


def test_trimming_keeps_every_real_token():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 17, 9])
    mask = (np.arange(40)[None] >= 40 - lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(5, 50, mask.shape), 0).astype(np.int32)
    batch = PromptBatch(ids, mask, ["1", "2", "3"], ["a", "b", "c"])
    trimmed = batch.trimmed()
    assert trimmed.ids.shape == (3, 24) and np.all(trimmed.mask[:, -1] == 1)
    assert trimmed.mask.sum(1).tolist() == lengths.tolist()
    for row in range(3):
        assert trimmed.ids[row][trimmed.mask[row] > 0].tolist() == ids[row][mask[row] > 0].tolist()
    assert trimmed.answers == batch.answers and batch.ids.shape == (3, 40)


def test_good_answers_of_every_stored_kind_load(tmp_path):
    rows = read_rows(_write_jsonl(tmp_path / "ok.jsonl", [
        {"problem": "a", "answer": "12"}, {"problem": "b", "answer": 3}, {"problem": "c", "answer": 2.5},
        {"problem": "d", "answer": ["1", "one"]}, {"problem": "e", "answer": "['1', '2']"}]), "problem", "answer")
    assert [r["answer"] for r in rows] == ["12", 3, 2.5, ["1", "one"], "['1', '2']"]


def test_undecodable_and_foreign_files_are_one_line_errors(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"problem": "x", "answer": "1"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8"):
        read_rows(tmp_path / "latin1.jsonl", "problem", "answer")
    (tmp_path / "fake.parquet").write_text('{"problem": "x", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"fake.parquet: not a readable Parquet file"):
        read_rows(tmp_path / "fake.parquet", "problem", "answer")


def test_filtered_prompts_are_counted_and_too_few_is_an_error():
    tok = make_tokenizer()
    rows = [{"problem": " ".join(["1"] * n) + "?", "answer": "1", "source": f"t:{n}"} for n in range(1, 13)]
    cfg = DataSection(template="plain", max_prompt_len=12)
    data = PromptData(rows, tok, cfg, batch_prompts=2)
    usable = len(data.examples)
    assert data.stats.filtered == 12 - usable > 0
    assert f"{usable} usable prompts; {12 - usable} filtered" in data.stats.summary(12)
    assert data.metrics()["data/prompts_filtered"] == 12 - usable
    with pytest.raises(DataError, match=rf"only {usable} usable prompts .*fewer than one step's rollout.prompts_per_step={usable + 1}"):
        PromptData(rows, tok, cfg, batch_prompts=usable + 1)


def test_position_counts_prompts_so_a_batch_size_change_continues_in_place():
    tok = make_tokenizer()
    rows = [{"problem": f"{n}+1?", "answer": str(n + 1), "source": f"t:{n}"} for n in range(10)]
    cfg = DataSection(template="plain", max_prompt_len=8)
    one = PromptData(rows, tok, cfg, batch_prompts=1)
    stream = [next(one).problems[0] for _ in range(30)]  # three epochs, one prompt at a time
    big = PromptData(rows, tok, cfg, batch_prompts=4)
    assert next(big).problems + next(big).problems == stream[:8]
    small = PromptData(rows, tok, cfg, batch_prompts=3)
    small.set_state(big.get_state())  # 4 -> 3 prompts per step: continues at prompt 8
    assert [p for _ in range(4) for p in next(small).problems] == stream[8:20]
    old = PromptData(rows, tok, cfg, batch_prompts=3)
    old.set_state({"next_index": 2}, saved_batch_prompts=4)  # grain's batch count in older checkpoints
    assert next(old).problems == stream[8:11]
    finite = PromptData(rows, tok, dataclasses.replace(cfg, num_epochs=1), batch_prompts=4)
    assert finite.steps_left() == 2
    next(finite), next(finite)
    with pytest.raises(StopIteration):
        next(finite)
