"""The devices a run can be planned for: memory, peak FLOP/s, a stated MFU range, interconnect and
checkpoint write bandwidth (trainer/planner.py uses them). GPU figures are stated, from data sheets
and published runs; the CPU's are this machine's: its RAM and a measured matmul peak."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from trainer.config import ConfigError, PlanConfig
from trainer.perf import table_peak

GiB = 2**30


@dataclass(frozen=True)
class DeviceSpec:
    """What a plan needs to know of a device; the GPU figures are stated, not measured here."""

    key: str
    description: str
    memory: int  # bytes per device; cpu: the node's RAM, shared by its ranks
    peak_flops: dict[str, float]  # by precision (fp32 | bf16 | fp16)
    mfu: tuple[float, float]  # the fraction of peak a good run reaches: (low, high)
    intra_bw: float  # bytes/s per rank within a node (collective bus bandwidth)
    inter_bw: float  # bytes/s per rank between nodes
    write_bw: float  # checkpoint write bytes/s per node
    reserved: int = 0  # bytes per rank beyond tensors: CUDA context, NCCL and cuBLAS workspaces

    @property
    def is_cpu(self) -> bool:
        return self.key == "cpu"


def _gpu(key: str, description: str, gib: float, table: str, intra: float, inter: float) -> DeviceSpec:
    peaks = {p: table_peak(table, p) or 0.0 for p in ("fp32", "bf16", "fp16")}
    # (0.35, 0.50): torchtitan's ~5,760 tokens/s per H100 for Llama-3-8B (~35%), llm-foundry's ~46% (MPT-7B)
    return DeviceSpec(key, description, int(gib * GiB), peaks, (0.35, 0.50), intra, inter, 2e9, GiB)


# intra: NCCL all-reduce bus bandwidth over NVLink (H100: 450 GB/s a direction, ~80% reached; A100:
# 300 GB/s); inter: one 400 Gb/s (H100, NDR) or 200 Gb/s (A100, HDR) InfiniBand port per GPU, ~90%.
# memory: what torch reports as total_memory for the 80 GB / 40 GB parts.
KNOWN_DEVICES: dict[str, DeviceSpec] = {
    d.key: d
    for d in (
        _gpu("h100-sxm", "NVIDIA H100 SXM 80GB", 79.6, "H100", 360e9, 45e9),
        _gpu("h100-pcie", "NVIDIA H100 PCIe 80GB", 79.6, "H100 PCIe", 50e9, 22e9),
        _gpu("a100-80gb", "NVIDIA A100 SXM 80GB", 79.3, "A100", 230e9, 22e9),
        _gpu("a100-40gb", "NVIDIA A100 SXM 40GB", 39.6, "A100", 230e9, 22e9),
    )
}
KNOWN_NAMES = ("auto", *KNOWN_DEVICES, "cpu")


def cpu_device() -> DeviceSpec:
    """This machine's CPU: its RAM and a measured fp32 matmul peak (bf16 is emulated: no peak)."""
    import psutil

    from trainer.perf import measure_matmul_flops

    # gloo over shared memory; write: a local disk. Rough figures: CPU runs are for checking.
    peaks = {"fp32": measure_matmul_flops(), "bf16": 0.0, "fp16": 0.0}
    return DeviceSpec(
        "cpu",
        "CPU (host RAM shared by the ranks of a node)",
        psutil.virtual_memory().total,
        peaks,
        (0.25, 0.5),
        2e9,
        1e9,
        0.5e9,
    )


def cluster(cfg: PlanConfig) -> tuple[DeviceSpec, int, int]:
    """(device, ranks per node, nodes): plan.* where set, else this launch's (torchrun's env)."""
    device = device_spec(cfg.device)
    if cfg.mfu:
        device = dataclasses.replace(device, mfu=(cfg.mfu[0], cfg.mfu[1]))
    if cfg.write_gbps:
        device = dataclasses.replace(device, write_bw=cfg.write_gbps * 1e9)
    per_node = cfg.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    nodes = cfg.nodes or max(1, int(os.environ.get("WORLD_SIZE", str(per_node))) // per_node)
    return device, per_node, nodes


def device_spec(name: str) -> DeviceSpec:
    """A device by its plan.device name; ``auto`` is the device this process sees."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return cpu_device()
    if name == "auto":
        real = torch.cuda.get_device_name()
        like = next((d for k, d in KNOWN_DEVICES.items() if k.split("-")[0] in real.lower()), None)
        base = like or _gpu("gpu", real, 0, real, 100e9, 12e9)
        peaks = {p: table_peak(real, p) or 0.0 for p in ("fp32", "bf16", "fp16")}
        memory = torch.cuda.get_device_properties(0).total_memory
        return dataclasses.replace(base, key=base.key, description=real, memory=memory, peak_flops=peaks)
    if name not in KNOWN_DEVICES:
        raise ConfigError(f"plan.device={name!r} is not a known device: use one of {', '.join(KNOWN_NAMES)}")
    return KNOWN_DEVICES[name]
