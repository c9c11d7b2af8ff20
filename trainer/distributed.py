"""Who this process is in the run. One small object travels instead of module globals."""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cpu_group: Any = None  # a gloo group for small host-side agreements (signals, timers)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Join the process group torchrun (or SLURM via torchrun) set up; a lone process is rank 0 of 1.

    DeepSpeed picks the backend for the accelerator it finds: nccl on GPUs, gloo on CPU.
    """
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    accel = deepspeed.get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():  # several runs in one process (a local sweep) share one group
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            _init_on_fresh_store_prefix(accel.communication_backend_name(), timeout)
        from trainer.metrics import stdout_to_log

        with stdout_to_log("DeepSpeed.stdout"):  # it prints that its shm op was built, on every start
            deepspeed.init_distributed(timeout=timeout)  # adopts a group that already exists
        atexit.register(_destroy)
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    # Flags agreed every step must not wait on the GPU stream: on nccl they go through gloo.
    cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, cpu_group)


def _destroy() -> None:
    if dist.is_initialized():  # an entry point may have destroyed it already (eval does)
        dist.destroy_process_group()


def any_rank(flags: list[bool], dist_info: DistInfo) -> list[bool]:
    """For each flag: is it set on any rank? One small host-side collective for all of them."""
    if dist_info.world_size == 1:
        return flags
    t = torch.tensor(flags, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dist_info.cpu_group)
    return [bool(v) for v in t.tolist()]


def max_over_ranks(values: list[float], dist_info: DistInfo) -> list[float]:
    """Each value's maximum over all ranks (one small host-side collective for all of them)."""
    if dist_info.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dist_info.cpu_group)
    return t.tolist()


def gather_to_main(obj: Any, dist_info: DistInfo) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere). For rare events only."""
    if dist_info.world_size == 1:
        return [obj]
    out = [None] * dist_info.world_size if dist_info.is_main else None
    dist.gather_object(obj, out, dst=0, group=dist_info.cpu_group)
    return out


def _init_on_fresh_store_prefix(backend: str, timeout: datetime.timedelta) -> None:
    """Start the process group on a key prefix of torchrun's store that no earlier attempt used.

    After `torchrun --max-restarts` restarts the workers, they reuse the agent's store, where
    the dead attempt's rendezvous keys still sit: the new group reads the old peers' addresses
    and fails to connect (pytorch/pytorch#167288). A per-attempt prefix avoids them. The attempt
    is counted in the store itself, since TORCHELASTIC_RESTART_COUNT can differ across nodes.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timeout)  # fmt: skip
    attempt = (store.add("trainer/joined", 1) - 1) // world
    prefixed = dist.PrefixStore(f"trainer/attempt-{attempt}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: list[float]) -> list[float]:
    """Average a few floats over all ranks (one collective for all of them)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
