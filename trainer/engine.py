"""The one seam to DeepSpeed: the DeepSpeed config is generated here from the typed config.

There is no hand-maintained DeepSpeed JSON beside the Hydra config; raw DeepSpeed keys a
user needs go through ``engine.ds_config`` and are merged last.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from trainer import hostmem
from trainer.config import EngineConfig, ModelConfig, OptimConfig
from trainer.model import GPT, Block, optimizer_groups


def deepspeed_config(
    engine: EngineConfig,
    optim: OptimConfig,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    total_steps: int,
    model: ModelConfig | None = None,
    device_type: str = "cpu",
) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (batch sizes, ZeRO, precision, AdamW, schedule).

    ``model``: ZeRO-3's buffers are sized to it (``zero3_buffers``); without it, DeepSpeed's defaults.
    ``device_type``: where the optimizer runs (``DistInfo.device.type``), which picks its kernel.
    """
    ds: dict[str, Any] = {
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": 0.0 if clips_in_trainer(engine) else optim.grad_clip,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_optimization": _zero_section(engine, model, device_type, world_size),
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {
            "enabled": engine.precision == "fp16",
            "loss_scale": engine.loss_scale,
            "initial_scale_power": engine.initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,  # per-group values from optimizer_groups win
            }
            | adamw_kernel(engine, device_type),
        },
    }
    return _deep_merge(ds, engine.ds_config)


def adamw_kernel(engine: EngineConfig, device_type: str) -> dict[str, Any]:
    """Which AdamW implementation DeepSpeed builds, as its optimizer params.

    ZeRO-Offload steps on the CPU: DeepSpeed's CPU Adam (``torch_adam`` off). Otherwise torch's
    AdamW with its fused kernel where torch has one (CUDA, CPU): one pass over each tensor instead
    of a dozen elementwise ops, and no host sync. Measured on 2 CPU cores for the 0.89M model's
    step: 1.7 ms against 4.6 ms (per-parameter tensors, ZeRO-0), 0.9 against 4.9 ms (one flat
    tensor, ZeRO >= 1). Elsewhere torch's default. DeepSpeed's own FusedAdam would need its CUDA
    extension built at first use (a DS_BUILD_OPS=0 install); torch's kernel needs nothing built.
    """
    if engine.offload_optimizer:
        return {"torch_adam": False}
    if device_type in FUSED_ADAMW_DEVICES:
        return {"torch_adam": True, "fused": True}
    return {"torch_adam": True}


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # where torch.optim.AdamW(fused=True) has a kernel


def clips_in_trainer(engine: EngineConfig) -> bool:
    """ZeRO-0 in fp32 is DeepSpeed's plain path: it clips but throws the norm away, so there the
    trainer clips (``GradClip``) and DeepSpeed is told not to. Every other path reports its norm."""
    return engine.zero_stage == 0 and engine.precision == "fp32"


def _zero_section(
    engine: EngineConfig, model: ModelConfig | None, device_type: str, world_size: int
) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    if engine.zero_stage >= 1:
        overlap = overlaps_comm(engine.zero_stage, device_type)
        zero |= {
            "overlap_comm": overlap,
            "contiguous_gradients": contiguous_gradients(engine.zero_stage, device_type),
        }
    if engine.zero_stage == 3:
        zero["leaf_module"] = {"classes": [ZERO3_UNIT]}
        zero["reduce_scatter"] = zero3_reduce_scatter(world_size)
        zero |= zero3_buffers(model) if model is not None else {}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return zero


# ZeRO-3 gathers and releases a Transformer block's parameters as one unit (a DeepSpeed "leaf
# module"), as FSDP wraps per block, instead of hooking each of its Linear and norm modules: the
# same collectives in bigger pieces, and ~90 fewer Python hooks per step at 4 blocks. Measured on
# the default model, one rank: 0.85 of the plain loop per module, 0.93 per block; losses identical.
ZERO3_UNIT = f"{Block.__module__}.{Block.__qualname__}"


def overlaps_comm(zero_stage: int, device_type: str) -> bool:
    """Whether ZeRO reduces gradients on a side stream while backward goes on (``overlap_comm``).

    ZeRO-2/3 on an accelerator: yes, that is where their communication hides. On the CPU there
    are no streams to overlap on, and the option only adds its double-buffered bucket copies:
    measured on the default model, one rank, ZeRO-2: 0.95 of the plain loop with it, 1.0 without.
    """
    return zero_stage >= 2 and device_type != "cpu"


def zero3_reduce_scatter(world_size: int) -> bool:
    """Whether ZeRO-3 reduces each gradient bucket with a reduce-scatter (``reduce_scatter``).

    With more than one data-parallel rank, yes: each rank receives only its partition, half the
    traffic of an all-reduce. With one there is nothing to scatter, but DeepSpeed's reduce-scatter
    path still concatenates the bucket's gradients into a new buffer and reduces it to itself;
    its all-reduce path reduces the contiguous bucket where it is (a no-op at one rank) and
    slices the partitions out of it. Measured on the default model, one rank, 2 threads: 0.889
    of the plain loop with the reduce-scatter, 0.913 without, in the same hour. The same
    gradients (tests/unit/test_engine_config.py). ZeRO-1/2 measured no difference: DeepSpeed's default.
    """
    return world_size > 1


def contiguous_gradients(zero_stage: int, device_type: str) -> bool:
    """Whether ZeRO copies each gradient into its reduce bucket as backward produces it.

    On an accelerator that keeps the allocator from fragmenting (DeepSpeed's recommendation).
    At ZeRO-1/2 on the CPU it is a Python hook and a copy per parameter, then another copy into
    the partition; without it DeepSpeed flattens the gradients once when it reduces them.
    Measured on the default model, one rank, 1 thread, CPU clock: ZeRO-1 0.97 of the plain loop
    with it, 1.00 without; ZeRO-2 0.974 against 0.986. ZeRO-3 keeps it (no difference measured).
    """
    return zero_stage == 3 or device_type != "cpu"


def zero3_buffers(model: ModelConfig) -> dict[str, int]:
    """ZeRO-3's bucket sizes and gathering limits (in elements), scaled to the model.

    DeepSpeed's defaults are sized for billions of parameters on a GPU: a 5e8-element reduce
    bucket (2 GB in fp32, allocated in full on every rank) and up to 1e9 gathered parameters
    kept live. Scaled to one d_model x d_model matrix (transformers' DeepSpeed integration's
    rule for the first three), a bucket holds a few of a block's matrices and at most about two
    blocks' parameters stay gathered, and the optimizer steps two blocks' worth at a time (its
    temporaries): a fixed cost per rank whatever the world size, at least 2^20 elements. Small
    parameters (norms, biases: up to 1e5 elements, or 10 x d_model) stay whole on every rank, as
    they are cheaper to keep than to gather (a lower threshold gathered a tiny model's matrices
    at every layer: half again as many collectives per step). ``engine.ds_config`` overrides these.
    """
    d2 = model.d_model * model.d_model
    block = 12 * d2  # about one Transformer block's parameters (attention 4 D^2, MLP 8 D^2)
    floor = 2**20  # smaller ones cost a small model more in collectives and bookkeeping than they save
    return {
        "reduce_bucket_size": max(floor, d2),
        "stage3_prefetch_bucket_size": max(floor, int(0.9 * d2)),
        "stage3_param_persistence_threshold": max(100_000, 10 * model.d_model),  # 1e5: DeepSpeed's
        "stage3_max_live_parameters": max(floor, 2 * block),
        "stage3_max_reuse_distance": max(floor, 2 * block),
        "sub_group_size": max(floor, 2 * block),
    }


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, cosine to a floor.

    Not DeepSpeed's WarmupCosineLR: that one applies lr=0 on the first two steps.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))  # last step: floor
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_model(cfg: ModelConfig, ds_config: dict[str, Any]) -> GPT:
    """The GPT for this DeepSpeed config: whole, or under ZeRO-3 partitioned as it is built.

    ZeRO-3 builds it inside ``deepspeed.zero.Init``: each module's parameters are split over the
    ranks as soon as the module exists, so no rank ever holds the whole model. The weights are
    then drawn one parameter at a time from the same CPU generator stream as ``GPT(cfg)`` (the
    same initial weights for the same seed), and each rank keeps its own partition of them.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        return GPT(cfg)
    import deepspeed

    # The constructors' own draws go to the device's generator: forked away, replayed on the CPU.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = GPT(cfg, init_weights=False)
    model.init_weights(_assign_partition, replay_module_init=True)
    return model


def _assign_partition(p: torch.nn.Parameter, values: torch.Tensor) -> None:
    """Write this rank's slice of a ZeRO-3 parameter's full ``values``: DeepSpeed's layout, the
    flattened parameter cut into equal partitions in rank order (the last one padded). Nothing
    is gathered: every rank drew the same values. A parameter that is held whole just now (or
    not partitioned) goes through DeepSpeed's own GatheredParameters."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if getattr(p, "ds_status", None) != ZeroParamStatus.NOT_AVAILABLE:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.copy_(values)
        return
    part = p.ds_tensor
    start = part.numel() * torch.distributed.get_rank(group=p.ds_process_group)
    n = max(0, min(part.numel(), values.numel() - start))
    part.narrow(0, 0, n).copy_(values.reshape(-1).narrow(0, start, n))


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], optim: OptimConfig, total_steps: int):
    """Wrap the model in a DeepSpeed engine; returns the engine (optimizer and LR schedule inside)."""
    import deepspeed

    _collectives_in_place_on_gloo()
    factor = functools.partial(
        lr_factor, warmup_steps=optim.warmup_steps, total_steps=total_steps, min_ratio=optim.min_lr_ratio
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=optimizer_groups(model, optim.weight_decay),
        # A callable, so the schedule wraps DeepSpeed's own (possibly ZeRO-partitioned) optimizer;
        # DeepSpeed steps it at each accumulation boundary and saves it in checkpoints.
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        config=ds_config,
    )
    _share_zero3_master_weights(engine.optimizer)
    _share_zero12_master_weights(engine.optimizer)
    _release_zero3_grads_between_steps(engine.optimizer)
    if engine.zero_optimization_stage() == 3:
        _zero3_grad_norm_in_one_call(engine.optimizer)
    if engine.zero_optimization_stage() in (1, 2) and engine.dp_world_size == 1:
        _zero12_no_allreduce_on_one_rank(engine.optimizer)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # ZeRO-0 all-reduces every gradient after backward (flatten, all_reduce, copy back)
        # even with one data-parallel rank, where the average is the gradient itself: ~4% of
        # the nanoGPT recipe's step. More ranks: DeepSpeed's path as it is.
        engine.enable_backward_allreduce = False
    return engine


def _collectives_in_place_on_gloo() -> None:
    """On gloo, DeepSpeed's all-gathers and reduce-scatters work in their tensors' own memory.

    gloo's ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` each stage the whole
    (world-size) tensor in a buffer of their own, so every call briefly holds it twice: for
    gpt2-medium's tied embedding (51M elements) 0.19 GiB more, for each of ZeRO-3's three
    gathers of it a step and for its gradient's reduce-scatter, which come at the step's
    high-water marks. Done as one broadcast from, or one reduce to, each rank's chunk instead,
    they need nothing beside their tensors, and give the same values: a gather copies bytes,
    and each chunk's sum is gloo's reduction of the same inputs. Other backends (nccl) do these
    in place already and are left alone.
    """
    import deepspeed.comm.comm as ds_comm

    backend = ds_comm.cdb
    if backend is None or not torch.distributed.is_initialized() or torch.distributed.get_backend() != "gloo":
        return
    # Replaced only where DeepSpeed found torch's own (it then calls them with these arguments).
    if backend.all_gather_function is not None:
        backend.all_gather_function = _all_gather_by_broadcasts
    if backend.reduce_scatter_function is not None:
        backend.reduce_scatter_function = _reduce_scatter_by_reduces


def _all_gather_by_broadcasts(
    output_tensor: torch.Tensor, input_tensor: torch.Tensor, group=None, async_op=False
):
    """``all_gather_into_tensor``: output [world x n] (contiguous) gets each rank's input [n] in
    rank order, through no buffer of its own."""
    dist = torch.distributed
    world, rank, n = dist.get_world_size(group), dist.get_rank(group), input_tensor.numel()
    out = output_tensor.view(-1)
    mine = out.narrow(0, rank * n, n)
    if mine.data_ptr() != input_tensor.data_ptr():
        mine.copy_(input_tensor.reshape(-1))
    works = [
        dist.broadcast(out.narrow(0, r * n, n), group_src=r, group=group, async_op=True) for r in range(world)
    ]
    return _Works(works).returned(async_op)


def _reduce_scatter_by_reduces(output_tensor: torch.Tensor, input_tensor: torch.Tensor, op=None, group=None,
                               async_op=False):  # fmt: skip
    """``reduce_scatter_tensor``: output [n] gets the reduction over ranks of chunk ``rank`` of
    input [world x n] (contiguous), through no buffer of its own. The input's other chunks are
    gloo's scratch afterwards (DeepSpeed's only caller, ZeRO-3's gradient reduce-scatter,
    reads nothing but the output and then frees the gradient)."""
    dist = torch.distributed
    op = dist.ReduceOp.SUM if op is None else op
    world, rank, n = dist.get_world_size(group), dist.get_rank(group), output_tensor.numel()
    flat = input_tensor.view(-1)
    works = [
        dist.reduce(flat.narrow(0, r * n, n), group_dst=r, op=op, group=group, async_op=True)
        for r in range(world)
    ]
    mine = flat.narrow(0, rank * n, n)
    then = None if mine.data_ptr() == output_tensor.data_ptr() else lambda: output_tensor.view(-1).copy_(mine)
    return _Works(works, then).returned(async_op)


@dataclass
class _Works:
    """Several collectives' works waited as one (what DeepSpeed waits on), then ``then``."""

    works: list
    then: Callable[[], Any] | None = None

    def wait(self, timeout=None) -> bool:
        for work in self.works:
            work.wait()
        if self.then is not None:
            self.then()
            self.then = None
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)

    def returned(self, async_op: bool):
        if async_op:
            return self
        self.wait()
        return None


def _share_zero3_master_weights(optimizer) -> None:
    """Let ZeRO-3's fp32 master partition be the module's own partition when both are fp32.

    DeepSpeed 0.19 means to skip the master copy when the partitioned params already have the
    master dtype and device (stage3.py `_create_fp32_partitions`), but compares
    `tensor.device == "cpu"` (a torch.device against a str: False), so on CPU it keeps a second
    fp32 copy, 4 B/param more. Sharing the storage is exactly its intended path: the optimizer
    updates the master in place and the copy back to the partition becomes a self-copy.
    """
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    partitions = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    if not masters or not partitions or getattr(optimizer, "offload_optimizer", False):
        return  # offloaded masters live where DeepSpeed's offload path wants them
    for master, part in zip(masters, partitions):
        if part is not None:
            _share_storage(master, part)


def _share_zero12_master_weights(optimizer) -> None:
    """ZeRO-1/2 in fp32: the optimizer's fp32 partition is this rank's slice of the module's own
    flat weights, not a clone of it.

    DeepSpeed clones the slice as its master copy whatever the dtype, then copies the updated
    master back into the module after every step. In fp32 the two hold the same values at all
    times, so the clone is 4 B x params / world of memory and a copy per step for nothing; shared,
    the optimizer updates the module's weights in place and the copy back is a self-copy. The
    same values, step for step (tests/unit/test_engine_config.py), and checkpoints as before.
    """
    masters = getattr(optimizer, "single_partition_of_fp32_groups", None)
    partitions = getattr(optimizer, "parallel_partitioned_bit16_groups", None)
    if not masters or not partitions or getattr(optimizer, "cpu_offload", False):
        return  # offloaded masters live on the host, apart from the module by design
    shared = False
    for i, master in enumerate(masters):
        part = partitions[i][torch.distributed.get_rank(group=optimizer.real_dp_process_group[i])]
        shared |= _share_storage(master, part)
    if shared:  # each parameter's view into the master (universal checkpoints load through them)
        optimizer._link_all_hp_params()


def _share_storage(master: torch.Tensor, part: torch.Tensor) -> bool:
    """Make ``master`` use ``part``'s memory where both hold the same dtype, device and size
    (then they always hold the same values); returns whether it did."""
    if (
        master.dtype == part.dtype
        and master.device == part.device
        and master.numel() == part.numel()
        and master.data_ptr() != part.data_ptr()
    ):
        master.data = part.data
        return True
    return False


def _release_zero3_grads_between_steps(optimizer) -> None:
    """Give the pages of ZeRO-3's gradient partition back to the OS after each optimizer step.

    The flat fp32 gradient partition (4 B x params / world) is dead from the end of a step until
    the next backward writes it: its first micro-step copies each reduced gradient in (DeepSpeed
    accumulates into it only on later micro-steps of the same step). Held resident, it sits
    under the next forward and the start of its backward, the step's high-water mark (gathered
    tied embedding, its full gradient, activations). Released, its pages come back zero-filled
    as the backward writes them, layer by layer, the embedding's last. Costs one page fault per
    4 KiB of partition per step: gpt2-medium on 2 ranks 0.17 M, ~0.2 s at the ~1.4 us a fault
    measured on this machine, of a 14-16 s step here.
    """
    buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if (
        not torch.is_tensor(buffer)
        or buffer.device.type != "cpu"
        or getattr(optimizer, "offload_optimizer", False)
    ):
        return
    step = optimizer.step

    @functools.wraps(step)
    def step_then_release(*args, **kwargs):
        out = step(*args, **kwargs)
        hostmem.release_pages(buffer)
        return out

    optimizer.step = step_then_release


def _zero3_grad_norm_in_one_call(optimizer) -> None:
    """ZeRO-3's gradient norm (for clipping) from one foreach call instead of a Python loop.

    DeepSpeed's ``get_grad_norm_direct`` converts each gradient partition to its norm dtype
    (fp64 on the CPU: a copy of every gradient) and takes its norm, one tensor at a time, with a
    few Python calls each. ``torch._foreach_norm`` takes every norm in the same dtype in one
    call, without the copies; the sum of squares, the all-reduce over the partition group and the
    -1 for a non-finite norm are DeepSpeed's own. Measured on the default model, one rank, 2
    threads: 0.896-0.898 of the plain loop with DeepSpeed's loop, 0.908-0.917 with this. Taken
    only where that loop is this sum: the 2-norm, no model parallelism, no expert-parallel
    groups; otherwise (and with ZeRO-Offload, which has a path of its own) DeepSpeed's.
    """
    direct = getattr(optimizer, "get_grad_norm_direct", None)
    partition_group = getattr(optimizer, "_get_param_partition_group", None)
    expert_group = getattr(optimizer, "_autoep_expert_parallel_group", lambda params: None)
    if (
        direct is None
        or partition_group is None
        or getattr(optimizer, "model_parallel_group", "unknown") is not None
        or getattr(optimizer, "offload_optimizer", False)
    ):
        return
    import deepspeed.comm as ds_dist

    try:
        from deepspeed.runtime.zero.utils import get_norm_dtype
    except ImportError:
        return

    def grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0 or not gradients or expert_group(params) is not None:
            return direct(gradients, params, norm_type)
        dtype = get_norm_dtype()
        norms = torch._foreach_norm(gradients, 2.0, dtype=dtype)  # each gradient's 2-norm, in dtype
        total = torch.sum(torch.pow(torch.stack(norms), 2.0))
        ds_dist.all_reduce(total, op=ds_dist.ReduceOp.SUM, group=partition_group(params[0]))
        total = total**0.5
        return torch.where(total.isinf() | total.isnan(), torch.tensor(-1.0, device=total.device), total)

    optimizer.get_grad_norm_direct = grad_norm_direct


def _zero12_no_allreduce_on_one_rank(optimizer) -> None:
    """ZeRO-1/2 on one data-parallel rank: no flatten, all-reduce and copy back of the gradients.

    After backward DeepSpeed all-reduces the gradients in flat chunks (``allreduce_and_copy``:
    concatenate, divide by the world size, all-reduce, copy each slice back), as ZeRO-0 does
    (skipped on one rank in ``build_engine``). On one rank, with the gradients already in the
    communication dtype, that is the identity: x / 1.0 is x and the sum over one rank is its
    input. Measured on the default model, ZeRO-1, 2 threads: backward 1.4 ms shorter (of ~55),
    the whole step 0.975-0.978 of the plain loop -> 0.982-0.985. Where it is not the identity (a
    dtype cast, a partition buffer to fill, sequence parallelism, overlapped communication's
    bookkeeping) DeepSpeed's own runs.
    """
    reduce_and_copy = getattr(optimizer, "allreduce_and_copy", None)
    if (
        reduce_and_copy is None
        or getattr(optimizer, "overlap_comm", True)
        or getattr(optimizer, "sequence_parallel_size", 1) != 1
    ):
        return

    def allreduce_and_copy(  # DeepSpeed's signature, so that every caller's arguments land the same
        small_bucket, communication_data_type, rank=None, log=None, divide=True, process_group=None,
        output_bucket=None,
    ):  # fmt: skip
        if all(t.dtype == communication_data_type for t in small_bucket) and all(
            out is None for out in output_bucket or ()
        ):
            return  # the average over one rank of its own gradients: the gradients as they are
        return reduce_and_copy(
            small_bucket, communication_data_type, rank=rank, log=log, divide=divide,
            process_group=process_group, output_bucket=output_bucket,
        )  # fmt: skip

    optimizer.allreduce_and_copy = allreduce_and_copy


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])


@dataclass
class GradClip:
    """Clip the (already all-reduced) gradients to ``max_norm`` just before the optimizer step and
    keep the norm; ``max_norm`` 0 measures without clipping. Used where ``clips_in_trainer``."""

    max_norm: float
    norm: torch.Tensor | None = None  # a tensor: read at log steps only, no host sync per step

    def __call__(self, engine: Any) -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        if self.max_norm > 0:
            self.norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        else:  # measure only: leave the gradients as they are (an inf norm would scale them to NaN)
            self.norm = torch.nn.utils.get_total_norm([p.grad for p in params])


def grad_norm(engine: Any, clip: GradClip | None = None) -> float | None:
    """The global gradient norm of the last step, before clipping: ours where we clip, else DeepSpeed's."""
    norm = clip.norm if clip is not None else engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
