"""Evaluation with the paper's protocol: greedy answers to benchmark problems, graded and tabulated.

The protocol (shared/eval/README.md): the Qwen2.5-Math chat template with its system prompt,
greedy decoding, at most 3,000 new tokens, the last `\\boxed{}` of a response graded against the
reference (a string, a number or a list of accepted answers), accuracy and mean response length
per benchmark plus their unweighted means. `evaluate` runs it for the CLI (`ktae-eval`) and for
the trainer (a validation file every N steps: pass `(graphdef, params)` and the trainer's pool).

The steps of `evaluate`:
  1. SELECT     the first `limit` rows of each benchmark.
  2. RESUME     rows already recorded in `out_dir/<name>.jsonl` are skipped; a torn last line (a
                run killed mid-write) is dropped.
  3. SAMPLE     batches of `batch_prompts` prompts, all left-padded to one width and the last batch
                filled with copies, so one compiled sampler serves every batch       (device)
  4. GRADE      the responses in the grader pool, while the next batch samples         (host)
  5. WRITE      each batch's records appended to the JSONL at once: a kill loses one batch at most
  6. SUMMARISE  summary.json and summary.md (benchmarks as columns, like the paper's table)
On several hosts every process samples (the batches are sharded over the mesh) and process 0
grades, writes and summarises; the others return None.

Letters: P prompts of a batch (one greedy response each), T prompt columns, R response columns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ktae_jax.config import DataSection
from ktae_jax.data import format_prompt, left_pad, read_rows
from ktae_jax.mesh import batch_devices, batch_sharding, place, to_host
from ktae_jax.policy import pad_token_id
from ktae_jax.rewards import GraderPool, extract_boxed
from ktae_jax.sample import SamplingConfig, sample_jit

# The paper's table: its column order and headers. Other benchmarks follow, in the order given.
PAPER_COLUMNS = {"aime24": "AIME24", "amc23": "AMC23", "math500": "MATH500", "minerva_math": "Minerva",
                 "olympiadbench": "Olympiad"}
PAPER_BENCHMARKS = ("math500", "aime24", "amc23", "minerva_math", "olympiadbench")
PROTOCOL_FILE = "protocol.json"
# Prompt widths are rounded up to this, so validation sets of similar size share one compilation.
_WIDTH_QUANTUM = 32


class EvalError(ValueError):
    """Bad evaluation input or an output folder that belongs to another evaluation; names the file."""


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What decides the responses; an output folder holds the results of one protocol only."""

    max_new_tokens: int = 3000  # response length limit (the paper: 3,000)
    template: str = "chat"  # "chat": the tokenizer's chat template with `system_prompt`
    system_prompt: str = DataSection().system_prompt  # the Qwen2.5-Math system prompt

    @classmethod
    def of_run(cls, cfg: Any) -> "Protocol":
        """The protocol of a training run's own responses (`TrainConfig`: its length limit and template)."""
        return cls(max_new_tokens=cfg.rollout.max_new_tokens, template=cfg.data.template,
                   system_prompt=cfg.data.system_prompt)

    def data_section(self) -> DataSection:
        return DataSection(template=self.template, system_prompt=self.system_prompt)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- inputs
def load_benchmarks(data_dir: str | pathlib.Path, names: Sequence[str], *, prompt_field: str = "problem",
                    answer_field: str = "answer") -> dict[str, list[dict[str, Any]]]:
    """{name: rows} from `data_dir/<name>.jsonl`; a missing file is an error listing what is there."""
    folder = pathlib.Path(data_dir)
    if not folder.is_dir():
        raise EvalError(f"{folder}: the data directory does not exist")
    out = {}
    for name in names:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            present = sorted(p.stem for p in folder.glob("*.jsonl"))
            raise EvalError(f"{path}: no such benchmark file (benchmarks in {folder}: {', '.join(present) or 'none'})")
        out[name] = read_rows(path, prompt_field, answer_field)
    return out


def read_records(path: pathlib.Path, *, repair: bool) -> dict[int, dict[str, Any]]:
    """{index: record} of a per-item JSONL; a torn last line is ignored (and cut off when `repair`)."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete, _, torn = data.rpartition(b"\n")
    if torn and repair:
        # Appends must start on a fresh line; the torn record is redone.
        with path.open("r+b") as handle:
            handle.truncate(len(complete) + 1 if complete else 0)
    records = {}
    for number, line in enumerate(complete.split(b"\n") if complete else [], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            index = int(record["index"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise EvalError(f"{path}:{number}: not a record of ktae-eval ({err}); use another output folder") from None
        records[index] = record
    return records


def _check_protocol(out_dir: pathlib.Path, protocol: Protocol, *, write: bool) -> None:
    path = out_dir / PROTOCOL_FILE
    wanted = dataclasses.asdict(protocol)
    if path.exists():
        found = json.loads(path.read_text())
        for key, value in wanted.items():
            if found.get(key) != value:
                raise EvalError(f"{path}: the results there were made with {key}={found.get(key)!r}, not {value!r};"
                                " use another output folder")
    elif write:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted, indent=1) + "\n")


# ---------------------------------------------------------------------- multi-host helpers
def _is_main() -> bool:
    return jax.process_index() == 0


def _from_main(x: np.ndarray) -> np.ndarray:
    """Process 0's value of `x` on every process (only process 0 reads the output folder)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def _place(host: np.ndarray, mesh: Mesh | None, *, replicated: bool = False) -> jax.Array:
    """A host array (the same on every process) on the mesh: batch-sharded, or replicated."""
    if mesh is None:
        return jnp.asarray(host)
    return place(host, NamedSharding(mesh, PartitionSpec()) if replicated else batch_sharding(mesh, host.shape))


# ---------------------------------------------------------------------- grading (host)
def make_records(items: Sequence[dict[str, Any]], responses: Sequence[str], lengths: Sequence[int],
                 finished: Sequence[bool], scores: Sequence[float]) -> list[dict[str, Any]]:
    """Per-item records for `responses` to `items` (rows with "index", "problem", "prompt", "answer")."""
    return [
        {"index": item["index"], "problem": item["problem"], "prompt": item["prompt"], "response": response,
         "extracted": extract_boxed(response), "reference": item["answer"], "correct": bool(score > 0),
         "length": int(length), "finished": bool(done)}
        for item, response, length, done, score in zip(items, responses, lengths, finished, scores)
    ]


def _append_records(path: pathlib.Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """5. WRITE a whole batch's records at once, synced: a kill loses at most one batch."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())
    return records


# ---------------------------------------------------------------------- summary
def summarize(records: Mapping[str, Sequence[dict[str, Any]]], *, label: str = "",
              protocol: Protocol = Protocol()) -> dict[str, Any]:
    """Accuracy (a fraction) and mean length per benchmark, and their unweighted means."""
    per: dict[str, dict[str, Any]] = {}
    for name, recs in records.items():
        n = len(recs)
        per[name] = {
            "items": n,
            "correct": sum(r["correct"] for r in recs),
            "accuracy": sum(r["correct"] for r in recs) / n if n else math.nan,
            "mean_length": sum(r["length"] for r in recs) / n if n else math.nan,
            "no_answer": sum(r["extracted"] is None for r in recs),
            "truncated": sum(not r["finished"] for r in recs),
        }
    scored = [p for p in per.values() if p["items"]]
    average = {
        "accuracy": float(np.mean([p["accuracy"] for p in scored])) if scored else math.nan,
        "mean_length": float(np.mean([p["mean_length"] for p in scored])) if scored else math.nan,
        "items": sum(p["items"] for p in per.values()),
    }
    return {"model": label, "protocol": dataclasses.asdict(protocol), "benchmarks": per, "average": average}


def column_order(names: Sequence[str]) -> list[str]:
    """The paper's column order for its benchmarks, then the others as given."""
    known = [n for n in PAPER_COLUMNS if n in names]
    return known + [n for n in names if n not in PAPER_COLUMNS]


def markdown_table(summary: dict[str, Any]) -> str:
    """The summary as the paper lays out its table: one column per benchmark, then the average."""
    names = column_order(list(summary["benchmarks"]))
    per, avg = summary["benchmarks"], summary["average"]
    pct = lambda x: "-" if math.isnan(x) else f"{100 * x:.1f}"  # noqa: E731
    num = lambda x: "-" if math.isnan(x) else f"{x:.1f}"  # noqa: E731
    rows = [
        ["", *(PAPER_COLUMNS.get(n, n) for n in names), "avg"],
        ["---", *("---:" for _ in names), "---:"],
        ["accuracy (%)", *(pct(per[n]["accuracy"]) for n in names), pct(avg["accuracy"])],
        ["mean response length (tokens)", *(num(per[n]["mean_length"]) for n in names), num(avg["mean_length"])],
        ["items", *(str(per[n]["items"]) for n in names), str(avg["items"])],
    ]
    p = summary["protocol"]
    head = [f"# Evaluation{': ' + summary['model'] if summary['model'] else ''}", "",
            f"Greedy decoding, at most {p['max_new_tokens']} new tokens, {p['template']} template; "
            "accuracy of the last `\\boxed{}` answer; avg = unweighted mean over the benchmarks.", ""]
    return "\n".join(head + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def validation_metrics(summary: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Flat metrics for the trainer's logger: `eval/<name>/accuracy`, ..., `eval/accuracy`."""
    out = {}
    for name, p in summary["benchmarks"].items():
        out[f"{prefix}/{name}/accuracy"] = float(p["accuracy"])
        out[f"{prefix}/{name}/mean_length"] = float(p["mean_length"])
    out[f"{prefix}/accuracy"] = float(summary["average"]["accuracy"])
    out[f"{prefix}/mean_length"] = float(summary["average"]["mean_length"])
    return out


# ---------------------------------------------------------------------- the evaluation
def _split_policy(policy: Any) -> tuple[nnx.GraphDef, nnx.State]:
    if isinstance(policy, tuple):
        graphdef, state = policy
        return graphdef, state
    return nnx.split(policy)


def _select(benchmarks: Mapping[str, Sequence[dict[str, Any]]], tokenizer: Any, protocol: Protocol,
            out: pathlib.Path, limit: int | None, main: bool) -> tuple[dict, dict, int, int]:
    """Steps 1-2: (done records, rows still to do, longest prompt, most rows) per benchmark; process 0
    decides what is done, the others follow."""
    cfg = protocol.data_section()
    done: dict[str, dict[int, dict[str, Any]]] = {}
    todo: dict[str, list[dict[str, Any]]] = {}
    width, largest = 0, 0
    for name, rows in benchmarks.items():
        rows = list(rows)[:limit]
        path = out / f"{name}.jsonl"
        done[name] = read_records(path, repair=True) if main else {}
        for index, record in done[name].items():
            if index < len(rows) and record.get("problem") != rows[index]["problem"]:
                raise EvalError(f"{path}: item {index} is not the problem of this benchmark's row {index};"
                                " the folder belongs to another data set")
        if main:  # records of rows beyond `limit` stay on disk but are not counted
            done[name] = {i: r for i, r in done[name].items() if i < len(rows)}
        flags = _from_main(np.asarray([i in done[name] for i in range(len(rows))], bool))
        prompts = [format_prompt(row["problem"], tokenizer, cfg) for row in rows]
        ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if rows else []
        todo[name] = [{"index": i, "problem": row["problem"], "answer": row["answer"], "prompt": prompt,
                       "ids": list(seq)}
                      for i, (row, prompt, seq) in enumerate(zip(rows, prompts, ids)) if not flags[i]]
        # The sampler's shape comes from every selected row, done or not: a resumed run reuses
        # the compilation of the first.
        width = max([width, *map(len, ids)])
        largest = max(largest, len(rows))
    return done, todo, width, largest


def evaluate(
    policy: Any, tokenizer: Any, benchmarks: Mapping[str, Sequence[dict[str, Any]]], *,
    out_dir: str | pathlib.Path, batch_prompts: int = 16, mesh: Mesh | None = None,
    pool: GraderPool | None = None, limit: int | None = None, stop_ids: Sequence[int] | None = None,
    protocol: Protocol = Protocol(), label: str = "", progress: bool = True, grade_workers: int | None = None,
    grade_timeout_s: float = 5.0,
) -> dict[str, Any] | None:
    """Greedy responses to every selected row, graded; returns the summary (None off process 0).

    `policy` is a `Transformer` or `(graphdef, params)` (the trainer's), already placed on `mesh`.
    `benchmarks` maps a name to rows with "problem" and "answer" (as `read_rows` gives them).
    `protocol` decides the responses (length limit, template). `stop_ids` default to the tokenizer's
    EOS; the pad id is `ktae_jax.policy.pad_token_id`'s. Without `pool`, one of `grade_workers` processes
    (default: one per core) is started only if there is something to grade, and closed at the end.
    """
    if limit is not None and limit < 1:
        raise EvalError(f"limit={limit}: must be >= 1")
    if batch_prompts < 1:
        raise EvalError(f"batch_prompts={batch_prompts}: must be >= 1")
    out = pathlib.Path(out_dir)
    main = _is_main()
    _check_protocol(out, protocol, write=main)
    stops = tuple(stop_ids) if stop_ids is not None else (int(tokenizer.eos_token_id),)
    config = SamplingConfig(max_new_tokens=protocol.max_new_tokens, greedy=True, eos_ids=stops,
                            pad_id=pad_token_id(tokenizer, stops), beyond_positions=True)  # warned about below

    # 1-2. SELECT and RESUME
    done, todo, width, largest = _select(benchmarks, tokenizer, protocol, out, limit, main)
    width, batch_prompts = _batch_shape(width, largest, batch_prompts, mesh)
    pending = sum(map(len, todo.values()))
    if pending:
        _warn_beyond_positions(policy, width, protocol.max_new_tokens)
    own_pool = pool is None and main and bool(pending)
    if own_pool:
        pool = GraderPool(grade_workers, grade_timeout_s)
    bar = None
    if progress and main and pending:
        from tqdm.auto import tqdm

        bar = tqdm(total=pending, desc="eval", dynamic_ncols=True)

    def written(name: str, records: list[dict[str, Any]]) -> None:
        done[name].update((r["index"], r) for r in records)
        if bar is not None:
            bar.update(len(records))

    try:
        # 3-5. SAMPLE, GRADE, WRITE
        _sample_grade_write(_split_policy(policy), tokenizer, todo, out, config=config, width=width,
                            batch_prompts=batch_prompts, mesh=mesh, pool=pool if main else None, written=written)
    finally:
        if bar is not None:
            bar.close()
        if own_pool and pool is not None:
            pool.close()
    if not main:
        return None
    # 6. SUMMARISE
    summary = summarize({name: [done[name][i] for i in sorted(done[name])] for name in benchmarks},
                        label=label, protocol=protocol)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown_table(summary))
    return summary


def _batch_shape(width: int, largest: int, batch_prompts: int, mesh: Mesh | None) -> tuple[int, int]:
    """(prompt width, prompts per batch) of the one compiled sampler: the width rounded up to
    `_WIDTH_QUANTUM`; no bigger batches than the largest benchmark needs (filler rows cost as much
    as real ones), rounded up so that every batch device gets the same number of prompts."""
    width = -(-width // _WIDTH_QUANTUM) * _WIDTH_QUANTUM
    batch_prompts = min(batch_prompts, max(largest, 1))
    per = batch_devices(mesh)
    return width, -(-batch_prompts // per) * per


def _warn_beyond_positions(policy: Any, width: int, max_new_tokens: int) -> None:
    """A warning (not an error: one long benchmark prompt must not stop an evaluation) when prompts
    and responses may run past the model's max_position_embeddings."""
    limit_pos = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
    if limit_pos and width + max_new_tokens > limit_pos:
        warnings.warn(f"prompts of up to {width} tokens + {max_new_tokens} new tokens exceed the model's "
                      f"max_position_embeddings={limit_pos}", stacklevel=3)


def _sample_grade_write(split: tuple[nnx.GraphDef, nnx.State], tokenizer: Any, todo: dict[str, list[dict]],
                        out: pathlib.Path, *, config: SamplingConfig, width: int, batch_prompts: int,
                        mesh: Mesh | None, pool: GraderPool | None, written: Any) -> None:
    """Steps 3-5 over every row of `todo`, pipelined: while the device samples batch b+1, the pool
    grades batch b (`submit` returns a future), whose records are then appended to its benchmark's
    JSONL and passed to `written(name, records)`. Without `pool` (processes other than 0) the
    batches are only sampled: the mesh needs every process."""
    graphdef, state = split
    key = _place(np.asarray(jax.random.PRNGKey(0)), mesh, replicated=True)  # unused by greedy decoding
    graded: tuple | None = None  # (benchmark, items, texts, lengths, finished, future) of batch b

    def write(name: str, batch: list, texts: list, lengths: list, finished: list, future) -> None:
        written(name, _append_records(out / f"{name}.jsonl",
                                      make_records(batch, texts, lengths, finished, future.result().scores)))

    for name, items in todo.items():
        for start in range(0, len(items), batch_prompts):
            batch = items[start:start + batch_prompts]
            # 3. SAMPLE: one fixed [batch_prompts, width] shape; filler rows repeat the first prompt.
            seqs = [it["ids"] for it in batch] + [batch[0]["ids"]] * (batch_prompts - len(batch))
            ids_PxT, mask_PxT = (_place(x, mesh) for x in left_pad(seqs, width, config.pad_id))
            rollout = sample_jit(graphdef, state, ids_PxT, mask_PxT, key, config=config, mesh=mesh)  # async
            if graded is not None:
                write(*graded)
                graded = None
            tokens_PxR, lengths_P = to_host((rollout.tokens, rollout.lengths))  # host sync
            if pool is None:
                continue
            # 4. GRADE (in the background)
            n = len(batch)
            token_rows = [tokens_PxR[i, :lengths_P[i]].tolist() for i in range(n)]
            texts = tokenizer.batch_decode(token_rows, skip_special_tokens=True)
            finished = [bool(row) and row[-1] in config.eos_ids for row in token_rows]
            graded = (name, batch, texts, lengths_P[:n].tolist(), finished,
                      pool.submit(texts, [it["answer"] for it in batch]))
    if graded is not None:
        write(*graded)
