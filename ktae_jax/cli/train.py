"""`ktae-train --config FILE [--config FILE ...] [--run-dir DIR] [--max-steps N] [--dry-run]
[--compile-only --target NAME [--json]] [key=value ...]`.

`key=value` overrides may come before, between or after the flags. Exit status: 0 trained to
`run.max_steps`; 1 an error (one line on stderr: bad data, model folder, checkpoint, a busy run
directory...); 2 a bad config or command line; 143 (128 + SIGTERM) stopped by SIGTERM after
saving a checkpoint (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys

from ktae_jax.config import ConfigError, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ktae-train", description="Train a policy with GRPO / DAPO (+KTAE).")
    parser.add_argument("--config", action="append", default=[], help="YAML config; several merge in order")
    parser.add_argument("--run-dir", help="= run.run_dir (checkpoints, metrics); resumes from its latest checkpoint")
    parser.add_argument("--max-steps", type=int, help="= run.max_steps")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, mesh, per-device batch and memory estimate; do not train")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the run's programs ahead of time for --target and report whether they fit; "
                        "exit 0 if all fit, 1 if not (no hardware needed)")
    parser.add_argument("--target", help="compile-only: v4-N, v5p-N, v5e-N, v6e-N, h100xN, h200xN or a100xN")
    parser.add_argument("--json", action="store_true", help="compile-only: end with the report as one JSON line")
    parser.add_argument("--devices", type=int, help="dry run: plan for this many devices (default: the mesh's "
                        "product, or this machine's devices when an axis is -1)")
    parser.add_argument("--coordinator", help="multi-host: coordinator host:port (auto-detected on TPU and SLURM)")
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's id")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though settings that change what the run computes differ from the "
                             "checkpoint's (each change is printed and recorded in config_history.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. algo.kl_coef=0.001")
    return parser.parse_intermixed_args(argv)


EXIT_ERROR, EXIT_USAGE, EXIT_PREEMPTED = 1, 2, 143


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run.run_dir={args.run_dir}")
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"ktae-train: config error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.compile_only or args.target or args.json:
        return _compile_only(config, args)
    if args.dry_run:
        from ktae_jax.plan import dry_run

        try:
            print(dry_run(config, args.devices))
        except (ConfigError, ValueError, FileNotFoundError) as err:
            print(f"ktae-train: {err}", file=sys.stderr)
            return 2
        return 0
    from ktae_jax import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from ktae_jax.checkpoint import CheckpointError, CheckpointWriteError
    from ktae_jax.data import DataError
    from ktae_jax.metrics import MetricsError
    from ktae_jax.rundir import RunDirError
    from ktae_jax.train import Preempted, TrainingError, run

    try:
        run(config, allow_config_change=args.allow_config_change)
    except Preempted:
        return EXIT_PREEMPTED
    except CheckpointWriteError as err:
        # orbax's writer threads may still be stuck on the failure: leave without waiting for them
        print(f"ktae-train: {err}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_ERROR)
    except ConfigError as err:
        print(f"ktae-train: config error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (TrainingError, DataError, CheckpointError, RunDirError, MetricsError, OSError) as err:
        print(f"ktae-train: {err}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _compile_only(config, args) -> int:
    if not (args.compile_only and args.target):
        print("ktae-train: --target and --json go with --compile-only, which needs --target", file=sys.stderr)
        return 2
    from ktae_jax.aot import CompileError, compile_only, format_report, to_json
    from ktae_jax.hardware import TargetError

    try:
        report = compile_only(config, args.target)
    except (ConfigError, TargetError, CompileError, FileNotFoundError) as err:
        print(f"ktae-train: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        print(to_json(report))
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
