"""Benchmark: the trainer's step through DeepSpeed against a minimal hand-written PyTorch loop.

    python -m trainer.benchmarks.train_throughput [--steps 40] [--repeats 5] [--clock cpu] [overrides]

Both train the same model from the same initial weights on the same batches (taken from the
built-in corpus up front, so data loading is not part of either figure) with the same AdamW,
schedule, clipping and micro-batching. The two alternate, `--repeats` times each, so machine
noise hits both alike, after one discarded round of each; the figure is the median tokens/s of
each and their ratio (targets: ZeRO-1 >= 0.98, ZeRO-2 >= 0.95, ZeRO-3 >= 0.90; with
``model.compile=true`` the trainer compiles its model and should beat the eager plain loop).

On a loaded machine wall time swings several-fold between rounds; ``--threads 1 --clock cpu``
times each loop by this process's CPU time instead, which other processes barely move.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch

from trainer.config import TrainConfig
from trainer.data.batch import to_device
from trainer.data.build import build_data
from trainer.distributed import DistInfo, barrier, init_distributed
from trainer.engine import GradClip, build_engine, clips_in_trainer, deepspeed_config, lr_factor
from trainer.guard import StepControl
from trainer.loop import compile_model, resolve_vocab, train_step
from trainer.model import GPT, num_params, optimizer_groups
from trainer.signals import StopSignal
from trainer.train import load_config


def plain_loop(
    cfg: TrainConfig, model: torch.nn.Module, batches: list[dict], warmup: int, clock=time.perf_counter
) -> float:
    """The reference: what one writes by hand for the same training step. Returns tokens/s."""
    opt = torch.optim.AdamW(
        optimizer_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
    )
    factor = functools.partial(
        lr_factor,
        warmup_steps=cfg.optim.warmup_steps,
        total_steps=len(batches),
        min_ratio=cfg.optim.min_lr_ratio,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    micro = cfg.micro_batch(1)
    device = next(model.parameters()).device
    for i, batch in enumerate(batches):
        if i == warmup:
            start = clock()
        tokens = batch["tokens"]  # [G/W, T + 1]: as the trainer's step, widened per micro-batch
        accum = tokens.shape[0] // micro
        for j in range(0, tokens.shape[0], micro):
            _, loss = model(*to_device(tokens[j : j + micro], device))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return (len(batches) - warmup) * cfg.tokens_per_step() / (clock() - start)


def trainer_loop(
    cfg: TrainConfig,
    model: torch.nn.Module,
    batches: list[dict],
    warmup: int,
    dist: DistInfo,
    clock=time.perf_counter,
) -> float:
    """The trainer's own step function on a DeepSpeed engine built from the same config, with the
    per-step agreement (loss guard, stop and save flags) that `fit` runs."""
    ds_cfg = deepspeed_config(
        cfg.engine,
        cfg.optim,
        micro_batch_size=cfg.micro_batch(1),
        grad_accum_steps=cfg.grad_accum_steps(1),
        world_size=1,
        total_steps=len(batches),
    )
    engine = build_engine(model, ds_cfg, cfg.optim, len(batches))
    if cfg.model.compile:
        compile_model(engine)
    engine.train()
    control = StepControl(cfg.guard, dist, StopSignal(), save_every_s=0)  # the per-step checks, as in fit
    clip = GradClip(cfg.optim.grad_clip) if clips_in_trainer(cfg.engine) else None  # ZeRO-0 fp32, as in fit
    before_optimizer = functools.partial(clip, engine) if clip is not None else None
    for i, batch in enumerate(batches):
        if i == warmup:
            start = clock()
        control.step = i + 1
        loss = train_step(engine, batch, cfg.micro_batch(1), dist.device, control, before_optimizer)
    loss.item()  # wait for the last step on an accelerator
    return (len(batches) - warmup) * cfg.tokens_per_step() / (clock() - start)


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

    plain, ours = [], []
    # One discarded round first: the first loop in a process pays for allocator and thread warm-up.
    plain_loop(cfg, fresh_model(), batches[: args.warmup + 5], args.warmup, clock)
    trainer_loop(cfg, fresh_model(), batches[: args.warmup + 5], args.warmup, dist, clock)
    for _ in range(args.repeats):
        plain.append(plain_loop(cfg, fresh_model(), batches, args.warmup, clock))
        ours.append(trainer_loop(cfg, fresh_model(), batches, args.warmup, dist, clock))
    p_med, o_med = statistics.median(plain), statistics.median(ours)
    m = cfg.model
    print(
        f"model: {m.n_layer} layers x d_model {m.d_model}, {num_params(model_cfg):,} params | "
        f"ZeRO-{cfg.engine.zero_stage} {cfg.engine.precision} | {cfg.tokens_per_step()} tokens/step | "
        f"{torch.get_num_threads()} threads on {dist.device} | {args.clock} clock"
        + (" | compiled" if cfg.model.compile else "")
    )
    print(f"plain PyTorch loop : {p_med:10,.0f} tokens/s  (runs: {', '.join(f'{v:,.0f}' for v in plain)})")
    print(f"trainer (DeepSpeed): {o_med:10,.0f} tokens/s  (runs: {', '.join(f'{v:,.0f}' for v in ours)})")
    target = {1: 0.98, 2: 0.95, 3: 0.90}.get(cfg.engine.zero_stage, 1.0)
    target = 1.0 if cfg.model.compile else target  # compiled: ahead of the eager plain loop
    print(f"ratio trainer/plain: {o_med / p_med:.3f}  (target >= {target})")


if __name__ == "__main__":
    main()
