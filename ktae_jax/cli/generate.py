"""`ktae-generate`: sample responses from a Hugging Face checkpoint folder and print them.

    ktae-generate --checkpoint DIR --prompt TEXT [--greedy | --temperature T --top-p P]
                  --max-new-tokens N -n G [--chat] [--json]

The prompt is tokenised without added special tokens; `--chat` applies the checkpoint's chat
template (with the generation prompt), whose own special tokens are kept. `--json` prints one
object a line: {"prompt", "sample", "text", "token_ids", "length", "finished"}. `--checkpoint tiny`
is the shipped tiny base model. Errors (a missing or damaged checkpoint folder, impossible settings)
print one line and exit 1 (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax

from ktae_jax.data import left_pad
from ktae_jax.models import CheckpointError
from ktae_jax.policy import load_policy
from ktae_jax.sample import SamplingConfig, sample


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ktae-generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="Hugging Face folder (config.json, safetensors, tokenizer)"
                    " or 'tiny'")
    ap.add_argument("--prompt", required=True, action="append", help="prompt text; repeat for several prompts")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding")
    mode.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("-n", "--num-samples", type=int, default=1, help="responses per prompt (G)")
    ap.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template")
    ap.add_argument("--json", action="store_true", help="one JSON object per response and line")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    return ap


class _Error(Exception):
    pass


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise _Error("--chat given but the checkpoint's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise _Error(f"the prompt {text!r} has no tokens")
    return list(ids)


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, value, low in (("-n/--num-samples", args.num_samples, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--top-k", args.top_k, 0)):
        if value < low:
            ap.error(f"{flag}={value}: must be >= {low}")
    if not args.greedy and not args.temperature > 0:
        ap.error(f"--temperature={args.temperature}: must be > 0 (use --greedy for argmax decoding)")
    if not 0 < args.top_p <= 1:
        ap.error(f"--top-p={args.top_p}: must be in (0, 1]")


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    _check_args(ap, args)
    try:
        _generate(args)
    except (_Error, CheckpointError) as err:
        print(f"ktae-generate: error: {err}", file=sys.stderr)
        return 1
    return 0


def _generate(args: argparse.Namespace) -> None:
    policy = load_policy(args.checkpoint, dtype=args.dtype)
    tokenizer = policy.tokenizer
    prompts = [_encode(tokenizer, p, args.chat) for p in args.prompt]
    ids, mask = left_pad(prompts, max(map(len, prompts)), policy.pad_id)
    try:
        config = SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            greedy=args.greedy, eos_ids=policy.stop_ids, pad_id=policy.pad_id, num_samples=args.num_samples,
        )
    except ValueError as err:
        raise _Error(str(err)) from None
    rollout = jax.device_get(sample(policy.model, ids, mask, jax.random.key(args.seed), config))
    for row in range(rollout.tokens.shape[0]):
        n = int(rollout.lengths[row])
        token_ids = [int(t) for t in rollout.tokens[row, :n]]
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        finished = bool(n and token_ids[-1] in config.eos_ids)
        prompt_index, sample_index = divmod(row, args.num_samples)
        if args.json:
            print(json.dumps({"prompt": prompt_index, "sample": sample_index, "text": text, "token_ids": token_ids,
                              "length": n, "finished": finished}))
        else:
            print(f"=== prompt {prompt_index} sample {sample_index} ({n} tokens{', stopped' if finished else ''})")
            print(text)
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
