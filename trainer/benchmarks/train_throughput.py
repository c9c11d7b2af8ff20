"""Benchmark: the trainer's step through DeepSpeed against a minimal hand-written PyTorch loop.

    python -m trainer.benchmarks.train_throughput [--steps 40] [--repeats 5] [--clock cpu] [overrides]

Both train the same model from the same initial weights on the same batches (taken from the
built-in corpus up front, so data loading is not part of either figure) with the same AdamW,
schedule, clipping and micro-batching; the trainer's engine is built as the trainer builds it.
They alternate step by step, so machine noise hits both alike, over ``--repeats`` rounds of fresh
models after one discarded round; the figure is each one's tokens/s at its median step time, and
their ratio (targets: ZeRO-1 >= 0.98, ZeRO-2 >= 0.95, ZeRO-3 >= 0.90; with
``model.compile=true`` the trainer compiles its model and should beat the eager plain loop).

On a loaded machine wall time swings several-fold; ``--threads 1 --clock cpu`` times each step
by this process's CPU time instead, which other processes move far less.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from typing import Callable

import torch

from trainer import hostmem
from trainer.config import ModelConfig, TrainConfig
from trainer.data.batch import to_device
from trainer.data.build import build_data
from trainer.distributed import DistInfo, barrier, init_distributed
from trainer.engine import (
    GradClip,
    build_engine,
    build_model,
    clips_in_trainer,
    deepspeed_config,
    lr_factor,
)
from trainer.guard import StepControl
from trainer.loop import compile_model, resolve_vocab, train_step
from trainer.model import GPT, num_params, optimizer_groups
from trainer.signals import StopSignal
from trainer.train import load_config


def plain_stepper(cfg: TrainConfig, model: torch.nn.Module, total_steps: int) -> Callable[[dict], None]:
    """The reference: what one writes by hand for the same training step."""
    opt = torch.optim.AdamW(
        optimizer_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
    )
    factor = functools.partial(
        lr_factor,
        warmup_steps=cfg.optim.warmup_steps,
        total_steps=total_steps,
        min_ratio=cfg.optim.min_lr_ratio,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    micro = cfg.micro_batch(1)
    device = next(model.parameters()).device

    def step(batch: dict) -> None:
        tokens = batch["tokens"]  # [G/W, T + 1]: as the trainer's step, widened per micro-batch
        accum = tokens.shape[0] // micro
        for j in range(0, tokens.shape[0], micro):
            _, loss = model(*to_device(tokens[j : j + micro], device))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # wait for the step on an accelerator

    return step


def trainer_stepper(
    cfg: TrainConfig, model_cfg: ModelConfig, total_steps: int, dist: DistInfo
) -> Callable[[dict], None]:
    """The trainer's own step function on a DeepSpeed engine built as the trainer builds it (ZeRO-3:
    partitioned from construction; the same initial weights for the seed), with the per-step
    agreement (loss guard, stop and save flags) that `fit` runs."""
    ds_cfg = deepspeed_config(
        cfg.engine,
        cfg.optim,
        micro_batch_size=cfg.micro_batch(1),
        grad_accum_steps=cfg.grad_accum_steps(1),
        world_size=1,
        total_steps=total_steps,
        model=model_cfg,
        device_type=dist.device.type,
    )
    torch.manual_seed(cfg.seed)
    engine = build_engine(build_model(model_cfg, ds_cfg), ds_cfg, cfg.optim, total_steps)
    if cfg.model.compile:
        compile_model(engine)
    engine.train()
    control = StepControl(cfg.guard, dist, StopSignal(), save_every_s=0)  # the per-step checks, as in fit
    clip = GradClip(cfg.optim.grad_clip) if clips_in_trainer(cfg.engine) else None  # ZeRO-0 fp32, as in fit
    before_optimizer = functools.partial(clip, engine) if clip is not None else None

    def step(batch: dict) -> None:
        control.step += 1
        loss = train_step(engine, batch, cfg.micro_batch(1), dist.device, control, before_optimizer)
        loss.item()  # wait for the step on an accelerator

    return step


def timed_round(
    steppers: list[Callable[[dict], None]], batches: list[dict], warmup: int, clock
) -> list[list[float]]:
    """Step each stepper on every batch, alternating step by step; each one's step times after
    ``warmup`` steps. Alternating steps (not whole runs) puts both under the same machine noise."""
    times: list[list[float]] = [[] for _ in steppers]
    for i, batch in enumerate(batches):
        for stepper, out in zip(steppers, times):
            t0 = clock()
            stepper(batch)
            if i >= warmup:
                out.append(clock() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: this process's CPU time")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny engine=zero2")
    args = p.parse_args()
    os.environ.setdefault("WORLD_SIZE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cfg = load_config(args.overrides)
    # the trainer's allocator setting (trainer.loop.build_run), for both loops
    hostmem.release_large_frees(hostmem.mmap_threshold(cfg.model.d_model))
    dist = init_distributed()
    data = build_data(cfg.data, cfg.global_batch_size, dist.rank, dist.world_size, dist.local_rank, barrier)
    model_cfg = resolve_vocab(cfg.model, data.vocab_size)
    it = iter(data.train)
    batches = [next(it) for _ in range(args.warmup + args.steps)]
    torch.manual_seed(cfg.seed)
    init_state = GPT(model_cfg).state_dict()

    def fresh_model() -> torch.nn.Module:
        model = GPT(model_cfg)
        model.load_state_dict(init_state)
        return model.to(dist.device)

    plain_times: list[float] = []
    ours_times: list[float] = []
    # One discarded round first: the first steps in a process pay for allocator and thread warm-up.
    for r, n in enumerate([args.warmup + 5] + [len(batches)] * args.repeats):
        steppers = [plain_stepper(cfg, fresh_model(), n), trainer_stepper(cfg, model_cfg, n, dist)]
        plain_round, ours_round = timed_round(steppers, batches[:n], args.warmup, clock)
        if r > 0:
            plain_times += plain_round
            ours_times += ours_round
    tokens = cfg.tokens_per_step()
    p_med, o_med = tokens / statistics.median(plain_times), tokens / statistics.median(ours_times)
    m = cfg.model
    print(
        f"model: {m.n_layer} layers x d_model {m.d_model}, {num_params(model_cfg):,} params | "
        f"ZeRO-{cfg.engine.zero_stage} {cfg.engine.precision} | {cfg.tokens_per_step()} tokens/step | "
        f"{torch.get_num_threads()} threads on {dist.device} | {args.clock} clock"
        + (" | compiled" if cfg.model.compile else "")
    )
    for name, med, times in (
        ("plain PyTorch loop ", p_med, plain_times),
        ("trainer (DeepSpeed)", o_med, ours_times),
    ):
        quartiles = statistics.quantiles(times, n=4)
        spread = f"step time quartiles {quartiles[0] * 1e3:.1f} / {quartiles[2] * 1e3:.1f} ms"
        print(f"{name}: {med:10,.0f} tokens/s at the median step ({len(times)} steps; {spread})")
    target = {1: 0.98, 2: 0.95, 3: 0.90}.get(cfg.engine.zero_stage, 1.0)
    target = 1.0 if cfg.model.compile else target  # compiled: ahead of the eager plain loop
    print(f"ratio trainer/plain: {o_med / p_med:.3f}  (target >= {target})")


if __name__ == "__main__":
    main()
