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
    # torch.compile the model (inductor) for training. Off by default: on 2 CPU cores compiling
    # takes ~50 s and saves ~20% of a tiny model's step, which a 200-step run never pays back.
    compile: bool = False

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
        for key in ("rope_theta", "norm_eps"):  # 0 or less: NaN losses blamed on optim.lr
            _positive(f"model.{key}", getattr(self, key))
        _positive("model.init_std", self.init_std, allow_zero=True)
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
class SourceConfig:
    path: str  # a prepared dataset directory
    weight: float = 1.0  # share of the samples, relative to the other sources' weights


@dataclass
class DataConfig:
    path: Optional[str] = "data/builtin"  # a prepared dataset directory (manifest.json + shards)
    # Several prepared datasets mixed by weight, instead of `path` (data=mixture sets path: null).
    sources: List[SourceConfig] = field(default_factory=list)
    builtin: bool = False  # generate the project's own corpus into `path` if it is missing
    seq_len: int = 128  # tokens per training sample (the shards hold seq_len + 1)
    shuffle_window: int = 4  # shards whose samples are shuffled together
    seed: int = 0  # the sample order; a resumed run must keep it
    verify_shards: bool = True  # sha256 of every shard against the manifest as it is read (in memory)
    on_corrupt: str = "error"  # error: stop naming the shard | skip: pass over bad samples, count them
    record_ids: bool = False  # each rank appends its batches' sample ids to run_dir/sample_ids/rank<r>.jsonl

    def __post_init__(self) -> None:
        _positive("data.seq_len", self.seq_len)
        _positive("data.shuffle_window", self.shuffle_window)
        _one_of("data.on_corrupt", self.on_corrupt, ("error", "skip"))
        if self.sources and self.path is not None:
            raise ConfigError(
                f"data.sources and data.path={self.path} are both set: use data=mixture (or set "
                "data.path=null) to mix data.sources, or drop data.sources to train on data.path"
            )
        if not self.sources and not self.path:
            raise ConfigError("data.path is not set: set data.path, or data.sources to mix several datasets")
        if self.sources and self.builtin:
            raise ConfigError("data.builtin=true prepares one dataset at data.path: set data.builtin=false")
        for i, src in enumerate(self.sources):
            if not src.path:
                raise ConfigError(f"data.sources[{i}].path is empty: set it to a prepared dataset directory")
            if not src.weight > 0 or src.weight == float("inf"):
                raise ConfigError(f"data.sources[{i}].weight={src.weight} must be a positive number")

    def weighted_paths(self) -> list[tuple[str, float]]:
        """(dataset directory, weight) of every source: data.sources, or data.path with weight 1."""
        if self.sources:
            return [(src.path, src.weight) for src in self.sources]
        assert self.path is not None
        return [(self.path, 1.0)]


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
        _positive("engine.loss_scale", self.loss_scale, allow_zero=True)
        _positive("engine.initial_scale_power", self.initial_scale_power, allow_zero=True)


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
    # true: a save blocks the step loop only while it copies the state to host memory; the write
    # goes on in the background and the checkpoint is published (COMPLETE, latest) once every
    # rank's write is durable. Costs one host copy of the state (pinned on GPUs), kept for reuse.
    async_save: bool = True

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
class PerfConfig:
    """What MFU is measured against (see trainer/perf.py)."""

    peak_tflops: float = 0.0  # per-device peak TFLOP/s; 0: device table (GPU) or a measured matmul (CPU)

    def __post_init__(self) -> None:
        _positive("perf.peak_tflops", self.peak_tflops, allow_zero=True)


@dataclass
class PlanConfig:
    """The cluster a run is planned for (``python -m trainer.plan``, see trainer/planner.py), and the
    check ``trainer.train`` makes at start against the devices it really has."""

    device: str = "auto"  # auto: this machine's device | h100-sxm | h100-pcie | a100-80gb | a100-40gb | cpu
    gpus_per_node: int = 0  # ranks per node; 0: this launch's (LOCAL_WORLD_SIZE, else 1)
    nodes: int = 0  # 0: this launch's (WORLD_SIZE / ranks per node)
    mfu: List[float] = field(default_factory=list)  # [low, high] fraction of peak; empty: the device's range
    write_gbps: float = 0.0  # checkpoint write bandwidth per node, GB/s; 0: the device's stated figure
    check: bool = True  # trainer.train refuses to start when the plan says the run does not fit

    def __post_init__(self) -> None:
        _positive("plan.gpus_per_node", self.gpus_per_node, allow_zero=True)
        _positive("plan.nodes", self.nodes, allow_zero=True)
        _positive("plan.write_gbps", self.write_gbps, allow_zero=True)
        if self.mfu and (len(self.mfu) != 2 or not 0 < self.mfu[0] <= self.mfu[1] <= 1):
            raise ConfigError(f"plan.mfu={list(self.mfu)} must be [low, high] with 0 < low <= high <= 1")


@dataclass
class ProfileConfig:
    """torch.profiler traces of a few steps into <run_dir>/profile/ (see trainer/profiling.py)."""

    enabled: bool = False
    steps: List[int] = field(default_factory=lambda: [5, 7])  # [first, last] step recorded, inclusive
    ranks: List[int] = field(default_factory=lambda: [0])  # ranks that record
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False
    memory_snapshot: bool = True  # CUDA only: torch.cuda.memory snapshot of the same steps

    def __post_init__(self) -> None:
        if len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]:
            raise ConfigError(f"profile.steps={list(self.steps)} must be [first, last], 1 <= first <= last")


@dataclass
class TrainConfig:
    name: str = "default"
    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 100
    max_tokens: int = 0  # 0: no token budget; otherwise stop once this many tokens were seen
    global_batch_size: int = 16  # samples per optimizer step, across all ranks
    # Samples per forward/backward on one rank: a number, or auto (see micro_batch). Any, since
    # OmegaConf 2.3 has no Union[int, str]; __post_init__ checks it.
    micro_batch_size: Any = "auto"
    log_every: int = 10
    eval_every: int = 50  # 0: no evaluation during training
    eval_batches: int = 4  # global batches of the validation split per evaluation
    gc_every: int = 50  # steps between Python GC collections (automatic GC off); 0: Python's automatic GC
    log_level: str = "info"  # info: libraries log to <run_dir>/logs/ only; debug: to the console too
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def __post_init__(self) -> None:
        for key in ("max_steps", "global_batch_size", "log_every", "eval_batches"):
            _positive(key, getattr(self, key))
        micro = self.micro_batch_size
        if isinstance(micro, str) and micro.isdigit():
            self.micro_batch_size = micro = int(micro)
        if micro != "auto" and (type(micro) is not int or micro < 1):
            raise ConfigError(f"micro_batch_size={micro} must be auto or a whole number >= 1")
        _positive("max_tokens", self.max_tokens, allow_zero=True)
        _positive("eval_every", self.eval_every, allow_zero=True)
        _positive("gc_every", self.gc_every, allow_zero=True)
        if self.log_level not in ("info", "debug"):
            raise ConfigError(f"log_level={self.log_level}: use info or debug")
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

    def micro_batch(self, world_size: int) -> int:
        """Samples per forward/backward on each rank at this world size.

        ``auto``: the largest micro-batch that divides the per-rank batch, i.e. that whole share,
        global_batch_size / world_size (no accumulation). Unlike llm-foundry's
        ``device_train_microbatch_size: auto`` it does not probe memory: set a number when that
        share's activations do not fit. A number is used as given (grad_accum_steps checks it).
        """
        if self.micro_batch_size != "auto":
            return self.micro_batch_size
        if self.global_batch_size % world_size:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not divisible by world size {world_size} "
                "(micro_batch_size=auto takes an equal share per rank): change global_batch_size"
            )
        return self.global_batch_size // world_size

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank; checks that the batch divides."""
        micro = self.micro_batch(world_size)
        if self.global_batch_size % (micro * world_size):
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not divisible by micro_batch_size="
                f"{micro} x world size {world_size}: change global_batch_size or micro_batch_size "
                "(auto: an equal share per rank)"
            )
        return self.global_batch_size // (micro * world_size)

    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.data.seq_len

    def total_steps(self) -> int:
        """The step the run ends at: max_steps, or earlier when max_tokens runs out first."""
        if not self.max_tokens:
            return self.max_steps
        return min(self.max_steps, -(-self.max_tokens // self.tokens_per_step()))


@dataclass
class PrepareConfig:
    """``python -m trainer.prepare``: text / JSON Lines -> tokenizer -> packed samples -> tar shards."""

    inputs: List[str] = field(default_factory=list)  # files, directories and glob patterns, in order
    out_dir: str = ""  # the dataset directory (manifest.json, shards, tokenizer/)
    tokenizer: str = "byte"  # byte | char | bpe (trained here) | a tokenizer.json | a tokenizer directory
    vocab_size: int = 8192  # bpe only: the vocabulary to train, end-of-text included
    seq_len: int = 128  # tokens per training sample; the shards hold seq_len + 1
    text_field: str = "text"  # JSON Lines: the key holding each document's text
    val_fraction: float = 0.01  # one sample of every round(1/val_fraction) goes to the val split
    shard_max_samples: int = 10000  # a shard closes at this many samples ...
    shard_max_mb: float = 256.0  # ... or at this many MB, whichever comes first
    seed: int = 0  # which sample of each block goes to val
    num_workers: int = 0  # tokenizer processes; 0: one per CPU core
    progress: bool = True  # a progress bar on stderr

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs is empty: give files, directories or globs, e.g. inputs=[corpus/*.txt]")
        if not self.out_dir:
            raise ConfigError("out_dir is not set: set out_dir to the dataset directory to write")
        for key in ("seq_len", "shard_max_samples", "shard_max_mb", "vocab_size"):
            _positive(key, getattr(self, key))
        _positive("num_workers", self.num_workers, allow_zero=True)
        if not 0.0 < self.val_fraction <= 0.5:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 0.5]")
        if self.tokenizer == "bpe" and self.vocab_size <= 257:
            raise ConfigError(
                f"vocab_size={self.vocab_size} leaves no merges for bpe (256 byte symbols + end-of-text): "
                "raise vocab_size"
            )

    def workers(self) -> int:
        return self.num_workers or os.cpu_count() or 1


_NO_CHECKPOINT = "checkpoint is not set: pass checkpoint=<run dir, checkpoints/step-<N> dir or exported dir>"


@dataclass
class EvalConfig:
    """``python -m trainer.eval``: loss, perplexity and bits per byte of a checkpoint on a dataset split."""

    checkpoint: Optional[str] = None  # a run dir, a checkpoints/step-<N> dir, or an exported dir
    data: Optional[str] = None  # a prepared dataset dir; None: the run's own dataset
    split: str = "val"  # val | train (read in manifest order, unshuffled)
    batches: int = 0  # global batches to evaluate (like eval_batches in training); 0: the whole split
    global_batch_size: Optional[int] = None  # None: the run's (8 for an exported model)
    micro_batch_size: Optional[int] = None  # None: the run's (the per-rank batch for an exported model)
    tokenizer: Optional[str] = None  # a tokenizer dir; None: the model's own
    dtype: str = "fp32"  # fp32 | bf16
    output_dir: Optional[str] = None  # None: <run_dir>/eval (or <exported dir>/eval)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError(_NO_CHECKPOINT)
        _one_of("split", self.split, ("val", "train"))
        _one_of("dtype", self.dtype, ("fp32", "bf16"))
        _positive("batches", self.batches, allow_zero=True)
        for key in ("global_batch_size", "micro_batch_size"):
            if getattr(self, key) is not None:
                _positive(key, getattr(self, key))


@dataclass
class GenerateConfig:
    """``python -m trainer.generate``: sample continuations of prompts from a checkpoint."""

    checkpoint: Optional[str] = None  # a run dir, a checkpoints/step-<N> dir, or an exported dir
    prompt: Optional[str] = None  # one prompt ...
    prompt_file: Optional[str] = None  # ... or a file with one prompt per line
    max_new_tokens: int = 128
    greedy: bool = False  # argmax instead of sampling (as does temperature=0)
    temperature: float = 0.8
    top_k: int = 0  # sample among the k most likely tokens; 0: all
    top_p: float = 1.0  # sample among the most likely tokens holding this much probability; 1: all
    seed: int = 0  # the same seed, prompts and batch_size give the same samples
    stop: List[str] = field(default_factory=list)  # a completion ends before the first of these strings
    stop_at_eot: bool = True  # a completion ends at the end-of-text token
    prepend_eot: bool = True  # start the context with end-of-text, as every training document does
    batch_size: int = 8  # prompts generated together (left-padded)
    use_cache: bool = True  # false: recompute the whole context every step (slow; for checking)
    prompt_overflow: str = "truncate"  # a prompt longer than model.max_seq_len: truncate (left) | error
    stream: bool = True  # a single prompt: print tokens as they come
    output: Optional[str] = None  # also write the completions to this JSON Lines file
    tokenizer: Optional[str] = None  # a tokenizer dir; None: the model's own
    dtype: str = "fp32"  # fp32 | bf16
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:<i>

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError(_NO_CHECKPOINT)
        if (self.prompt is None) == (self.prompt_file is None):
            raise ConfigError("give exactly one of prompt=<text> or prompt_file=<file, one prompt per line>")
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("prompt is empty: give some text to continue, e.g. prompt='Once upon a time'")
        _positive("max_new_tokens", self.max_new_tokens)
        _positive("batch_size", self.batch_size)
        if not 0.0 <= self.temperature < float("inf"):  # nan too
            raise ConfigError(f"temperature={self.temperature} must be a finite number >= 0 (0: greedy)")
        _positive("top_k", self.top_k, allow_zero=True)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ConfigError("stop holds an empty string: remove it")
        _one_of("prompt_overflow", self.prompt_overflow, ("truncate", "error"))
        _one_of("dtype", self.dtype, ("fp32", "bf16"))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def register_configs() -> None:
    """Register the schema so Hydra type-checks every group and override against it."""
    from hydra.core.config_store import ConfigStore  # here, so the model can import its config alone

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
