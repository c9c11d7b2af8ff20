"""How fast the run goes and what it holds: device peak FLOP/s, MFU and HFU, step-time split, memory.

MFU (model FLOPs utilisation) counts the FLOPs the model needs per token (``flops_per_token``:
6N + 12LHQT) against the device's peak, so it stays comparable across checkpointing policies.
HFU (hardware FLOPs utilisation) adds what activation checkpointing recomputes, i.e. what the
device really executes. Both are per device: achieved FLOP/s of one rank over that rank's peak.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from trainer.config import ModelConfig
from trainer.model import flops_per_token, num_params

log = logging.getLogger("trainer")

# Dense (no sparsity) peak TFLOP/s per device, by substring of torch.cuda.get_device_name(); the
# first match wins, so the more specific names come first. fp32 is the plain (non-tensor-core) peak,
# tf32 the tensor-core peak used for fp32 matmuls when torch.backends.cuda.matmul.allow_tf32 is on.
# Vendors' data sheets (SXM variants unless named); fp16 equals bf16 on all of these but the V100.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GB200", {"bf16": 2500.0, "tf32": 1250.0, "fp32": 80.0}),
    ("B200", {"bf16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    ("H200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H800", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("MI300X", {"bf16": 1307.0, "tf32": 653.7, "fp32": 163.4}),
    ("MI250X", {"bf16": 383.0, "fp32": 95.7}),
]


@dataclass(frozen=True)
class Peak:
    """Peak FLOP/s of one device for this run's precision, and where the number comes from."""

    flops: float
    source: str  # "override" | "table: <device>" | "measured: <n>x<n> fp32 matmul"


def table_peak(device_name: str, precision: str, tf32: bool = False) -> float | None:
    """The table's peak FLOP/s for a device name and a precision (fp32 | bf16 | fp16), or None."""
    key = "tf32" if precision == "fp32" and tf32 else precision
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            tflops = peaks.get(key) or (peaks.get("bf16") if key == "fp16" else None)
            return tflops * 1e12 if tflops else None
    return None


def measure_matmul_flops(
    n: int = 2048, min_repeats: int = 5, min_seconds: float = 0.5, dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of the fastest timed n x n matmul in ``dtype`` (2n^3 FLOPs), after one warm-up.

    The CPU has no data-sheet number we can look up reliably, so we measure what torch reaches
    with this process's threads. A peak is a best case: any core stolen by another thread or
    process during a repeat only slows that repeat, so we keep timing for ``min_seconds`` (at
    least ``min_repeats`` times) and take the fastest. A repeat's time is the shorter of its wall
    time and this process's CPU time per thread: under load that lasts the whole measurement
    (other ranks, a CI neighbour) the wall time counts the time the threads waited for a core,
    and gave peaks 3-10x too low (an MFU above 1 once the load eased); CPU time does not.
    Cached: a process pays for it once, however it is called. Its inputs come from a generator of
    its own: the plan measures after the run has seeded torch, and drawing from the global one
    there would change the run's initial weights.
    """
    return _measure_matmul_flops(n, min_repeats, min_seconds, dtype)


@functools.cache
def _measure_matmul_flops(n: int, min_repeats: int, min_seconds: float, dtype: torch.dtype) -> float:
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    torch.mm(a, b)
    threads = torch.get_num_threads()
    best, repeats, start = math.inf, 0, time.perf_counter()
    while repeats < min_repeats or time.perf_counter() - start < min_seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0, (time.process_time() - c0) / threads)
        repeats += 1
    return 2 * n**3 / best


def device_peak(device: torch.device, precision: str, override_tflops: float = 0.0) -> Peak | None:
    """The peak the MFU is measured against: the override, the device table, or a CPU measurement."""
    if override_tflops > 0:
        return Peak(override_tflops * 1e12, "override")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = table_peak(name, precision, tf32=torch.backends.cuda.matmul.allow_tf32)
        if flops is None:
            log.warning("no peak FLOP/s known for %s (%s): set perf.peak_tflops to log MFU", name, precision)
            return None
        return Peak(flops, f"table: {name} {precision}")
    if device.type == "cpu" and precision in ("fp32", "bf16"):
        # bf16: native on CPUs with AMX or AVX512-BF16 (here 3-8x fp32), converted elsewhere;
        # the measurement is that CPU's own, either way
        threads, dtype = torch.get_num_threads(), torch.float32 if precision == "fp32" else torch.bfloat16
        flops = measure_matmul_flops(dtype=dtype)
        return Peak(flops, f"measured: 2048x2048 {precision} matmul, {threads} threads")
    return None  # fp16 on the CPU: DeepSpeed does not train in it there


# ---------------------------------------------------------------------------- hardware FLOPs


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one Transformer block (the difference the model's count makes per layer)."""
    one, two = (num_params(dataclasses.replace(cfg, n_layer=n)) for n in (1, 2))
    return two - one


def recomputed_blocks(cfg: ModelConfig) -> float:
    """How many blocks' forward matmuls activation checkpointing runs a second time in backward.

    full: every block. every_n: blocks 0, n, 2n, ... (as GPT._checkpoints_block picks them).
    selective: none, because its policy saves the outputs of every matmul and of attention and
    recomputes only elementwise ops (norms, activations, rope), which FLOP counts ignore anyway.
    """
    if cfg.act_ckpt == "full":
        return cfg.n_layer
    if cfg.act_ckpt == "every_n":
        return -(-cfg.n_layer // cfg.act_ckpt_every)
    return 0


def hardware_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """FLOPs per token the device executes: flops_per_token plus one more forward of each recomputed block.

    A block's forward costs 2 * P_block (a multiply-add per weight) + 4 * H * Q * T (q@k^T and
    att@v over T keys). With full checkpointing of a model whose parameters sit almost all in its
    blocks this gives ~8N + 16LHQT instead of 6N + 12LHQT: the familiar HFU = 4/3 MFU. The
    embedding and lm_head are outside the checkpointed blocks and never recomputed.
    """
    per_block = 2 * block_params(cfg) + 4 * cfg.n_head * cfg.head_dim * seq_len
    return flops_per_token(cfg, seq_len) + int(recomputed_blocks(cfg) * per_block)


# ---------------------------------------------------------------------------- memory and engine readings


def peak_rss_gb() -> float:
    """This process's peak resident memory since it started (the kernel's high-water mark), GiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def memory_stats(device: torch.device) -> dict[str, float]:
    """Process RSS, plus on CUDA the peak allocated/reserved since the last call (which resets it)."""
    import psutil

    out = {"rss_gb": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    if device.type == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["cuda_max_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)  # so each log window reports its own peak
    return out


def loss_scale(engine: Any) -> float | None:
    """fp16's current dynamic loss scale (DeepSpeed keeps it in its optimizer wrapper), else None."""
    opt = getattr(engine, "optimizer", None)
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, (int, float)) or torch.is_tensor(value):
            return float(value)
    return None


# ---------------------------------------------------------------------------- the meter


class _DeviceClock:
    """Marks of the device's timeline: CUDA events (no host sync until read) or the host clock."""

    def __init__(self, device: torch.device, clock: Callable[[], float]) -> None:
        self.cuda = device.type == "cuda"
        self.clock = clock

    def mark(self) -> Any:
        if not self.cuda:
            return self.clock()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()  # at log steps only: the loss read there syncs anyway
        return start.elapsed_time(end) / 1000


@dataclass
class PerfMeter:
    """Tokens/s, MFU/HFU and the step-time split over the window since the last log, and the ETA.

    The loop calls ``data_done`` when the batch is in hand, ``optimizer_start`` just before the
    last ``engine.step()`` of a step (DeepSpeed runs the optimizer inside it) and ``step_done``
    after it; ``add_checkpoint`` with each save's seconds; ``report`` at each log step.
    """

    tokens_per_step: int
    world_size: int = 1
    flops_per_token: int = 0
    hw_flops_per_token: int = 0
    peak: Peak | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self) -> None:
        self._dev = _DeviceClock(self.device, self.clock)
        self._warned_peak = False
        self._reset()

    def _reset(self) -> None:
        self.window_start = self.clock()
        self.steps, self.data_s, self.checkpoint_s = 0, 0.0, 0.0
        self._spans: list[tuple[Any, Any, Any]] = []  # (compute start, optimizer start, step end)
        self._step_start: float | None = None
        self._compute_start: Any = None
        self._opt_start: Any = None

    def step_start(self) -> None:
        self._step_start = self.clock()

    def data_done(self) -> None:
        if self._step_start is not None:
            self.data_s += self.clock() - self._step_start
        self._compute_start = self._dev.mark()

    def optimizer_start(self) -> None:
        self._opt_start = self._dev.mark()

    def step_done(self) -> None:
        self.steps += 1
        if self._compute_start is not None and self._opt_start is not None:
            self._spans.append((self._compute_start, self._opt_start, self._dev.mark()))
        self._compute_start = self._opt_start = self._step_start = None

    def add_checkpoint(self, seconds: float) -> None:
        self.checkpoint_s += seconds

    def report(self, steps_left: int) -> dict[str, float]:
        """Per-step means over the window (seconds), rates, utilisation; then a new window starts."""
        elapsed = max(self.clock() - self.window_start, 1e-9)
        n = max(self.steps, 1)
        fwd_bwd = sum(self._dev.seconds(a, b) for a, b, _ in self._spans)
        opt = sum(self._dev.seconds(b, c) for _, b, c in self._spans)
        tokens_per_s = self.steps * self.tokens_per_step / elapsed
        per_device = tokens_per_s / self.world_size
        step_time = elapsed / n
        split = {"data_s": self.data_s / n, "fwd_bwd_s": fwd_bwd / n, "optimizer_s": opt / n}
        split["checkpoint_s"] = self.checkpoint_s / n
        out = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device, "step_time_s": step_time}
        out |= split | {"other_s": max(step_time - sum(split.values()), 0.0)}  # eval, logging, ...
        out |= {"data_wait_frac": self.data_s / elapsed, "eta_s": steps_left * step_time}
        if self.peak is not None and self.flops_per_token:
            out["mfu"] = per_device * self.flops_per_token / self.peak.flops
            out["hfu"] = per_device * (self.hw_flops_per_token or self.flops_per_token) / self.peak.flops
            if out["hfu"] > 1 and not self._warned_peak:
                self._warned_peak = True  # a wrong peak is a config problem: say it once, not every log
                log.warning(
                    "HFU %.0f%% > 100%%: the peak (%.3g TFLOP/s, %s) is too low for this device: "
                    "set perf.peak_tflops",
                    100 * out["hfu"],
                    self.peak.flops / 1e12,
                    self.peak.source,
                )
        self._reset()
        return out

    def describe(self) -> dict[str, Any]:
        """What the utilisation figures rest on (one `perf` event at the start of the run)."""
        return {
            "peak_tflops": self.peak.flops / 1e12 if self.peak else None,
            "peak_source": self.peak.source if self.peak else "unknown: no MFU",
            "flops_per_token": self.flops_per_token,
            "hw_flops_per_token": self.hw_flops_per_token,
        }


def build_meter(
    model_cfg: ModelConfig,
    seq_len: int,
    tokens_per_step: int,
    world_size: int,
    device: torch.device,
    peak: Peak | None,
) -> PerfMeter:
    """The run's meter: FLOPs per token from the model config, against ``peak`` (see ``device_peak``)."""
    return PerfMeter(
        tokens_per_step=tokens_per_step,
        world_size=world_size,
        flops_per_token=flops_per_token(model_cfg, seq_len),
        hw_flops_per_token=hardware_flops_per_token(model_cfg, seq_len),
        peak=peak,
        device=device,
    )
