"""`ktae-eval`: the paper's evaluation of a Hugging Face checkpoint folder on math benchmarks.

    ktae-eval --checkpoint DIR --benchmarks math500,aime24,amc23,minerva_math,olympiadbench
              --data-dir DIR --out DIR [--limit N] [--max-new-tokens 3000] [--batch-prompts 16]
              [--mesh-fsdp N --mesh-tensor N] [--coordinator H:P --num-processes N --process-id I]

Writes `OUT/<benchmark>.jsonl` (one record per item), `OUT/summary.md` and `OUT/summary.json`.
Running it again with the same OUT skips the items already there. `--checkpoint tiny` is the
shipped tiny base model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ktae_jax.evaluate import PAPER_BENCHMARKS


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ktae-eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="Hugging Face folder (config.json, safetensors, tokenizer)"
                    " or 'tiny'")
    ap.add_argument("--benchmarks", default=",".join(PAPER_BENCHMARKS),
                    help="comma-separated names; each is DATA_DIR/<name>.jsonl (default: the paper's five)")
    ap.add_argument("--data-dir", required=True, help="folder of <benchmark>.jsonl files (fields problem, answer)")
    ap.add_argument("--out", required=True, help="output folder (per-item JSONL, summary.md, summary.json)")
    ap.add_argument("--limit", type=int, help="only the first N items of each benchmark")
    ap.add_argument("--max-new-tokens", type=int, default=3000, help="response length limit (the paper: 3000)")
    ap.add_argument("--batch-prompts", type=int, default=16, help="prompts per sampler call")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    ap.add_argument("--mesh-fsdp", type=int, default=1, help="mesh fsdp axis (data takes the remaining devices)")
    ap.add_argument("--mesh-tensor", type=int, default=1, help="mesh tensor axis")
    ap.add_argument("--workers", type=int, default=0, help="grading processes (0 = one per CPU core)")
    ap.add_argument("--grade-timeout", type=float, default=5.0, help="seconds allowed to grade one answer")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--coordinator", help="multi-host: coordinator host:port (auto-detected on TPU and SLURM)")
    ap.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    ap.add_argument("--process-id", type=int, help="multi-host: this process's id")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    if not names:
        ap.error("--benchmarks: give at least one name")
    for flag, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-prompts", args.batch_prompts)):
        if value is not None and value < 1:
            ap.error(f"{flag}={value}: must be >= 1")

    from ktae_jax import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    from ktae_jax.evaluate import EvalError, Protocol, evaluate, load_benchmarks, markdown_table
    from ktae_jax.mesh import MeshConfig, make_mesh
    from ktae_jax.models import CheckpointError
    from ktae_jax.policy import load_policy

    try:
        benchmarks = load_benchmarks(args.data_dir, names)
        mesh = make_mesh(MeshConfig(data=-1, fsdp=args.mesh_fsdp, tensor=args.mesh_tensor))
        policy = load_policy(args.checkpoint, dtype=args.dtype, mesh=mesh)
        summary = evaluate(
            policy.model, policy.tokenizer, benchmarks, out_dir=args.out, batch_prompts=args.batch_prompts, mesh=mesh,
            limit=args.limit, stop_ids=policy.stop_ids,
            protocol=Protocol(max_new_tokens=args.max_new_tokens), label=policy.folder.name,
            progress=not args.no_progress, grade_workers=args.workers or None, grade_timeout_s=args.grade_timeout,
        )
    except (EvalError, CheckpointError, ValueError, OSError, OverflowError, MemoryError) as err:  # OSError: e.g. an unwritable --out
        print(f"ktae-eval: {err}", file=sys.stderr)
        return 1
    if summary is not None:
        print(markdown_table(summary))
        print(f"per-item records and summary.json in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
