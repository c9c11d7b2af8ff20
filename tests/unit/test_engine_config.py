"""The generated DeepSpeed config, and the LR schedule DeepSpeed builds from it."""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from trainer.config import EngineConfig, OptimConfig
from trainer.engine import GradClip, clips_in_trainer, deepspeed_config, lr_factor


def _ds(engine: EngineConfig, optim: OptimConfig | None = None, **kw) -> dict:
    args = {"micro_batch_size": 4, "grad_accum_steps": 2, "world_size": 2, "total_steps": 100} | kw
    return deepspeed_config(engine, optim or OptimConfig(), **args)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_batch_sizes_and_stage(stage):
    ds = _ds(EngineConfig(zero_stage=stage))
    assert ds["train_batch_size"] == 4 * 2 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_precision_flags():
    assert _ds(EngineConfig(precision="bf16"))["bf16"]["enabled"]
    fp16 = _ds(EngineConfig(precision="fp16", initial_scale_power=12))["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0 and fp16["initial_scale_power"] == 12
    fp32 = _ds(EngineConfig())
    assert not fp32["bf16"]["enabled"] and not fp32["fp16"]["enabled"]


def test_offload_uses_deepspeed_cpu_adam():
    ds = _ds(EngineConfig(zero_stage=3, offload_optimizer=True, offload_params=True))
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["torch_adam"] is False


def test_optimizer_and_clipping_follow_optim_section():
    optim = OptimConfig(lr=2e-4, betas=[0.8, 0.9], weight_decay=0.05, grad_clip=0.5)
    ds = _ds(EngineConfig(), optim)
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW"
    assert (params["lr"], params["betas"], params["weight_decay"]) == (2e-4, [0.8, 0.9], 0.05)
    assert ds["gradient_clipping"] == 0.0  # ZeRO-0 fp32: the trainer clips (and keeps the norm)
    assert clips_in_trainer(EngineConfig()) and not clips_in_trainer(EngineConfig(precision="bf16"))
    for engine in (EngineConfig(zero_stage=1), EngineConfig(precision="bf16")):
        assert _ds(engine, optim)["gradient_clipping"] == 0.5 and not clips_in_trainer(engine)


def test_raw_deepspeed_keys_merge_last_and_deep():
    engine = EngineConfig(zero_stage=2, ds_config={"zero_optimization": {"reduce_bucket_size": 123}, "x": 1})
    ds = _ds(engine)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123
    assert ds["zero_optimization"]["stage"] == 2  # sibling keys survive the merge
    assert ds["x"] == 1
    assert "reduce_bucket_size" not in _ds(EngineConfig(zero_stage=2))["zero_optimization"]


def _lrs(optim: OptimConfig, total: int) -> list[float]:
    """The lr applied at each optimizer step by the schedule build_engine installs."""
    factor = partial(
        lr_factor, warmup_steps=optim.warmup_steps, total_steps=total, min_ratio=optim.min_lr_ratio
    )
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedule_warms_up_then_decays_to_the_floor():
    optim = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = _lrs(optim, 100)
    assert lrs[0] == pytest.approx(1e-3 / 11), "the first step already learns"
    warm = lrs[:11]
    assert all(a < b for a, b in zip(warm, warm[1:])), "warmup must increase"
    assert lrs[10] == pytest.approx(1e-3)
    decay = lrs[10:]
    assert all(a >= b for a, b in zip(decay, decay[1:])), "cosine must not increase"
    assert min(decay) >= 1e-4 - 1e-12
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-9), "the last step trains at the floor"
    assert lrs[55] == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi * 45 / 89)) / 2)


def test_schedule_holds_the_floor_past_the_end():
    optim = OptimConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=0.2)
    lrs = _lrs(optim, 80)
    assert lrs[0] == pytest.approx(1e-3), "no warmup: start at the peak"
    factor = lr_factor(500, warmup_steps=0, total_steps=80, min_ratio=0.2)
    assert factor == pytest.approx(0.2)


def test_grad_clip_clips_or_only_measures():
    engine = SimpleNamespace(module=torch.nn.Linear(3, 2))
    for p in engine.module.parameters():
        p.grad = torch.full_like(p, 2.0)
    clip = GradClip(max_norm=1.0)
    clip(engine)
    assert float(clip.norm) == pytest.approx(2.0 * math.sqrt(8))  # the norm before clipping
    assert float(
        torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters()])
    ) == pytest.approx(1.0)
    engine.module.weight.grad[0, 0] = math.inf
    measure = GradClip(max_norm=0.0)  # 0: no clipping, gradients untouched even at an inf norm
    measure(engine)
    assert math.isinf(float(measure.norm)) and not engine.module.bias.grad.isnan().any()


def test_zero3_buffers_follow_the_model_and_stay_overridable():
    from trainer.config import ModelConfig
    from trainer.engine import zero3_buffers

    small, big = ModelConfig(d_model=64, vocab_size=300), ModelConfig(d_model=1024, n_head=16, vocab_size=300)
    zero = _ds(EngineConfig(zero_stage=3), model=big)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1024**2 and zero["stage3_max_live_parameters"] == 24 * 1024**2
    assert all(zero[k] == v for k, v in zero3_buffers(big).items())
    scaled = ("stage3_max_live_parameters", "sub_group_size")  # (small: at their 2^20 floor)
    assert all(zero3_buffers(small)[k] < zero3_buffers(big)[k] for k in scaled)  # they scale with d_model
    assert "reduce_bucket_size" not in _ds(EngineConfig(zero_stage=2), model=big)["zero_optimization"]
    assert "sub_group_size" not in _ds(EngineConfig(zero_stage=3))["zero_optimization"]  # DeepSpeed's
    raw = {"zero_optimization": {"reduce_bucket_size": 5e8, "sub_group_size": 7}}
    zero = _ds(EngineConfig(zero_stage=3, ds_config=raw), model=big)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 5e8 and zero["sub_group_size"] == 7  # engine.ds_config wins
    assert zero["stage3_prefetch_bucket_size"] == zero3_buffers(big)["stage3_prefetch_bucket_size"]


@pytest.mark.parametrize(
    "engine, device, expected",
    [
        (EngineConfig(zero_stage=1), "cuda", {"torch_adam": True, "fused": True}),
        (EngineConfig(zero_stage=3, precision="bf16"), "cuda", {"torch_adam": True, "fused": True}),
        (EngineConfig(zero_stage=0), "cpu", {"torch_adam": True, "fused": True}),
        (EngineConfig(zero_stage=2), "mps", {"torch_adam": True}),  # no fused kernel: torch's default
        (EngineConfig(zero_stage=2, offload_optimizer=True), "cuda", {"torch_adam": False}),  # CPU Adam
    ],
)
def test_adamw_kernel_selection(engine, device, expected):
    params = _ds(engine, device_type=device)["optimizer"]["params"]
    assert {k: params[k] for k in ("torch_adam", "fused") if k in params} == expected


@pytest.mark.parametrize(
    "stage, device, expected",
    [(1, "cuda", False), (2, "cuda", True), (3, "cuda", True), (2, "cpu", False), (3, "cpu", False)],
)
def test_overlap_comm_only_where_there_are_streams(stage, device, expected):
    zero = _ds(EngineConfig(zero_stage=stage), device_type=device)["zero_optimization"]
    assert zero["overlap_comm"] is expected


@pytest.mark.parametrize(
    "stage, device, expected",
    [
        (1, "cuda", True),
        (2, "cuda", True),
        (3, "cuda", True),
        (1, "cpu", False),
        (2, "cpu", False),
        (3, "cpu", True),
    ],
)
def test_contiguous_gradients_except_zero12_on_cpu(stage, device, expected):
    zero = _ds(EngineConfig(zero_stage=stage), device_type=device)["zero_optimization"]
    assert zero["contiguous_gradients"] is expected


@pytest.mark.parametrize("stage, world, expected", [(3, 1, False), (3, 2, True), (3, 16, True)])
def test_zero3_reduce_scatters_only_across_ranks(stage, world, expected):
    zero = _ds(EngineConfig(zero_stage=stage), world_size=world)["zero_optimization"]
    assert zero["reduce_scatter"] is expected


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_keep_deepspeeds_reduce_scatter_default(stage):
    assert "reduce_scatter" not in _ds(EngineConfig(zero_stage=stage), world_size=1)["zero_optimization"]


def test_zero3_gathers_a_block_at_a_time():
    from trainer.model import GPT, Block, ModelConfig

    assert "leaf_module" not in _ds(EngineConfig(zero_stage=2))["zero_optimization"]
    (unit,) = _ds(EngineConfig(zero_stage=3))["zero_optimization"]["leaf_module"]["classes"]
    from deepspeed.utils import set_z3_leaf_modules

    # the name DeepSpeed will look for matches the model's blocks, and nothing else
    model = GPT(ModelConfig(n_layer=3, d_model=32, n_head=2, vocab_size=64))
    leaves = set_z3_leaf_modules(model, [unit])
    assert len(leaves) == 3 and all(isinstance(m, Block) for m in leaves)


_BUILD_ADAMW = """
import os, sys, torch
os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
from trainer.config import EngineConfig, ModelConfig, OptimConfig
from trainer.engine import build_engine, deepspeed_config
from trainer.model import GPT
for stage in (0, 1):
    ds = deepspeed_config(EngineConfig(zero_stage=stage), OptimConfig(), micro_batch_size=2,
                          grad_accum_steps=1, world_size=1, total_steps=10, device_type="cpu")
    model = GPT(ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64))
    engine = build_engine(model, ds, OptimConfig(), 10)
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO's wrapper holds torch's AdamW
    print("OPT", stage, type(opt).__name__, opt.defaults.get("fused"))
    print("ALLREDUCE", stage, engine.enable_backward_allreduce)
# One rank at ZeRO-0 skips the gradient all-reduce: the same weights as with it after 3 steps
weights = []
for allreduce in (True, False):
    torch.manual_seed(0)
    ds = deepspeed_config(EngineConfig(zero_stage=0), OptimConfig(), micro_batch_size=2,
                          grad_accum_steps=1, world_size=1, total_steps=10, device_type="cpu")
    model = GPT(ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64))
    engine = build_engine(model, ds, OptimConfig(), 10)
    engine.enable_backward_allreduce = allreduce
    for _ in range(3):
        _, loss = engine(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
        engine.backward(loss)
        engine.step()
    weights.append(torch.cat([p.detach().flatten() for p in engine.module.parameters()]))
print("SAME", torch.equal(*weights))
# ZeRO-1/2 in fp32: the optimizer's master is the module's own flat weights; the same training
import trainer.engine as E
for stage in (1, 2):
    weights = []
    for share in (E._share_zero12_master_weights, lambda optimizer: None):
        E_share, E._share_zero12_master_weights = E._share_zero12_master_weights, share
        torch.manual_seed(0)
        ds = deepspeed_config(EngineConfig(zero_stage=stage), OptimConfig(), micro_batch_size=2,
                              grad_accum_steps=2, world_size=1, total_steps=10, device_type="cpu")
        engine = build_engine(GPT(ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64)), ds,
                              OptimConfig(), 10)
        E._share_zero12_master_weights = E_share
        opt = engine.optimizer
        master, part = opt.single_partition_of_fp32_groups[0], opt.parallel_partitioned_bit16_groups[0][0]
        shared = master.data_ptr() == part.data_ptr()
        for _ in range(6):
            _, loss = engine(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
            engine.backward(loss)
            engine.step()
        weights.append((shared, torch.cat([p.detach().flatten() for p in engine.module.parameters()])))
    print("MASTER", stage, weights[0][0], weights[1][0], torch.equal(weights[0][1], weights[1][1]))
# ZeRO-3 on one rank all-reduces its gradient buckets where they are instead of reduce-scattering
# them: the same weights and gradient norms after 6 steps (2 micro-batches each) as with the scatter
import deepspeed
from trainer.engine import build_model
runs = []
for scatter in (True, False):
    torch.manual_seed(0)
    ds = deepspeed_config(EngineConfig(zero_stage=3), OptimConfig(), micro_batch_size=2,
                          grad_accum_steps=2, world_size=1, total_steps=10, device_type="cpu")
    chosen, ds["zero_optimization"]["reduce_scatter"] = ds["zero_optimization"]["reduce_scatter"], scatter
    mcfg = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64)
    engine = build_engine(build_model(mcfg, ds), ds, OptimConfig(), 10)
    norms = []
    for _ in range(12):
        _, loss = engine(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm() or 0.0))
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        runs.append((torch.cat([p.detach().flatten() for p in params]), norms))
print("Z3SCATTER", chosen, torch.equal(runs[0][0], runs[1][0]), runs[0][1] == runs[1][1], runs[0][1][-1] > 0)
# ZeRO-3's gradient norm in one foreach call: DeepSpeed's per-tensor loop's norms and weights, bitwise,
# with clipping at work (max norm 0.05, below every norm here) and in bf16
for precision in ("fp32", "bf16"):
    runs = []
    for one_call in (E._zero3_grad_norm_in_one_call, lambda optimizer: None):
        E_norm, E._zero3_grad_norm_in_one_call = E._zero3_grad_norm_in_one_call, one_call
        torch.manual_seed(0)
        optim = OptimConfig(grad_clip=0.05)
        ds = deepspeed_config(EngineConfig(zero_stage=3, precision=precision), optim, micro_batch_size=2,
                              grad_accum_steps=1, world_size=1, total_steps=10, device_type="cpu")
        engine = build_engine(build_model(mcfg, ds), ds, optim, 10)
        E._zero3_grad_norm_in_one_call = E_norm
        patched = "get_grad_norm_direct" in vars(engine.optimizer)
        norms = []
        for _ in range(6):
            _, loss = engine(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
            engine.backward(loss)
            engine.step()
            norms.append(float(engine.get_global_grad_norm()))
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            runs.append((patched, torch.cat([p.detach().float().flatten() for p in params]), norms))
    (ours, w1, n1), (theirs, w2, n2) = runs
    print("Z3NORM", precision, ours, theirs, n1 == n2 and min(n1) > 0.05, torch.equal(w1, w2))
# ZeRO-1/2 on one rank skip DeepSpeed's flatten, all-reduce and copy back of the gradients: the
# same norms and weights bitwise (with accumulation and clipping at work), fp32 and bf16; and no
# all-reduce of a gradient bucket happens at all
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
allreduce_bucket, bucket_calls = DeepSpeedZeroOptimizer.allreduce_bucket, []
def counted(self, *args, **kwargs):
    bucket_calls.append(1)
    return allreduce_bucket(self, *args, **kwargs)
DeepSpeedZeroOptimizer.allreduce_bucket = counted
for stage, precision in ((1, "fp32"), (2, "fp32"), (1, "bf16")):
    runs = []
    for skip in (E._zero12_no_allreduce_on_one_rank, lambda optimizer: None):
        E_skip, E._zero12_no_allreduce_on_one_rank = E._zero12_no_allreduce_on_one_rank, skip
        torch.manual_seed(0)
        optim = OptimConfig(grad_clip=0.05)
        ds = deepspeed_config(EngineConfig(zero_stage=stage, precision=precision), optim, micro_batch_size=2,
                              grad_accum_steps=2, world_size=1, total_steps=10, device_type="cpu")
        engine = build_engine(GPT(mcfg), ds, optim, 10)
        E._zero12_no_allreduce_on_one_rank = E_skip
        patched = "allreduce_and_copy" in vars(engine.optimizer)
        norms, bucket_calls[:] = [], []
        for _ in range(12):
            _, loss = engine(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
            engine.backward(loss)
            engine.step()
            norms.append(float(engine.get_global_grad_norm() or 0.0))
        weights = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
        runs.append((patched, len(bucket_calls), weights, norms))
    (ours, calls1, w1, n1), (theirs, calls2, w2, n2) = runs
    skipped = calls1 == 0 and calls2 > 0  # every all-reduce DeepSpeed would have run, and none ran
    same = n1 == n2 and max(n1) > 0.05 and torch.equal(w1, w2)
    print("Z12SKIP", stage, precision, ours, theirs, skipped, same)
"""


def test_deepspeed_builds_torchs_fused_adamw_from_the_config():
    """The `fused` key reaches torch.optim.AdamW through DeepSpeed, at ZeRO-0 (DeepSpeed steps it
    directly) and ZeRO-1 (its wrapper does); one rank at ZeRO-0 skips the all-reduce and trains
    the same weights; so do ZeRO-3 on one rank without its reduce-scatter and ZeRO-1/2 on one
    rank without their all-reduce, and ZeRO-3's one-call gradient norm. In a process of its own:
    DeepSpeed starts a process group."""
    import subprocess
    import sys

    from tests.launch_helpers import free_port

    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_ADAMW, str(free_port())], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "OPT 0 AdamW True" in lines and "OPT 1 AdamW True" in lines, proc.stdout
    assert "ALLREDUCE 0 False" in lines and "ALLREDUCE 1 True" in lines, proc.stdout
    assert any(line.startswith("SAME True") for line in lines), proc.stdout
    assert "MASTER 1 True False True" in lines and "MASTER 2 True False True" in lines, proc.stdout
    assert "Z3SCATTER False True True True" in lines, proc.stdout
    for precision in ("fp32", "bf16"):
        assert f"Z3NORM {precision} True False True True" in lines, proc.stdout
    for case in ("1 fp32", "2 fp32", "1 bf16"):
        assert f"Z12SKIP {case} True False True True" in lines, proc.stdout
