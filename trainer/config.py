"""Typed configuration: one dataclass per Hydra config group, checked once at the edge.

Hydra composes YAML onto these schemas (registered in the ConfigStore), so unknown keys
and wrong types fail during composition. Cross-field rules live in ``__post_init__``
and raise :class:`ConfigError` whose message names the key to change. Builders receive
only their own section (``GPT(cfg.model)``), never the whole config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what to change."""


def _one_of(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(options)}: set {key} to one of them")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}")


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None: n_head (multi-head); fewer: grouped-query attention
    d_model: int = 128
    d_ff: Optional[int] = None  # None: 4*d_model for gelu, 8/3*d_model rounded up to 64 for swiglu
    vocab_size: Optional[int] = None  # None: taken from the dataset's tokenizer
    pad_vocab_to: int = 64  # embedding/logit rows rounded up to a multiple of this (faster matmuls)
    max_seq_len: int = 128
    pos_emb: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # swiglu | gelu
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    act_ckpt: str = "none"  # none | full | every_n | selective
    act_ckpt_every: int = 2  # with act_ckpt=every_n: checkpoint every k-th block

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "d_model", "max_seq_len", "pad_vocab_to", "act_ckpt_every"):
            _positive(f"model.{key}", getattr(self, key))
        if self.d_model % self.n_head:
            raise ConfigError(
                f"model.n_head={self.n_head} does not divide model.d_model={self.d_model}: "
                "change model.n_head or model.d_model"
            )
        if (self.d_model // self.n_head) % 2 and self.pos_emb == "rope":
            raise ConfigError(
                f"model.d_model/model.n_head={self.d_model // self.n_head} must be even for rope: "
                "change model.n_head or set model.pos_emb=learned"
            )
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise ConfigError(
                f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}: "
                "change model.n_kv_head (null means n_head)"
            )
        if self.vocab_size is not None:
            _positive("model.vocab_size", self.vocab_size)
        if self.d_ff is not None:
            _positive("model.d_ff", self.d_ff)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        _one_of("model.pos_emb", self.pos_emb, ("rope", "learned"))
        _one_of("model.norm", self.norm, ("rmsnorm", "layernorm"))
        _one_of("model.mlp", self.mlp, ("swiglu", "gelu"))
        _one_of("model.act_ckpt", self.act_ckpt, ("none", "full", "every_n", "selective"))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 64 * -(-(8 * self.d_model // 3) // 64)  # SwiGLU keeps ~4*d^2*2 params per MLP


@dataclass
class DataConfig:
    path: str = "data/builtin"  # a prepared dataset directory (manifest.json + shards)
    builtin: bool = False  # generate the project's own corpus into `path` if it is missing
    seq_len: int = 128  # tokens per training sample (the shards hold seq_len + 1)
    shuffle_window: int = 4  # shards whose samples are shuffled together
    seed: int = 0  # the sample order; a resumed run must keep it
    verify_shards: bool = False  # sha256 of every shard against the manifest as it is read

    def __post_init__(self) -> None:
        _positive("data.seq_len", self.seq_len)
        _positive("data.shuffle_window", self.shuffle_window)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled; never applied to norms, biases, embeddings
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.eps", self.eps)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


@dataclass
class EngineConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    offload_params: bool = False  # ZeRO-3 only: parameters live on the CPU
    initial_scale_power: int = 16  # fp16: initial loss scale 2**power
    loss_scale: float = 0.0  # fp16: 0 = dynamic, >0 = static
    ds_config: Dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed keys, merged last

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"engine.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        _one_of("engine.precision", self.precision, ("fp32", "bf16", "fp16"))
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("engine.offload_optimizer=true needs engine.zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("engine.offload_params=true needs engine.zero_stage=3")


@dataclass
class LoggerConfig:
    mode: str = "disabled"  # W&B: disabled | offline | online
    project: str = "trainer"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None  # None: the run's name
    tags: List[str] = field(default_factory=list)
    notes: Optional[str] = None

    def __post_init__(self) -> None:
        _one_of("logger.mode", self.mode, ("disabled", "offline", "online"))


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: not by step count
    every_minutes: float = 0.0  # 0: not by wall-clock time
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after a new one completes
    save_final: bool = True
    resume: str = "auto"  # auto (newest complete one in run_dir) | none | <path to a step directory>

    def __post_init__(self) -> None:
        _positive("checkpoint.every_steps", self.every_steps, allow_zero=True)
        _positive("checkpoint.every_minutes", self.every_minutes, allow_zero=True)
        _positive("checkpoint.keep_last", self.keep_last)


@dataclass
class GuardConfig:
    """What to do with a step whose loss or gradients are non-finite, or whose loss spikes."""

    on_nonfinite: str = "stop"  # stop: clear error, nothing saved | skip: drop the step and go on
    spike_k: float = 0.0  # > 0: a loss above mean + k*std of the last spike_window steps is a spike
    spike_window: int = 100
    on_spike: str = "skip"  # skip | stop
    inject_nan_at: List[int] = field(default_factory=list)  # fault injection: NaN loss at these steps

    def __post_init__(self) -> None:
        _one_of("guard.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _one_of("guard.on_spike", self.on_spike, ("stop", "skip"))
        _positive("guard.spike_k", self.spike_k, allow_zero=True)
        _positive("guard.spike_window", self.spike_window)

    def may_skip(self) -> bool:
        return self.on_nonfinite == "skip" or (self.spike_k > 0 and self.on_spike == "skip")


@dataclass
class TrainConfig:
    name: str = "default"
    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 100
    max_tokens: int = 0  # 0: no token budget; otherwise stop once this many tokens were seen
    global_batch_size: int = 16  # samples per optimizer step, across all ranks
    micro_batch_size: int = 8  # samples per forward/backward on one rank
    log_every: int = 10
    eval_every: int = 50  # 0: no evaluation during training
    eval_batches: int = 4  # global batches of the validation split per evaluation
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        for key in ("max_steps", "global_batch_size", "micro_batch_size", "log_every", "eval_batches"):
            _positive(key, getattr(self, key))
        _positive("max_tokens", self.max_tokens, allow_zero=True)
        _positive("eval_every", self.eval_every, allow_zero=True)
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}: "
                "lower data.seq_len or raise model.max_seq_len"
            )
        if self.guard.may_skip() and self.engine.zero_stage == 0 and self.engine.precision != "fp16":
            # Skipping reuses DeepSpeed's overflow path, which ZeRO-0 has only with fp16.
            raise ConfigError(
                "guard.on_nonfinite/on_spike=skip needs engine.zero_stage >= 1 (or fp16): "
                "raise engine.zero_stage or set the guard to stop"
            )
        self.grad_accum_steps(world_size_from_env())  # fail now, not after the model is built

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank; checks that the batch divides."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not divisible by micro_batch_size="
                f"{self.micro_batch_size} x world size {world_size}: change global_batch_size or "
                "micro_batch_size"
            )
        return self.global_batch_size // per_step

    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.data.seq_len

    def total_steps(self) -> int:
        """The step the run ends at: max_steps, or earlier when max_tokens runs out first."""
        if not self.max_tokens:
            return self.max_steps
        return min(self.max_steps, -(-self.max_tokens // self.tokens_per_step()))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def register_configs() -> None:
    """Register the schema so Hydra type-checks every group and override against it."""
    from hydra.core.config_store import ConfigStore  # here, so the model can import its config alone

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
