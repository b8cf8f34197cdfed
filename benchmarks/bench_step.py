"""One RL training step, per phase: our Trainer (GRPO, GRPO+KTAE) vs Tunix 0.1.7's GRPO, same run, CPU.

    .venv/bin/python benchmarks/bench_step.py [--quick] [--no-tunix] [--steps N]

A step is: sample G responses to each prompt, grade them, compute advantages, one optimizer update
(with a frozen-reference KL term, so both sides run a reference forward). Shapes:

    small   the ~4M-parameter Qwen2 of CPU_PERF_NOTES.md (4 layers, hidden 256, MLP 1024, 8/4 heads,
            vocab 128), 4 prompts x 4 responses x 16 new tokens
    large   a ~28M-parameter Qwen2 (8 layers, hidden 512, MLP 1536, 8/2 heads, vocab 8,000), same batch
            (full run only)

Random weights written by transformers as a Hugging Face folder with a word-level tokenizer of the
model's vocabulary; prompts are short arithmetic questions, plain text (no chat template).

Rewards: a cheap deterministic custom function (`reward.custom_fn`, the same rule on both sides).
Our trainer grades every response with the real host grader in its process pool whatever the
reward (the grader's verdict is logged as accuracy; `custom_fn` only replaces the reward values),
so grading cost is the real one in every configuration. One more configuration (full run, small
shape) takes the real grader's rewards: the same work as GRPO, so its difference from GRPO shows
the machine's noise.

Ours: one `Trainer` per configuration, warm-up steps (compilation), then N timed steps. Tunix:
`google-tunix==0.1.7` in its own virtual environment (benchmarks/.venv-tunix, made on first use),
`benchmarks/tunix_step.py` as a subprocess on the same checkpoint, prompts and batch, in lock-step:
step i of every configuration of ours, then Tunix's step i, and so on, so that the load of the
shared cores hits all alike. Medians are printed side by side with the goals: our step <= 0.5 x
Tunix's; KTAE adding <= 5 % to a GRPO step (measured as the time of the work only KTAE does; the
whole-step and paired differences are printed beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = pathlib.Path(__file__).resolve().parent.parent
TUNIX_VENV = ROOT / "benchmarks" / ".venv-tunix"
# What pip resolves for google-tunix 0.1.7 here (checked with `pip install --dry-run`); the numeric
# stack pinned to the versions of our own .venv so that both sides run the same XLA.
TUNIX_PINS = ("google-tunix==0.1.7", "jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "optax==0.2.8",
              "orbax-checkpoint==0.12.8", "grain==0.2.18", "qwix==0.1.8", "transformers==5.12.1",
              "tokenizers==0.22.2", "safetensors==0.7.0", "numpy==2.4.6")

SMALL = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=1024, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=128, tie_word_embeddings=False)
LARGE = dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=8000, tie_word_embeddings=True)
PROMPTS, GROUP, NEW_TOKENS, MAX_PROMPT = 4, 4, 16, 32
KL_COEF = 0.04  # Tunix's default beta; > 0 makes both sides run a reference forward


# ---------------------------------------------------------------------------------------------
# The reward both sides use: cheap, deterministic, and about half the responses of a random model
# earn it, so GRPO groups have mixed rewards and non-zero advantages.
# ---------------------------------------------------------------------------------------------


def answer_digit_reward(responses: list[str], references: list[str], correct: list[float]) -> list[float]:
    """1 if the response holds the reference answer's first character (tunix_step.py has the same rule)."""
    return [float(str(ref)[:1] in text) for text, ref in zip(responses, references)]


# ---------------------------------------------------------------------------------------------
# Workspace: checkpoint, tokenizer, prompts
# ---------------------------------------------------------------------------------------------


def make_tokenizer(vocab_size: int):
    """The tests' word-level chat tokenizer, padded with filler words to exactly `vocab_size` ids."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _model_helpers import CHAT_TEMPLATE, SPECIAL_TOKENS, WORDS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + WORDS
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=CHAT_TEMPLATE, padding_side="left")


def build_checkpoint(folder: pathlib.Path, shape: dict[str, Any]) -> tuple[pathlib.Path, int]:
    """A random Qwen2 checkpoint of `shape` with its tokenizer; returns (folder, parameter count)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tokenizer(shape["vocab_size"])
    torch.manual_seed(0)
    config = Qwen2Config(max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, **shape)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder, sum(p.numel() for p in model.parameters())


def write_prompts(path: pathlib.Path, count: int) -> pathlib.Path:
    """`count` arithmetic questions of 9-21 words (all in the tokenizer), answers as digits."""
    import random

    rng = random.Random(0)
    ops = {"plus": lambda a, b: a + b, "times": lambda a, b: a * b, "minus": lambda a, b: a - b}
    rows = []
    for _ in range(count):
        a, b = rng.randrange(10), rng.randrange(10)
        op = rng.choice(list(ops))
        filler = " ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(4, 16)))
        rows.append({"problem": f"{filler} what is {a} {op} {b} ?", "answer": str(ops[op](a, b))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------

# The trainer's phase timers (whichever it reports) and Tunix's counterpart of each (tunix_step.py's
# names; a tuple is summed). Ours overlaps the log-prob forwards with grading, so its
# `logprobs_wait_s` is only what is left to wait for once the rewards are in.
PHASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "time/sample_grade_s": ("sample + grade", ("generate", "grade")),
    "time/sample_s": ("sample", ("generate",)),
    "time/grade_wait_s": ("grade (wait)", ("grade",)),
    "time/logprobs_s": ("ref log-probs", ("ref_logps",)),
    "time/logprobs_wait_s": ("ref log-probs (wait)", ("ref_logps",)),
    "time/advantages_s": ("advantages", ()),
    "time/update_s": ("update", ("update",)),
    "time/step_s": ("step (trainer timer)", ()),
    "wall_s": ("step (wall)", ("step",)),
}


def our_overrides(checkpoint: pathlib.Path, prompts: pathlib.Path, run_dir: pathlib.Path, *, ktae: bool,
                  custom_reward: bool) -> list[str]:
    values = {
        "model.path": checkpoint, "data.train_files": f"[{prompts}]", "data.template": "plain",
        "data.max_prompt_len": MAX_PROMPT, "rollout.prompts_per_step": PROMPTS, "rollout.group_size": GROUP,
        "rollout.max_new_tokens": NEW_TOKENS, "rollout.temperature": 1.0, "algo.estimator": "grpo",
        "algo.loss_agg": "token-mean", "algo.kl_coef": KL_COEF,
        # Tunix with num_iterations=1 takes the old log-probs as the current policy's (no forward);
        # ours then takes the sampler's, which are the same policy's: no extra forward either.
        "algo.recompute_old_logprobs": False,
        "ktae.enabled": ktae, "reward.custom_fn": "bench_step:answer_digit_reward" if custom_reward else "",
        "reward.num_workers": 2, "optim.lr": 1e-5, "optim.weight_decay": 0.0, "optim.grad_clip": 1.0,
        "run.run_dir": run_dir, "run.max_steps": 1000, "run.progress": False, "run.tensorboard": False,
        "run.export_hf": False,
    }
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


class OurTrainers:
    """One Trainer per named configuration, stepped in turn (`step_all(i)`), so that the machine's
    load hits every configuration alike; `summary()` gives per configuration the medians of the
    trainer's own phase times and of the wall time of `trainer.step` (which also covers what the
    trainer does after its step timer stops: metrics, KTAE diagnostics), the first step, the
    build time (model load, ahead-of-time compilation of the update)."""

    def __init__(self, configs: dict[str, list[str]], warmup: int):
        import jax

        from ktae_jax.config import load_config
        from ktae_jax.train import Trainer

        self.warmup = warmup
        self.trainers, self.records = {}, {}
        for name, overrides in configs.items():
            start = time.perf_counter()
            self.trainers[name] = Trainer(load_config([], overrides), devices=jax.devices()[:1])
            self.records[name] = {"build_s": time.perf_counter() - start, "steps": [], "walls": []}

    def step_all(self, i: int) -> None:
        for name, trainer in self.trainers.items():
            start = time.perf_counter()
            metrics = trainer.step(i)
            wall = time.perf_counter() - start
            record = self.records[name]
            if i == 0:
                record["first_step_s"] = wall
            if i >= self.warmup:
                record["steps"].append(metrics)
                record["walls"].append(wall)

    def close(self) -> None:
        for trainer in self.trainers.values():
            trainer.close()

    def summary(self) -> dict[str, dict[str, Any]]:
        for record in self.records.values():
            for m, wall in zip(record["steps"], record["walls"]):
                m["wall_s"] = wall
            keys = [k for k in PHASES if all(k in m for m in record["steps"])]
            record["median"] = {k: statistics.median(m[k] for m in record["steps"]) for k in keys}
            record["response_length_mean"] = statistics.mean(m["response/length_mean"] for m in record["steps"])
            record["reward_mean"] = statistics.mean(m["reward/mean"] for m in record["steps"])
        return self.records


# ---------------------------------------------------------------------------------------------
# Tunix, in its own virtual environment
# ---------------------------------------------------------------------------------------------


def ensure_tunix_venv() -> pathlib.Path:
    """benchmarks/.venv-tunix/bin/python with Tunix installed (created and installed when missing)."""
    python = TUNIX_VENV / "bin" / "python"
    probe = [str(python), "-c", "import tunix.rl.grpo.grpo_learner"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {TUNIX_VENV} and installing {' '.join(TUNIX_PINS)} (a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TUNIX_VENV)], check=True)
    # Nothing in Tunix 0.1.7's GRPO path needs torch (pip resolves none); were one ever pulled in,
    # the pins would have to start with torch==2.13.0 (the CPU build) to keep a CUDA torch out.
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", *TUNIX_PINS], capture_output=True, text=True)
    if install.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(TUNIX_PINS)} failed:\n{install.stderr[-3000:]}")
    check = subprocess.run(probe, capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"Tunix installed but does not import:\n{check.stderr[-3000:]}")
    return python


class TunixRun:
    """tunix_step.py in Tunix's venv, in lock-step: `step(i)` lets it run step i and waits until it
    is done. Any failure is kept in `error` (and the process stopped); `result()` gives Tunix's
    timings (tunix_step.py's JSON) or {"error": why}."""

    def __init__(self, checkpoint: pathlib.Path, prompts: pathlib.Path, warmup: int, steps: int,
                 timeout_s: float = 600):
        self.error: str | None = None
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self._result: dict | None = None
        try:
            python = ensure_tunix_venv()
        except (RuntimeError, subprocess.CalledProcessError, OSError) as err:
            self.error = f"cannot set up Tunix: {err}"
            return
        cmd = [str(python), str(ROOT / "benchmarks" / "tunix_step.py"), "--lockstep", "--checkpoint",
               str(checkpoint), "--prompts", str(prompts), "--prompts-per-step", str(PROMPTS), "--group-size",
               str(GROUP), "--new-tokens", str(NEW_TOKENS), "--max-prompt-len", str(MAX_PROMPT), "--warmup",
               str(warmup), "--steps", str(steps), "--beta", str(KL_COEF)]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block Tunix
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env, cwd=ROOT)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._expect("@@ready 0")  # set up, waiting for the first batch

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _fail(self, why: str) -> None:
        self.stderr.seek(0)
        self.error = f"{why}\n{self.stderr.read()[-3000:]}"
        if self.proc.poll() is None:
            self.proc.kill()

    def _expect(self, marker: str) -> None:
        """Reads Tunix's stdout until `marker` (or the result line); a timeout or exit is a failure."""
        deadline = time.monotonic() + self.timeout_s
        while self.error is None:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                return self._fail(f"Tunix did not reach {marker!r} within {self.timeout_s:.0f} s")
            if line is None:
                return self._fail(f"tunix_step.py exited with {self.proc.wait()} before {marker!r}")
            if line.startswith("@@result "):
                self._result = json.loads(line[len("@@result "):])
                return
            if line == marker:
                return

    def step(self, i: int, last: bool) -> None:
        if self.error is not None:
            return
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self._expect("@@result" if last else f"@@ready {i + 1}")
        if last and self._result is None and self.error is None:
            self._fail("tunix_step.py printed no result")

    def result(self) -> dict:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        return {"error": self.error} if self.error is not None else self._result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


def print_shape(label: str, ours: dict[str, dict], tunix: dict) -> dict[str, float]:
    """The side-by-side table of one shape; returns the goal ratios."""
    grpo, ktae = ours["GRPO"], ours["GRPO+KTAE"]
    t = tunix.get("median", {})
    print(f"\n== {label} ==")
    print(f"{'phase (median)':<26}{'ours GRPO':>12}{'ours +KTAE':>12}{'Tunix GRPO':>12}{'Tunix/ours':>12}")
    for key, (name, tunix_keys) in PHASES.items():
        if key not in grpo["median"]:
            continue
        theirs = sum(t[k] for k in tunix_keys) if tunix_keys and all(k in t for k in tunix_keys) else None
        # Below a few milliseconds a ratio is timer noise.
        ratio = f"{theirs / grpo['median'][key]:.2f}x" if theirs and min(theirs, grpo["median"][key]) > 0.005 else ""
        print(f"{name:<26}{_ms(grpo['median'][key]):>12}{_ms(ktae['median'].get(key)):>12}{_ms(theirs):>12}{ratio:>12}")
    print(f"{'first step (compile)':<26}{_ms(grpo['first_step_s']):>12}{_ms(ktae['first_step_s']):>12}"
          f"{_ms(tunix.get('first_step_s')):>12}")
    print(f"{'build (load + AOT update)':<26}{_ms(grpo['build_s']):>12}{_ms(ktae['build_s']):>12}"
          f"{_ms(tunix.get('load_s')):>12}")
    tl = tunix.get("response_length_mean")
    print(f"{'mean response length':<26}{grpo['response_length_mean']:>12.1f}{ktae['response_length_mean']:>12.1f}"
          f"{(f'{tl:.1f}' if tl is not None else '-'):>12}")
    if "error" in tunix:
        print(f"Tunix: NOT MEASURED. {tunix['error']}")
    for name, record in ours.items():
        if name not in ("GRPO", "GRPO+KTAE"):
            m = record["median"]
            parts = ", ".join(f"{PHASES[k][0]} {_ms(v)}" for k, v in m.items() if k not in ("wall_s", "time/step_s"))
            print(f"ours, {name}: step {_ms(m['wall_s'])} wall ({parts}); mean reward {record['reward_mean']:.2f}")
    result = ktae_overhead(grpo, ktae)
    if "GRPO, real grader rewards" in ours:  # the same work as GRPO: their difference is the machine's noise
        result["noise"] = ours["GRPO, real grader rewards"]["median"]["wall_s"] / grpo["median"]["wall_s"] - 1
    if "step" in t:
        result["ours_over_tunix"] = grpo["median"]["wall_s"] / t["step"]
    return result


def ktae_overhead(grpo: dict, ktae: dict) -> dict[str, float]:
    """What KTAE adds to a GRPO step, as fractions of the GRPO step's median wall time, three ways:

    step       median KTAE step / median GRPO step - 1 (whole steps: includes the machine's noise)
    paired     median over i of (KTAE step i - GRPO step i): steps i of both run back to back
    own work   what only KTAE runs: its advantages phase minus GRPO's, plus the extra time after the
               trainer's step timer (KTAE diagnostics); the rest of the step is the same code on
               the same shapes in both (same sampling, log-probs and update)
    """
    base = grpo["median"]["wall_s"]
    pairs = [(b["wall_s"], a["wall_s"]) for a, b in zip(grpo["steps"], ktae["steps"])]
    own = [(b["time/advantages_s"] - a["time/advantages_s"]) + ((b["wall_s"] - b["time/step_s"])
                                                                 - (a["wall_s"] - a["time/step_s"]))
           for a, b in zip(grpo["steps"], ktae["steps"])]
    return {"ktae_step": ktae["median"]["wall_s"] / base - 1,
            "ktae_paired": statistics.median(k - g for k, g in pairs) / base,
            "ktae_own": statistics.median(own) / base}


def print_goals(goals: dict[str, dict[str, float]]) -> None:
    print("\n== goals ==")
    for label, g in goals.items():
        if "ours_over_tunix" in g:
            ok = "PASS" if g["ours_over_tunix"] <= 0.5 else "FAIL"
            print(f"{label}: our step / Tunix step = {g['ours_over_tunix']:.2f} (goal <= 0.50) {ok}")
        else:
            print(f"{label}: our step / Tunix step = not measured (Tunix did not run)")
        ok = "PASS" if g["ktae_own"] <= 0.05 else "FAIL"
        noise = f"; noise, same work twice: {g['noise'] * 100:+.1f} %" if "noise" in g else ""
        print(f"{label}: KTAE's own work = {g['ktae_own'] * 100:+.1f} % of a GRPO step (goal <= 5 %) {ok}"
              f"  [whole steps: {g['ktae_step'] * 100:+.1f} %, paired: {g['ktae_paired'] * 100:+.1f} %{noise}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shape only, few steps (smoke run)")
    ap.add_argument("--no-tunix", action="store_true", help="skip the Tunix side")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    args = ap.parse_args()
    steps = args.steps or (3 if args.quick else 12)
    warmup = 1 if args.quick else 2
    shapes = {"small": SMALL} if args.quick else {"small": SMALL, "large": LARGE}
    sys.path.insert(0, str(ROOT / "benchmarks"))  # reward.custom_fn = bench_step:answer_digit_reward

    import jax

    print(f"jax {jax.__version__}, {jax.devices()[0].platform} x1 device, float32; {PROMPTS} prompts x {GROUP} "
          f"responses x {NEW_TOKENS} new tokens, prompts <= {MAX_PROMPT} tokens, KL {KL_COEF}; "
          f"{warmup} warm-up + {steps} timed steps per configuration; 1-min load average (2 shared cores): "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    goals = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        prompts = write_prompts(tmp / "prompts.jsonl", PROMPTS * (warmup + steps) * 2)
        for label, shape in shapes.items():
            checkpoint, n_params = build_checkpoint(tmp / label, shape)
            title = (f"{label}: Qwen2 {n_params / 1e6:.1f}M parameters ({shape['num_hidden_layers']} layers, "
                     f"hidden {shape['hidden_size']}, MLP {shape['intermediate_size']}, "
                     f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, vocab {shape['vocab_size']})")
            print(f"\n{title}: building ours ...", flush=True)
            configs = {name: our_overrides(checkpoint, prompts, tmp / "runs" / label / name, ktae=ktae,
                                           custom_reward=True)
                       for name, ktae in (("GRPO", False), ("GRPO+KTAE", True))}
            if label == "small" and not args.quick:
                configs["GRPO, real grader rewards"] = our_overrides(
                    checkpoint, prompts, tmp / "runs" / label / "grader", ktae=False, custom_reward=False)
            ours = OurTrainers(configs, warmup)
            tunix = None
            try:
                if not args.no_tunix:
                    print(f"{label}: starting Tunix ...", flush=True)
                    tunix = TunixRun(checkpoint, prompts, warmup, steps)
                print(f"{label}: stepping ours and Tunix in turn ...", flush=True)
                for i in range(warmup + steps):
                    ours.step_all(i)
                    if tunix is not None:
                        tunix.step(i, last=i == warmup + steps - 1)
            finally:
                ours.close()
                theirs = tunix.result() if tunix is not None else {"error": "skipped (--no-tunix)"}
            goals[label] = print_shape(title, ours.summary(), theirs)
            print(f"1-min load average (2 shared cores): {os.getloadavg()[0]:.1f}", flush=True)
    print_goals(goals)


if __name__ == "__main__":
    main()
