"""The typed sections of a training config, their value ranges and the checks across fields.

`TrainConfig` holds one frozen section per pipeline stage (`model`, `data`, `rollout`, `algo`,
`ktae`, `reward`, `optim`, `mesh`, `run`, `lora`), each field with a one-line comment. `validate` checks
every numeric field against its range (`RANGES`) and the combinations no single field can (the
mesh's divisibility, mini- and micro-batches), raising `ConfigError` naming the key. The runtime
configs of the stages (`SamplingConfig`, `RewardConfig`, `KTAEConfig`) are built from the sections
here only (`to_sampling`, `to_reward`, `to_ktae`); an invariant across fields of a stage (KTAE's
alpha + beta > 0, the overlong buffer within the response length) lives in that runtime config alone.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from ktae_jax.advantages import Estimator
from ktae_jax.ktae import KTAEConfig
from ktae_jax.mesh import MeshConfig
from ktae_jax.rewards.functions import RewardConfig
from ktae_jax.sample import SamplingConfig

if typing.TYPE_CHECKING:  # for the annotations; the methods import them when called
    from ktae_jax.models.config import ModelOptions
    from ktae_jax.models.lora import LoraSpec


class ConfigError(ValueError):
    """A bad configuration; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str = "tiny"  # Hugging Face folder (config.json, safetensors, tokenizer); "tiny" = the shipped tiny base
    init: Literal["pretrained", "random"] = "pretrained"  # "random": the folder's architecture, random weights
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # parameters and optimizer state
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # activations
    # auto: TPU pallas, GPU cudnn, CPU xla (short rows) / blockwise; see README "Models"
    attention: Literal["auto", "xla", "blockwise", "cudnn", "pallas"] = "auto"
    attention_block: int = 512  # keys per block of the blockwise attention
    remat: Literal["none", "full", "dots"] = "none"  # what the backward keeps per layer (full: only its input)
    # the sampler's decode step past the cache's first block: each row up to its own length (ragged,
    # auto's choice on CPU) or every row over the longest's (dense, auto's choice on GPU/TPU)
    decode_attention: Literal["auto", "dense", "ragged"] = "auto"
    # the layer stack as one lax.scan (compile time flat in depth) or unrolled; null = by platform:
    # scanned on TPU/GPU, unrolled on CPU (the small models' update runs ~20 % faster there unrolled);
    # the sampler's decode steps scan either way (`engine._scanned`: 1.7x faster on this CPU)
    scan_layers: bool | None = None

    def options(self, mesh: Any = None) -> "ModelOptions":
        """How the model computes, on `mesh` (its devices' platform; None = JAX's default backend)."""
        from ktae_jax.models.config import ModelOptions

        import jax

        platform = "" if mesh is None else mesh.devices.flat[0].platform
        scan = self.scan_layers if self.scan_layers is not None else (platform or jax.default_backend()) != "cpu"
        return ModelOptions(attention=self.attention, attention_block=self.attention_block, remat=self.remat,
                            decode_attention=self.decode_attention, scan_layers=scan, platform=platform, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class DataSection:
    train_files: tuple[str, ...] = ("tiny",)  # JSONL / Parquet files; "tiny" = the generated tiny task
    prompt_field: str = "problem"  # field holding the question
    answer_field: str = "answer"  # field holding the reference answer
    template: Literal["chat", "plain"] = "chat"  # chat: tokenizer's chat template with the system prompt
    system_prompt: str = "Please reason step by step, and put your final answer within \\boxed{}."  # "" = none
    max_prompt_len: int = 128  # prompt tokens (left-padded to this length)
    overlong_prompts: Literal["filter", "truncate"] = "filter"  # drop, or keep the last max_prompt_len tokens
    trim_prompt_padding: bool = True  # per step, cut padding columns no prompt needs (bucketed widths)
    shuffle_seed: int = 0  # data order
    num_epochs: int = -1  # passes over the data; -1 = as many as the run needs
    tiny_train_size: int = 20000  # problems generated for train_files = ["tiny"]


@dataclasses.dataclass(frozen=True)
class RolloutSection:
    prompts_per_step: int = 8  # prompts per training step (the paper: 1,024)
    group_size: int = 8  # G responses per prompt (the paper: 16)
    max_new_tokens: int = 64  # response length limit (the paper: 3,072)
    temperature: float = 1.0  # sampling temperature (also applied to the log-probs in the loss)
    top_p: float = 1.0  # nucleus sampling (1 = off)
    top_k: int = 0  # top-k sampling (0 = off)
    sample_prompts_per_device: int = 0  # decode slots per device = this x group_size (bounds the KV cache); 0 = all rows


@dataclasses.dataclass(frozen=True)
class AlgoSection:
    estimator: Estimator = "grpo"  # rollout-level advantage (the names: advantages.ESTIMATORS)
    clip_low: float = 0.2  # ratio clipped below at 1 - clip_low
    clip_high: float = 0.2  # ... and above at 1 + clip_high (DAPO clip-higher: 0.28)
    clip_ratio_c: float = 0.0  # dual-clip constant for negative advantages (> 1; 0 = off; DAPO: 10)
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )  # how token losses become the mini-batch loss
    kl_coef: float = 0.0  # KL to the frozen initial policy; 0 = no reference pass at all
    kl_estimator: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"  # low_var_kl = k3, clamped
    entropy_coef: float = 0.0  # entropy bonus
    ppo_epochs: int = 1  # passes over each step's rollouts
    mini_batch_prompts: int = 0  # prompts per optimizer update; 0 = all of the step's prompts
    micro_batch_per_device: int = 0  # rollouts per device per gradient-accumulation slice; 0 = whole mini-batch
    logprob_micro_batch_per_device: int = 0  # rollouts per device per slice of the (gradient-free) old/reference log-prob passes; 0 = as the update
    recompute_old_logprobs: bool = True  # old log-probs from a forward pass, else the sampler's (one update per step needs neither)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, sample more
    max_num_gen_batches: int = 4  # dynamic sampling: sampling rounds per step at most


@dataclasses.dataclass(frozen=True)
class KTAESection:
    enabled: bool = False  # add KTAE key-token scores to the rollout advantage
    alpha: float = 1.0  # Fisher weight
    beta: float = 1.0  # information-gain weight
    gamma: float = 1.0  # term-frequency weight
    top: float = 1.0  # key scores lie in (-top, top)
    k1: float = 2.0  # BM25 saturation
    b: float = 0.5  # BM25 length normalisation
    zero_fisher_at_p1: bool = True  # F = 0 where the Fisher p-value is 1
    ignore_special: bool = True  # pad and EOS ids score 0


@dataclasses.dataclass(frozen=True)
class RewardSection:
    kind: Literal["correctness", "dapo"] = "correctness"  # 1/0, or DAPO's +1/-1
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens (0 = off)
    overlong_factor: float = 1.0  # penalty at the length limit
    format_weight: float = 0.0  # bonus for a \boxed{} answer
    custom_fn: str = ""  # "pkg.module:function" replacing the base reward
    timeout_s: float = 5.0  # hard per-answer grading limit
    num_workers: int = 0  # grading processes; 0 = one per CPU core


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-6  # peak learning rate (AdamW)
    warmup_steps: int = 0  # linear warmup
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    b1: float = 0.9  # Adam beta1
    b2: float = 0.999  # Adam beta2
    grad_clip: float = 1.0  # global-norm clipping (0 = off)


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = 0  # low-rank adapters of this rank on `targets`, the base frozen; 0 = off (full fine-tuning)
    alpha: float = 32.0  # the update is (alpha / rank) x A B
    # projections adapted, named as in Hugging Face / PEFT
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def spec(self) -> "LoraSpec | None":
        """The adapters' spec (`models.lora`), None when off."""
        from ktae_jax.models.lora import LoraSpec

        return LoraSpec(self.rank, self.alpha, self.targets) if self.rank else None


@dataclasses.dataclass(frozen=True)
class RunSection:
    run_dir: str = "runs/default"  # checkpoints, metrics.jsonl, TensorBoard, the exported model
    max_steps: int = 100  # training steps
    seed: int = 0  # sampling RNG
    checkpoint_every: int = 10  # steps between checkpoints (also at the end and on SIGTERM)
    keep_checkpoints: int = 3  # checkpoints kept
    export_hf: bool = True  # write the final policy in Hugging Face format to run_dir/hf
    tensorboard: bool = True  # TensorBoard event files in run_dir/tb
    wandb: bool = False  # also log to Weights & Biases (when installed)
    progress: bool = True  # a live progress bar on the console
    ktae_top_tokens: int = 5  # strongest positive / negative key tokens logged per step
    eval_every: int = 0  # evaluate on eval_file every N steps (greedy, the paper's protocol); 0 = never
    eval_file: str = ""  # validation JSONL / Parquet (fields data.prompt_field / data.answer_field)
    eval_limit: int = 0  # first N validation items only; 0 = all


SECTIONS: dict[str, type] = {
    "model": ModelSection, "data": DataSection, "rollout": RolloutSection, "algo": AlgoSection,
    "ktae": KTAESection, "reward": RewardSection, "optim": OptimSection, "mesh": MeshConfig, "run": RunSection,
    "lora": LoraSection,
}

# The allowed values of every numeric field, checked at load (`TrainConfig.validate`): intervals
# "[a, b)" / "(a, inf)", a single value, or alternatives joined by " or ".
RANGES: dict[str, str] = {
    "model.attention_block": "[1, inf)",
    "data.max_prompt_len": "[1, inf)", "data.shuffle_seed": "[0, inf)", "data.num_epochs": "-1 or [1, inf)",
    "data.tiny_train_size": "[1, inf)",
    "rollout.prompts_per_step": "[1, inf)", "rollout.group_size": "[1, inf)", "rollout.max_new_tokens": "[1, inf)",
    "rollout.temperature": "(0, inf)", "rollout.top_p": "(0, 1]", "rollout.top_k": "[0, inf)",
    "rollout.sample_prompts_per_device": "[0, inf)",
    "algo.clip_low": "[0, 1)", "algo.clip_high": "[0, inf)", "algo.clip_ratio_c": "0 or (1, inf)",
    "algo.kl_coef": "[0, inf)", "algo.entropy_coef": "[0, inf)", "algo.ppo_epochs": "[1, inf)",
    "algo.mini_batch_prompts": "[0, inf)", "algo.micro_batch_per_device": "[0, inf)",
    "algo.logprob_micro_batch_per_device": "[0, inf)", "algo.max_num_gen_batches": "[1, inf)",
    "ktae.alpha": "[0, inf)", "ktae.beta": "[0, inf)", "ktae.gamma": "[0, inf)", "ktae.top": "[0, inf)",
    "ktae.k1": "[0, inf)", "ktae.b": "[0, 1]",
    "reward.overlong_buffer": "[0, inf)", "reward.overlong_factor": "[0, inf)", "reward.format_weight": "[0, inf)",
    "reward.timeout_s": "(0, inf)", "reward.num_workers": "[0, inf)",
    "optim.lr": "[0, inf)", "optim.warmup_steps": "[0, inf)", "optim.weight_decay": "[0, inf)",
    "optim.b1": "[0, 1)", "optim.b2": "[0, 1)", "optim.grad_clip": "[0, inf)",
    "mesh.data": "-1 or [1, inf)", "mesh.fsdp": "-1 or [1, inf)", "mesh.tensor": "-1 or [1, inf)",
    "run.max_steps": "[1, inf)", "run.seed": "[0, inf)", "run.checkpoint_every": "[1, inf)",
    "run.keep_checkpoints": "[1, inf)", "run.ktae_top_tokens": "[1, inf)", "run.eval_every": "[0, inf)",
    "run.eval_limit": "[0, inf)",
    "lora.rank": "[0, inf)", "lora.alpha": "(0, inf)",
}


def in_range(value: float, spec: str) -> bool:
    """Whether `value` is allowed by a `RANGES` entry."""
    for option in spec.split(" or "):
        if option[0] not in "[(":
            if value == float(option):
                return True
            continue
        low, high = (float(x) for x in option[1:-1].split(","))
        above = value >= low if option[0] == "[" else value > low
        below = value <= high if option[-1] == "]" else value < high
        if above and below:
            return True
    return False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    rollout: RolloutSection = RolloutSection()
    algo: AlgoSection = AlgoSection()
    ktae: KTAESection = KTAESection()
    reward: RewardSection = RewardSection()
    optim: OptimSection = OptimSection()
    mesh: MeshConfig = MeshConfig()
    run: RunSection = RunSection()
    lora: LoraSection = LoraSection()

    @property
    def mini_batch_prompts(self) -> int:
        return self.algo.mini_batch_prompts or self.rollout.prompts_per_step

    def micro_batch_rollouts(self, batch_devices: int) -> int:
        """Rollouts per gradient-accumulation slice, over all batch devices."""
        return self.algo.micro_batch_per_device * batch_devices or self.mini_batch_prompts * self.rollout.group_size

    def logprob_micro_batch_rollouts(self, batch_devices: int) -> int:
        """Rollouts per slice of the log-prob passes, over all batch devices (no gradients: may be larger)."""
        return self.algo.logprob_micro_batch_per_device * batch_devices or self.micro_batch_rollouts(batch_devices)

    def prompts_in_slots(self, batch_devices: int) -> int:
        """Prompts whose rows fill the decode slots at once, over all batch devices (the step's
        prompts still go through one sampler call: a slot takes the next row as a row stops)."""
        return self.rollout.sample_prompts_per_device * batch_devices or self.rollout.prompts_per_step

    def validate(self, num_batch_devices: int | None = None) -> "TrainConfig":
        """Every numeric field's range (`RANGES`), then the combinations a single field cannot
        check; raises ConfigError naming the key. With `num_batch_devices` (`mesh.batch_devices`),
        also the divisibility the mesh needs.
        """
        for key, spec in RANGES.items():
            section, field = key.split(".")
            value = getattr(getattr(self, section), field)
            if not in_range(value, spec):
                raise ConfigError(f"{key}={value}: must be in {spec}")
        r, a = self.rollout, self.algo
        if r.prompts_per_step % self.mini_batch_prompts:
            raise ConfigError(f"algo.mini_batch_prompts={a.mini_batch_prompts} must divide "
                              f"rollout.prompts_per_step={r.prompts_per_step}")
        if self.run.eval_every and not self.run.eval_file:
            raise ConfigError("run.eval_every is set but run.eval_file is empty")
        # Invariants across fields of a stage (KTAE's alpha + beta > 0, the overlong buffer within
        # the response length) live in its runtime config only: build it once to check them.
        for name, build in (("ktae", lambda: self.to_ktae((), enabled=True)), ("reward", self.to_reward),
                            ("lora", self.lora.spec)):
            try:
                build()
            except ValueError as err:
                raise ConfigError(f"{name}: {err}") from None
        devices = num_batch_devices or 1
        # KTAE groups are never split: each device holds whole groups of the step.
        if r.prompts_per_step % devices:
            raise ConfigError(f"rollout.prompts_per_step={r.prompts_per_step} prompts cannot be split over {devices} "
                              f"batch devices (mesh data x fsdp) in whole groups of {r.group_size}")
        if self.mini_batch_prompts * r.group_size % devices:
            raise ConfigError(f"algo.mini_batch_prompts={self.mini_batch_prompts}: its {self.mini_batch_prompts * r.group_size} "
                              f"rollouts cannot be split over {devices} batch devices")
        mini_rows = self.mini_batch_prompts * r.group_size
        if mini_rows % self.micro_batch_rollouts(devices):
            raise ConfigError(f"algo.micro_batch_per_device={a.micro_batch_per_device}: {devices} devices x "
                              f"{a.micro_batch_per_device} does not divide the mini-batch's {mini_rows} rollouts")
        if mini_rows % self.logprob_micro_batch_rollouts(devices):
            raise ConfigError(f"algo.logprob_micro_batch_per_device={a.logprob_micro_batch_per_device}: {devices} devices x "
                              f"{a.logprob_micro_batch_per_device} does not divide the mini-batch's {mini_rows} rollouts")
        return self

    # ------------------------------------------------------------------ runtime configs of the stages
    def to_sampling(self, stop_ids: typing.Sequence[int], pad_id: int, batch_devices: int = 1) -> SamplingConfig:
        """The rollout sampler's settings: G responses per prompt, stopping at `stop_ids`, on
        `sample_prompts_per_device` x G decode slots per batch device (0: every row at once)."""
        r = self.rollout
        return SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              eos_ids=tuple(stop_ids), pad_id=pad_id, num_samples=r.group_size,
                              slots=r.sample_prompts_per_device * batch_devices * r.group_size)

    def to_reward(self) -> RewardConfig:
        """How graded responses become rewards (the overlong penalty counts to `rollout.max_new_tokens`)."""
        w = self.reward
        return RewardConfig(kind=w.kind, overlong_buffer=w.overlong_buffer, overlong_factor=w.overlong_factor,
                            max_response_len=self.rollout.max_new_tokens, format_weight=w.format_weight,
                            custom_fn=w.custom_fn or None)

    def to_ktae(self, ignore_ids: typing.Sequence[int], *, enabled: bool | None = None) -> KTAEConfig | None:
        """KTAE's settings (None when `ktae.enabled` is false); `ignore_ids` (pad, EOS) score 0 unless
        `ktae.ignore_special` is false."""
        k = self.ktae
        if not (k.enabled if enabled is None else enabled):
            return None
        return KTAEConfig(alpha=k.alpha, beta=k.beta, gamma=k.gamma, top=k.top, k1=k.k1, b=k.b,
                          zero_fisher_at_p1=k.zero_fisher_at_p1,
                          ignore_token_ids=tuple(ignore_ids) if k.ignore_special else ())

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
