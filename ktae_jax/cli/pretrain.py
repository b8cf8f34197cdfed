"""`ktae-pretrain`: train the tiny task's base model by supervised learning and save it.

    ktae-pretrain --out DIR [--steps N] [--seed S] [key=value ...]

Keys are `PretrainConfig` fields, with `task.` for the task (e.g. `task.digits=3`,
`task.shortcut_error_rate=0.5`, `learning_rate=1e-3`, `eval_problems=0`). The folder gets a
Hugging Face checkpoint (config.json, model.safetensors, tokenizer) and `pretrain_report.json`
(loss curve, training time, held-out accuracy overall / per style, style mix).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ktae-pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (created; model files are overwritten)")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: PretrainConfig.steps)")
    ap.add_argument("--seed", type=int, help="seed of initialisation and data (default 0)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="PretrainConfig fields, task.* for the task")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    from ktae_jax.tiny.pretrain import PretrainConfig, apply_overrides, run

    overrides = list(args.overrides)
    overrides += [f"steps={args.steps}"] if args.steps is not None else []
    overrides += [f"seed={args.seed}"] if args.seed is not None else []
    try:
        config = apply_overrides(PretrainConfig(), overrides)
    except ValueError as exc:
        print(f"ktae-pretrain: error: {exc}", file=sys.stderr)
        return 2
    try:
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)  # an unwritable --out fails before training
        folder, report = run(config, args.out, progress=not args.quiet)
        (pathlib.Path(folder) / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    except (OSError, ValueError) as exc:
        print(f"ktae-pretrain: error: {exc}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in report.items() if k != "losses"}
    print(json.dumps(summary, indent=2))
    print(f"saved {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
