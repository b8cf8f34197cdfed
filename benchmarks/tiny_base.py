"""What the tiny base model does: accuracy overall / per style, the style mix, and KTAE's view.

    .venv/bin/python benchmarks/tiny_base.py [--checkpoint DIR] [--quick]

Held-out problems (1,000; 200 with --quick) at greedy and temperature 1, graded by the real
grader; then groups of 8 temperature-1 rollouts scored by KTAE, printing the key scores of the
two style openers ("Sum:" should be clearly positive, "Guess:" clearly negative) beside GRPO's
mean advantage of rollouts of each style.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ktae_jax.models import load_pretrained  # noqa: E402
from ktae_jax.tiny import base_checkpoint_path  # noqa: E402
from ktae_jax.tiny.measure import measure_styles, opener_key_scores  # noqa: E402
from ktae_jax.tiny.task import TaskConfig  # noqa: E402


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:5.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(base_checkpoint_path()))
    ap.add_argument("--quick", action="store_true", help="200 problems and 16 groups")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    model, tok = load_pretrained(args.checkpoint)
    task = TaskConfig()
    start = time.perf_counter()
    styles = measure_styles(model, tok, task, n=200 if args.quick else 1000, seed=1)
    keys = opener_key_scores(model, tok, task, prompts=16 if args.quick else 128, group_size=8)
    print(f"checkpoint {args.checkpoint}  ({model.config.num_params:,} parameters)")
    print(f"{'decoding':<10}{'n':>6}{'acc':>8}{'reliable':>10}{'shortcut':>10}{'acc rel.':>10}{'acc short.':>11}{'len':>7}")
    for mode, r in styles.items():
        print(f"{mode:<10}{r['n']:>6}{r['accuracy']:>8.3f}{r['mix']['reliable']:>10.3f}{r['mix']['shortcut']:>10.3f}"
              f"{_fmt(r['accuracy_by_style']['reliable']):>10}{_fmt(r['accuracy_by_style']['shortcut']):>11}"
              f"{r['mean_length']:>7.1f}")
    print(f"\nKTAE over {keys['mixed_groups']} mixed groups of 8 (of {keys['groups']}); rollout accuracy "
          f"{keys['accuracy']:.3f}")
    print(f"{'opener':<10}{'key score':>10}{'GRPO adv.':>11}")
    for style, opener in (("reliable", "Sum:"), ("shortcut", "Guess:")):
        print(f"{opener:<10}{_fmt(keys['key_score'][style]):>10}{_fmt(keys['grpo_advantage'][style]):>11}")
    print(f"\n({time.perf_counter() - start:.1f} s)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"styles": styles, "ktae": keys}, indent=2) + "\n")


if __name__ == "__main__":
    main()
