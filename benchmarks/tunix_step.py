"""Tunix's GRPO training step, timed: the baseline side of bench_step.py.

Runs inside Tunix's own virtual environment (benchmarks/.venv-tunix, google-tunix 0.1.7), never
in ours; bench_step.py starts it as a subprocess:

    benchmarks/.venv-tunix/bin/python benchmarks/tunix_step.py --checkpoint DIR --prompts FILE [...]

Loads the same Hugging Face checkpoint (policy and frozen reference) into Tunix's Qwen2, builds an
`RLCluster` on a 1-device mesh with the vanilla rollout engine and a `GRPOLearner`, and trains
`warmup + steps` global steps on the prompts file (JSON lines {"problem", "answer"}), taken in order,
`prompts` per step, `group_size` generations each. Per phase it times the learner's own calls:

    generate   rl_cluster.generate (tokenise, sample, detokenise)
    grade      learner._compute_rewards (the reward function, in this process)
    ref_logps  rl_cluster.get_ref_per_token_logps (frozen reference forward)
    update     rl_cluster.update_actor (loss, gradients, optimizer)
    step       start of one global step to the start of the next (everything the loop does)

and prints one line "@@result {JSON}": per-step lists of these times, the first step
(compilation) apart, and the mean response length. With --lockstep it waits for a "go" line on
stdin before each step (announced by "@@ready i"), so that bench_step.py can interleave Tunix's
steps with ours and machine load hits both alike; the waits are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def answer_digit_reward(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """The bench's reward: 1 if the completion holds the reference answer's first character (same as ours)."""
    return [float(str(ref)[:1] in text) for text, ref in zip(completions, answer)]


def model_config(folder: pathlib.Path):
    """Tunix's Qwen2 ModelConfig from a Hugging Face config.json."""
    from tunix.models.qwen2 import model as qwen2

    hf = json.loads((folder / "config.json").read_text())
    heads = hf["num_attention_heads"]
    return qwen2.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf.get("rope_theta", 1e6)),
        norm_eps=hf["rms_norm_eps"], use_tied_embedding=bool(hf.get("tie_word_embeddings", False)))


class PlainStrTokenizer:
    """The HF tokenizer behind Tunix's tokenizer protocol (encode, decode, bos/eos/pad ids).

    Tunix repeats the prompts with `np.repeat`, which turns them into `np.str_`, and transformers
    5.12 rejects those in `encode`; this shim hands it plain `str`. No special tokens are added,
    as on our side."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        return self.hf.encode(str(text), add_special_tokens=False, **kwargs)

    def decode(self, ids: Any, **kwargs: Any) -> str:
        return self.hf.decode(ids, **kwargs)

    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    def eos_id(self) -> int:
        return self.hf.eos_token_id

    def pad_id(self) -> int:
        return self.hf.pad_token_id


class PhaseTimer:
    """Wraps a bound method so that each call's wall time (after its result is ready) lands in a list."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def wrap(self, owner: Any, name: str, label: str, ready: Callable[[Any], Any] | None = None) -> None:
        import jax

        inner = getattr(owner, name)
        bucket = self.times.setdefault(label, [])

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            jax.block_until_ready(ready(out) if ready else out)
            bucket.append(time.perf_counter() - start)
            return out

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=pathlib.Path, required=True, help="Hugging Face folder (safetensors + tokenizer)")
    ap.add_argument("--prompts", type=pathlib.Path, required=True, help='JSON lines {"problem", "answer"}')
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--max-prompt-len", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1, help="steps before the timed ones (compilation)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: a reference forward per step)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--lockstep", action="store_true",
                    help='print "@@ready i" before each batch and wait for a "go" line on stdin')
    args = ap.parse_args()

    import jax
    import numpy as np
    import optax
    from flax import nnx
    from transformers import PreTrainedTokenizerFast
    from tunix.models.qwen2 import params as qwen2_params
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    jax.config.update("jax_default_prng_impl", "threefry2x32")
    devices = jax.devices()[:1]
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    cfg = model_config(args.checkpoint)
    start = time.perf_counter()
    policy = qwen2_params.create_model_from_safe_tensors(str(args.checkpoint), cfg, mesh)
    reference = qwen2_params.create_model_from_safe_tensors(str(args.checkpoint), cfg, mesh)
    # Not AutoTokenizer: transformers 5 would swap in Qwen2Tokenizer for a qwen2 folder and rebuild the
    # pre-tokenizer; tokenizer.json as written is what our side loads too.
    tokenizer = PlainStrTokenizer(PreTrainedTokenizerFast.from_pretrained(str(args.checkpoint), local_files_only=True))
    load_s = time.perf_counter() - start

    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    total = args.warmup + args.steps
    P = args.prompts_per_step
    if len(rows) < total * P:
        raise SystemExit(f"{args.prompts}: {len(rows)} prompts, the run needs {total * P}")
    # Arrays, not lists: Tunix repeats each leaf G times with np.repeat, and a list's leaves are
    # its single strings (each would become an array of G copies).
    batches = [{"prompts": np.array([r["problem"] for r in rows[i * P:(i + 1) * P]]),
                "answer": np.array([str(r["answer"]) for r in rows[i * P:(i + 1) * P]])} for i in range(total)]

    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=args.new_tokens, max_prompt_length=args.max_prompt_len, temperature=1.0,
        top_p=1.0, top_k=None, kv_cache_size=args.max_prompt_len + args.new_tokens + 8)
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, weight_decay=0.0)),
        eval_every_n_steps=10**9, max_steps=total, checkpoint_root_directory=None)
    cluster = rl_cluster_lib.RLCluster(
        actor=policy, reference=reference, tokenizer=tokenizer,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                          rl_cluster_lib.Role.ROLLOUT: mesh},
            rollout_engine="vanilla", offload_to_cpu=False, training_config=training, rollout_config=rollout))
    algo = grpo_learner.GRPOConfig(num_generations=args.group_size, num_iterations=1, beta=args.beta,
                                   epsilon=0.2, loss_agg_mode="token-mean")
    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[answer_digit_reward])

    # ------------------------------------------------------------------ instrumentation
    timer = PhaseTimer()
    lengths: list[float] = []
    generate = cluster.generate

    def generate_and_count(*a, **kw):
        out = generate(*a, **kw)
        lengths.append(float(np.mean([len(t) for t in out.tokens])))
        return out

    cluster.generate = generate_and_count
    timer.wrap(cluster, "generate", "generate", ready=lambda out: out.tokens)
    timer.wrap(learner, "_compute_rewards", "grade")
    timer.wrap(cluster, "get_ref_per_token_logps", "ref_logps")
    timer.wrap(cluster, "update_actor", "update", ready=lambda _: nnx.state(cluster.actor_trainer.model))
    starts: list[float] = []
    run_global_step = learner._run_global_step

    def marked_step(*a, **kw):
        starts.append(time.perf_counter())
        return run_global_step(*a, **kw)

    learner._run_global_step = marked_step
    waits = [0.0] * total  # lock-step: time spent waiting for "go" before batch i (inside step i, i >= 1)

    def feed():
        """The batches; in lock-step, each one only once the driver says "go" (Tunix pulls batch
        i + 1 when step i is over, so "@@ready i+1" also says that step i is done)."""
        for i, batch in enumerate(batches):
            if args.lockstep:
                start = time.perf_counter()
                print(f"@@ready {i}", flush=True)
                if sys.stdin.readline().strip() != "go":
                    raise SystemExit("lock-step driver went away")
                waits[i] = time.perf_counter() - start
            yield batch

    # ------------------------------------------------------------------ train
    learner.train(feed())
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
    end = time.perf_counter()
    # Step i runs from its start to the next one's, less the wait for batch i (batch 0 is pulled
    # before the first step starts).
    steps = [b - a - (waits[i] if i else 0.0) for i, (a, b) in enumerate(zip(starts, starts[1:] + [end]))]
    if len(steps) != total:
        raise SystemExit(f"Tunix ran {len(steps)} global steps, expected {total}")
    phases = {k: v for k, v in timer.times.items() if v}
    timed = {"step": steps[args.warmup:], **{k: v[args.warmup:] for k, v in phases.items()}}
    result = {
        "tunix_version": _version("google-tunix"), "jax_version": jax.__version__, "load_s": load_s,
        "first_step_s": steps[0], "first": {k: v[0] for k, v in phases.items()},
        "median": {k: statistics.median(v) for k, v in timed.items() if v}, "all": timed,
        "response_length_mean": float(np.mean(lengths[args.warmup:])) if lengths else None,
        "devices": [str(d) for d in devices],
    }
    print("@@result " + json.dumps(result), flush=True)


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


if __name__ == "__main__":
    main()
