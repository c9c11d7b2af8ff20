"""Plan a run before it is launched: memory per rank, step time, communication, checkpoint size.

Every figure derives from the model's own counts (``num_params``, ``flops_per_token``: the ones the
trainer logs) and from the DeepSpeed config dict that ``trainer.engine.deepspeed_config`` generates
(ZeRO stage, offload, bucket sizes), read through DeepSpeed's own config class so its defaults
apply. A change to either flows into the plan. ``python -m trainer.plan`` prints it (trainer/plan.py);
``trainer.train`` makes the same estimate at start (``check_at_start``).

Model states follow DeepSpeed's estimators (``estimate_zero2/3_model_states_mem_needs``) term by
term; what they leave out (activations, logits, buckets, the process itself) is added beside them.
On a GPU every device term is counted as live at once (an upper bound: activations are freed as
gradients appear) and an asynchronous save's snapshot is host memory. On CPU the peak is the larger
of the step and the save, with what glibc's heap keeps between them (trainer/hostmem_plan.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.config import ConfigError, ModelConfig, TrainConfig
from trainer.devices import DeviceSpec, GiB, cluster
from trainer.engine import deepspeed_config
from trainer.hostmem import mmap_threshold
from trainer.hostmem_plan import (
    activations_in_heap,
    below_threshold,
    freed_after_step,
    snapshot_bytes,
    zero3_heap_bytes,
)
from trainer.model import flops_per_token, num_params
from trainer.perf import hardware_flops_per_token
from trainer.plan_shapes import _shapes, activation_bytes, largest_module, logits_bytes, param_tensors

# DeepSpeed's CPU all-reduce keeps a shared-memory workspace per rank of 2 x 1 MiB + 2 x 32 MiB
# (NAIVE_ALLREDUCE_THRESHOLD, MAX_BUF_SIZE in deepspeed/ops/csrc/cpu/comm/shm.cpp), touched at init.
CPU_SHM_WORKSPACE = 2 * 2**20 + 2 * 32 * 2**20


@dataclass(frozen=True)
class Item:
    """One term of a rank's memory: bytes, and whether it lives on the device or the host."""

    name: str
    nbytes: float
    where: str = "device"  # device | host
    note: str = ""
    kind: str = "state"  # state (what DeepSpeed's estimators count) | buffer | activation | process | heap
    phase: str = "always"  # always | step (forward, backward, optimizer) | save (an async save's snapshot)


@dataclass
class Plan:
    """The estimate for one config on one cluster (per rank unless named otherwise)."""

    device: DeviceSpec
    world: int
    gpus_per_node: int
    nodes: int
    num_params: int
    items: list[Item]
    flops_per_token: int
    hw_flops_per_token: int
    tokens_per_step: int
    total_steps: int
    grad_accum: int
    comm_bytes: float  # sent per rank per step
    comm_bw: float
    overlap: bool
    checkpoint_bytes: float
    precision: str
    suggestions: list[list[str]] = field(default_factory=list)

    def phase_bytes(self, phase: str) -> float:
        """Device memory (CPU: RSS) during the ``step`` or the ``save``."""
        on = [i for i in self.items if (i.where == "device" or self.device.is_cpu) and i.kind != "build"]
        return sum(i.nbytes for i in on if i.phase in ("always", phase))

    def device_bytes(self) -> float:
        """The peak: the larger of the step and the save (on a GPU every device item is "always")."""
        return max(self.phase_bytes("step"), self.phase_bytes("save"))

    def host_bytes(self) -> float:
        """Host memory per rank: the model as built (before it moves to the device), or the
        offloaded state created after it with an async save's snapshot, whichever is larger."""
        build = sum(i.nbytes for i in self.items if i.kind == "build")
        return max(build, sum(i.nbytes for i in self.items if i.where == "host" and i.kind != "build"))

    def fits(self) -> bool:
        if self.device.is_cpu:  # host RAM is shared by the node's ranks
            return self.device_bytes() * self.gpus_per_node <= self.device.memory
        return self.device_bytes() <= self.device.memory

    def compute_s(self) -> tuple[float, float]:
        """Seconds of compute per step at the device's (high, low) utilisation; inf without a peak."""
        peak = self.device.peak_flops.get(self.precision, 0.0)
        flops = self.hw_flops_per_token * self.tokens_per_step / self.world
        lo, hi = self.device.mfu
        return (flops / (peak * hi), flops / (peak * lo)) if peak else (float("inf"), float("inf"))

    def comm_s(self) -> float:
        return self.comm_bytes / self.comm_bw if self.world > 1 else 0.0

    def step_s(self) -> tuple[float, float]:
        """Fast: communication hidden behind compute; slow: added to it."""
        fast, slow = self.compute_s()
        comm = self.comm_s()
        return (max(fast, comm) if self.overlap else fast + comm, slow + comm)

    def checkpoint_s(self) -> float:
        return self.checkpoint_bytes / (self.device.write_bw * self.nodes)

    def summary(self) -> dict[str, Any]:
        """The plan in a few numbers: the ``plan`` field of the run's ``perf`` event."""
        fast, slow = self.step_s()
        return {
            "device": self.device.key,
            "world": self.world,
            "num_params": self.num_params,
            "memory_gb": self.device_bytes() / GiB,
            "host_gb": self.host_bytes() / GiB,
            "device_memory_gb": self.device.memory / GiB,
            "fits": self.fits(),
            "items_gb": {i.name: i.nbytes / GiB for i in self.items},
            "step_s": [fast, slow],
            "tokens_per_s": [self.tokens_per_step / slow, self.tokens_per_step / fast],
            "comm_gb_per_step": self.comm_bytes / 2**30,
            "checkpoint_gb": self.checkpoint_bytes / GiB,
        }


# ---------------------------------------------------------------------------- memory


def _zero(ds: dict[str, Any]):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))


def model_state_items(cfg: TrainConfig, mcfg: ModelConfig, ds: dict[str, Any], world: int) -> list[Item]:
    """Weights, gradients and optimizer state per rank, by ZeRO stage and offload.

    Mixed precision: 16-bit weights and gradients, fp32 master weights, fp32 gradients for the
    optimizer, two fp32 Adam moments; ZeRO-1 partitions the optimizer's share, ZeRO-2 the
    gradients too, ZeRO-3 the weights too (plus one gathered layer: weights and gradients), as
    DeepSpeed's estimators count them. In fp32 the working copies are the fp32 ones, so the fp32
    gradient copy is DeepSpeed's flattened partition (ZeRO-1/2) or nothing (ZeRO-3: a no-op cast).
    """
    n, g = num_params(mcfg), world
    zero = _zero(ds)
    stage, mixed = zero.stage, cfg.engine.precision != "fp32"
    w = 2 if mixed else 4
    opt_at = (
        "host" if zero.offload_optimizer is not None and zero.offload_optimizer.device != "none" else "device"
    )
    par_at = "host" if zero.offload_param is not None and zero.offload_param.device != "none" else "device"
    share = n / g if stage >= 1 else n  # the optimizer's share of the parameters
    items = []
    if stage < 3:
        items.append(Item("weights", w * n, "device", f"{w} B/param"))
    else:
        largest, persistent = _shapes(mcfg, zero.param_persistence_threshold)
        items.append(Item("weights", w * (n / g + persistent), par_at, f"{w} B/param / {g} ranks"))
        items.append(
            Item("gathered layer", 2 * w * largest, "device", f"weights + grads of {largest:,} params")
        )
    if stage <= 1:
        items.append(Item("gradients", w * n, "device", "full: reduced at the step"))
    elif stage == 2 and opt_at == "device":  # offloaded: straight into the host's fp32 gradients
        items.append(Item("gradients", w * n / g, opt_at, "partition"))
    elif mixed or opt_at == "host":
        # ZeRO-3's reduce-scatter target, apart from the optimizer's fp32 gradients when those are
        # another dtype or on the host; DeepSpeed's estimator leaves it out
        items.append(Item("gradient partition", w * n / g, "device", f"{w} B/param", kind="buffer"))
    if mixed or opt_at == "host":
        # fp32 ZeRO 1-3 keep none: the master is the module's partition (engine._share_zero*_master_weights)
        items.append(Item("master weights", 4 * share, opt_at, "fp32"))
    if mixed or stage in (1, 2) or (stage == 3 and not mixed):
        items.append(Item("fp32 gradients", 4 * share, opt_at, "for the optimizer"))
    items.append(Item("Adam moments", 8 * share, opt_at, "2 x fp32"))
    return items


def build_item(cfg: TrainConfig, mcfg: ModelConfig, ds: dict[str, Any]) -> Item:
    """Each rank builds the model in fp32 on its host, then DeepSpeed moves it to the device; under
    ZeRO-3 ``deepspeed.zero.Init`` partitions each layer as it is built (one layer at a time)."""
    if _zero(ds).stage < 3:
        return Item("model build", 4 * num_params(mcfg), "host", "fp32, whole model", "build")
    return Item("model build", 4 * largest_module(mcfg), "host", "fp32, one layer (zero.Init)", "build")


def buffer_items(
    cfg: TrainConfig, mcfg: ModelConfig, ds: dict[str, Any], world: int, cpu: bool
) -> list[Item]:
    """DeepSpeed's communication buffers, sized from the generated config. On CPU only the pages
    written count: a bucket larger than the model is resident up to the model's size."""
    n, zero = num_params(mcfg), _zero(ds)
    w = 2 if cfg.engine.precision != "fp32" else 4
    items = []

    def touched(elements: float) -> float:
        return min(elements, n) if cpu else elements

    if zero.stage == 0 and world > 1:
        items.append(
            Item(
                "all-reduce buffer",
                w * min(5e8, n),
                "device",
                "gradients flattened (500M elements)",
                "buffer",
            )
        )
    elif zero.stage in (1, 2):
        buffers = 2 if zero.overlap_comm else 1
        items.append(
            Item(
                "reduce buckets",
                buffers * w * touched(zero.reduce_bucket_size),
                "device",
                f"{buffers} x reduce_bucket_size={zero.reduce_bucket_size:.3g}",
                "buffer",
            )
        )
    elif zero.stage == 3:
        largest, _ = _shapes(mcfg, 0)
        # gathered parameters beyond one layer: prefetched, or kept while reused soon
        # a gathered parameter stays until it is not reused within max_reuse_distance (prefetch
        # brings the next ones early); max_live_parameters caps the total
        live = min(n, zero.max_live_parameters, max(zero.prefetch_bucket_size, zero.max_reuse_distance))
        items.append(
            Item(
                "live parameters",
                w * max(0.0, min(live, n) - largest),
                "device",
                f"prefetch {zero.prefetch_bucket_size:.3g}, reuse {zero.max_reuse_distance:.3g}",
                "buffer",
            )
        )
        items.append(
            Item(
                "reduce bucket",
                w * touched(zero.reduce_bucket_size),
                "device",
                f"reduce_bucket_size={zero.reduce_bucket_size:.3g}",
                "buffer",
            )
        )
    return items


def host_items(
    cfg: TrainConfig, mcfg: ModelConfig, ds: dict[str, Any], world: int, items: list[Item], cpu: bool
) -> list[Item]:
    """``items`` in their phases, with what glibc's heap keeps (CPU) and an asynchronous save's
    snapshot (a host copy of the worst rank's checkpoint share: pinned host memory on a GPU)."""
    zero, w = _zero(ds), 2 if cfg.engine.precision != "fp32" else 4
    shared = 1 if mcfg.tie_embeddings else 0  # the tied table: one tensor
    numels = [k for _, k in param_tensors(mcfg)[shared:]]
    out, heap, acts = [], 0.0, 0.0  # heap: bytes the heap keeps resident after the step
    thr = mmap_threshold(mcfg.d_model)  # as the trainer sets it (trainer.hostmem)
    below = f"below {thr / 2**20:g} MiB"
    hidden = w * mcfg.d_model * cfg.micro_batch_size * cfg.data.seq_len  # one activation tensor
    for i in items if cpu else []:  # buffers and activations are freed after the step, ...
        step = i.kind == "activation" or (i.kind == "buffer" and i.name != "gradient partition")
        step = step or i.name == "gathered layer"  # ZeRO-3's gathered tensors are freed after use
        phase = "step" if step else i.phase
        if i.name == "gradients" and zero.stage <= 1:  # set to None after the step; small ones stay
            phase, kept = "step", below_threshold([w * k for k in numels], thr)
            heap += kept
            out.append(Item("freed gradients", kept, "device", f"in the heap, {below}", "heap", "save"))
        if freed_after_step(i.name, i.where, zero.stage):
            phase = "step"
        small = {"activations": hidden, "logits": i.nbytes / 4}.get(i.name)  # one tensor of each
        if small is not None and activations_in_heap(small, thr):  # ... but the heap keeps small ones
            phase, heap, acts = "always", heap + i.nbytes, acts + i.nbytes
        out.append(dataclasses.replace(i, phase=phase))
    if cpu and zero.stage == 3:
        moved = [k for k in numels if k >= zero.param_persistence_threshold]
        # per block, backward frees the activations as it gathers and reduces: one set of chunks
        kept = max(0.0, zero3_heap_bytes(moved, w, world, thr) - acts)
        heap += kept
        note = f"gathered layers, grad partitions {below}, beyond the activations'"
        out.append(Item("ZeRO-3 heap", kept, "device", note, "heap"))
    out = out if cpu else list(items)
    c = cfg.checkpoint
    if c.async_save and (c.save_final or c.every_steps or c.every_minutes):
        total, small = snapshot_bytes(zero.stage, numels, w, world, w != 4, thr)
        # The Saver keeps its buffers for the next save (checkpoint._HostPool): saved before the
        # end, they stay under every later step, whose tensors need the heap they took back
        again = c.every_minutes > 0 or 0 < c.every_steps < cfg.total_steps()
        reused = min(small, heap) if cpu and not again else 0.0
        if not cpu:
            where, phase, note = "host", "save", "pinned"
        elif again:
            where, phase, note = "device", "always", "async save, rank 0; kept for the next save"
        else:
            where, phase, note = "device", "save", f"async save, rank 0; {reused / GiB:.2f} GiB in kept heap"
        out.append(Item("checkpoint snapshot", total - reused, where, note, "buffer", phase))
    return out


def rss_now() -> int:
    """This process's RSS with torch._dynamo imported: the engine's first torch optimizer imports it
    anyway (``Optimizer.add_param_group`` is wrapped by ``torch._disable_dynamo``), and with it
    sympy, networkx, jinja2: measured +71 MiB (40 of it heap) in a rank's ``deepspeed.initialize``."""
    import psutil
    import torch._dynamo  # noqa: F401

    return psutil.Process(os.getpid()).memory_info().rss


def base_items(device: DeviceSpec, world: int, baseline: float | None) -> list[Item]:
    """The process itself: on CPU its measured RSS before the model (torch, DeepSpeed, loaders) and
    DeepSpeed's shared-memory workspace; on a GPU the stated CUDA context and NCCL reserve."""
    if not device.is_cpu:
        return [Item("CUDA context, NCCL", device.reserved, "device", "stated", "process")]
    measured = baseline if baseline is not None else rss_now()
    return [
        Item("process baseline", measured, "device", "measured RSS", "process"),
        # deepspeed.initialize sets it up on CPU at any world size (measured: +75 MiB with 1 rank and 2)
        Item("DeepSpeed shm workspace", CPU_SHM_WORKSPACE, "device", "CPU collectives", "process"),
    ]


# ---------------------------------------------------------------------------- the plan


def resolve_model(cfg: TrainConfig) -> ModelConfig:
    """The model config with its vocabulary, as build_run would resolve it from the data."""
    if cfg.model.vocab_size is not None:
        return cfg.model
    from pathlib import Path

    from trainer.data.loader import load_manifest

    path = cfg.data.weighted_paths()[0][0]
    if (Path(path) / "manifest.json").is_file():
        vocab = load_manifest(path)["tokenizer"]["vocab_size"]
    elif cfg.data.builtin:
        vocab = 257  # the built-in corpus is byte-tokenized (trainer.data.tokenizer.ByteTokenizer)
    else:
        raise ConfigError(f"model.vocab_size is null and {path} is not prepared yet: set model.vocab_size")
    return dataclasses.replace(cfg.model, vocab_size=vocab)


def make_plan(
    cfg: TrainConfig,
    device: DeviceSpec,
    gpus_per_node: int,
    nodes: int,
    *,
    baseline: float | None = None,
    model: ModelConfig | None = None,
    suggest: bool = True,
) -> Plan:
    """The plan for ``cfg`` on ``nodes`` x ``gpus_per_node`` ranks of ``device``."""
    world = gpus_per_node * nodes
    cfg = dataclasses.replace(cfg, micro_batch_size=cfg.micro_batch(world))  # `auto` for this world
    if cfg.engine.precision == "fp16" and device.is_cpu:
        raise ConfigError("engine.precision=fp16: DeepSpeed has no fp16 on CPU: use bf16 or fp32 there")
    accum = cfg.grad_accum_steps(world)  # the trainer's own check: the same one-line error
    mcfg = model or resolve_model(cfg)
    ds = deepspeed_config(
        cfg.engine,
        cfg.optim,
        micro_batch_size=cfg.micro_batch_size,
        grad_accum_steps=accum,
        world_size=world,
        total_steps=cfg.total_steps(),
        model=mcfg,
        device_type="cpu" if device.is_cpu else "cuda",  # DeepSpeed's settings on that device
    )
    seq, micro, prec = cfg.data.seq_len, cfg.micro_batch_size, cfg.engine.precision
    items = base_items(device, world, baseline)
    items += model_state_items(cfg, mcfg, ds, world)
    items += buffer_items(cfg, mcfg, ds, world, device.is_cpu)
    items.append(
        Item(
            "activations",
            activation_bytes(mcfg, micro, seq, prec, device.is_cpu),
            "device",
            f"micro-batch {micro} x {seq}, act_ckpt={mcfg.act_ckpt}",
            "activation",
        )
    )
    items.append(
        Item("logits", logits_bytes(mcfg, micro, seq, prec), "device", "4 x tokens x vocab", "activation")
    )
    items = host_items(cfg, mcfg, ds, world, items, device.is_cpu)
    if not device.is_cpu:
        items.append(build_item(cfg, mcfg, ds))
    items = [i for i in items if i.nbytes > 0]
    n = num_params(mcfg)
    zero = _zero(ds)
    plan = Plan(
        device=device,
        world=world,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        num_params=n,
        items=items,
        flops_per_token=flops_per_token(mcfg, seq),
        hw_flops_per_token=hardware_flops_per_token(mcfg, seq),
        tokens_per_step=cfg.tokens_per_step(),
        total_steps=cfg.total_steps(),
        grad_accum=accum,
        comm_bytes=comm_bytes(zero.stage, n, 2 if prec != "fp32" else 4, world, accum),
        comm_bw=device.inter_bw if nodes > 1 else device.intra_bw,
        overlap=zero.stage >= 2 and bool(zero.overlap_comm) or zero.stage == 3,
        checkpoint_bytes=checkpoint_bytes(zero.stage, n, prec),
        precision=prec,
    )
    if suggest and not plan.fits():
        plan.suggestions = suggestions(cfg, mcfg, device, gpus_per_node, nodes, baseline)
    return plan


def comm_bytes(stage: int, n: int, w: int, world: int, accum: int) -> float:
    """Bytes each rank sends per optimizer step (ring collectives: (W-1)/W of the tensor each).

    ZeRO-0: one all-reduce of the gradients (2x); ZeRO-1: reduce-scatter then all-gather of the
    weights (2x); ZeRO-2: a reduce-scatter per micro-batch plus the all-gather; ZeRO-3: per
    micro-batch an all-gather in forward and in backward and a reduce-scatter (3x).
    """
    ring = (world - 1) / world * n * w
    return {0: 2 * ring, 1: 2 * ring, 2: (accum + 1) * ring, 3: 3 * accum * ring}[stage]


def checkpoint_bytes(stage: int, n: int, precision: str) -> float:
    """Weights in the working precision, plus fp32 master weights and two moments. ZeRO-0 in fp32:
    torch's AdamW keeps the two moments only; ZeRO-3: no module weights (its module holds only
    partitions; the fp32 master partitions are the weights): 12 bytes per parameter (measured in fp32)."""
    w = 4 if precision == "fp32" else 2
    if stage == 3:
        return 12 * n
    optimizer = 8 * n if stage == 0 and precision == "fp32" else 12 * n
    return w * n + optimizer


# The single changes tried, cheapest first; each is a Hydra override.
def _candidates(cfg: TrainConfig) -> list[list[str]]:
    out: list[list[str]] = []
    for stage in range(cfg.engine.zero_stage + 1, 4):
        out.append([f"engine.zero_stage={stage}"])
    if cfg.model.act_ckpt != "full":
        out.append(["model.act_ckpt=full"])
    micro = cfg.micro_batch_size // 2
    while micro >= 1:
        out.append([f"micro_batch_size={micro}"])
        micro //= 2
    if cfg.engine.zero_stage >= 1 and not cfg.engine.offload_optimizer:
        out.append(["engine.offload_optimizer=true"])
    return out


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``cfg`` with ``key=value`` overrides of the kinds ``_candidates`` makes (validated again)."""
    engine, model, top = {}, {}, {}
    for o in overrides:
        key, value = o.split("=", 1)
        parsed: Any = (
            value == "true" if value in ("true", "false") else (int(value) if value.isdigit() else value)
        )
        section, _, name = key.rpartition(".")
        {"engine": engine, "model": model, "": top}[section][name] = parsed
    return dataclasses.replace(
        cfg,
        engine=dataclasses.replace(cfg.engine, **engine),
        model=dataclasses.replace(cfg.model, **model),
        **top,
    )


def suggestions(
    cfg: TrainConfig,
    mcfg: ModelConfig,
    device: DeviceSpec,
    gpus_per_node: int,
    nodes: int,
    baseline: float | None,
    limit: int = 3,
) -> list[list[str]]:
    """Override sets that make the run fit: single changes first, then pairs, then triples; the
    fastest (by predicted step time) first."""
    singles = _candidates(cfg)
    for size in (1, 2, 3):
        found: list[tuple[float, list[str]]] = []
        for combo in itertools.combinations(singles, size):
            overrides = [o for c in combo for o in c]
            if len({o.split("=")[0] for o in overrides}) != len(overrides):
                continue  # two values of one key
            try:
                c = apply_overrides(cfg, overrides)
                m = dataclasses.replace(mcfg, act_ckpt=c.model.act_ckpt)
                p = make_plan(c, device, gpus_per_node, nodes, baseline=baseline, model=m, suggest=False)
            except ConfigError:  # e.g. a micro-batch that does not divide the global batch
                continue
            if p.fits():
                found.append((p.step_s()[1], overrides))
        if found:
            found.sort(key=lambda f: f[0])
            return [overrides for _, overrides in found[:limit]]
    return []


# ---------------------------------------------------------------------------- at the start of training

PEAK_TOLERANCE = 0.25  # trainer.train warns when the measured peak is further than this from the plan


def check_at_start(cfg: TrainConfig, model: ModelConfig, world_size: int) -> Plan:
    """The plan for this launch on the devices it has; refuses (one line) a run that cannot fit.

    On CPU the process's RSS now (torch, DeepSpeed, the data loaders; no model yet) is the baseline.
    """
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    here = dataclasses.replace(
        cfg.plan, device="auto", gpus_per_node=per_node, nodes=max(1, world_size // per_node)
    )
    device, per_node, nodes = cluster(here)
    baseline = rss_now() if device.is_cpu else None
    plan = make_plan(cfg, device, per_node, nodes, baseline=baseline, model=model, suggest=cfg.plan.check)
    if cfg.plan.check and not plan.fits():
        need = plan.device_bytes() * (per_node if device.is_cpu else 1)
        fixes = " or ".join(" ".join(s) for s in plan.suggestions) or "more devices"
        raise ConfigError(
            f"the plan says this run does not fit: {need / GiB:.1f} GiB of the {device.memory / GiB:.1f} GiB "
            f"of {device.description} (trainer.plan shows why): try {fixes}, or set plan.check=false"
        )
    return plan


def measured_peak(device: torch.device) -> float:
    """This process's peak memory in bytes: RSS on CPU (ru_maxrss), reserved memory on a GPU
    (since the last reset of its peak statistics: the last log window)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_reserved(device))
    from trainer.perf import peak_rss_gb

    return peak_rss_gb() * 2**30


def compare_peak(plan: Plan, peaks: list[float], step: int) -> dict[str, Any]:
    """The ``plan_check`` event: every rank's measured peak against the plan; warns past 25%."""
    planned = plan.device_bytes()
    worst = max(peaks, key=lambda p: abs(p / planned - 1))
    event = {
        "event": "plan_check",
        "step": step,
        "planned_gb": planned / GiB,
        "peak_gb": [p / GiB for p in peaks],
    }
    event["ratio"] = worst / planned
    if abs(worst / planned - 1) > PEAK_TOLERANCE:
        import logging

        logging.getLogger("trainer").warning(
            "measured peak memory %.2f GiB per rank differs from the plan's %.2f GiB by %.0f%% (> %.0f%%)",
            worst / GiB,
            planned / GiB,
            100 * (worst / planned - 1),
            100 * PEAK_TOLERANCE,
        )
    return event
