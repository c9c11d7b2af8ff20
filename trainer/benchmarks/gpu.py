"""Benchmark: the trainer's step on a CUDA GPU, over the configurations that matter there.

    python -m trainer.benchmarks.gpu [--steps 30] [--warmup 10] [--models tiny gpt2-small] [overrides ...]
    torchrun --nproc_per_node 8 -m trainer.benchmarks.gpu            # the same per rank, ZeRO over 8

For each model (default: tiny, gpt2-small), ZeRO stage (1, 3) and torch.compile (off, on), in
bf16, it trains `--warmup` + `--steps` steps of the trainer's own step (DeepSpeed engine, the
per-step guard, fused AdamW, flash attention through scaled_dot_product_attention) on the
built-in corpus and prints tokens/s (all ranks), MFU against the GPU's bf16 peak (trainer/perf.py's
table, or perf.peak_tflops=) and the peak memory allocated per GPU. Each configuration runs in a
process of its own, so one's memory or compiled graphs never flatter the next.

Without CUDA it exits with code 2 and one line saying so: the CPU figures are
trainer.benchmarks.train_throughput's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

GRID = [(zero, compiled) for zero in (1, 3) for compiled in (False, True)]


def configurations(models: list[str]) -> list[list[str]]:
    """Hydra overrides of every configuration the benchmark runs, in order."""
    return [
        [f"model={m}", f"engine=zero{zero}", "engine.precision=bf16", f"model.compile={str(c).lower()}"]
        for m in models
        for zero, c in GRID
    ]


def measure(overrides: list[str], steps: int, warmup: int) -> dict:
    """Train warmup + steps steps of one configuration in this process; tokens/s, MFU, memory."""
    import tempfile
    from pathlib import Path

    from trainer.distributed import init_distributed
    from trainer.guard import StepControl
    from trainer.loop import build_run, train_step
    from trainer.model import flops_per_token
    from trainer.signals import StopSignal
    from trainer.train import load_config

    # One run dir for all ranks of this torchrun (nothing is saved in it: no resume, no checkpoints).
    run_dir = Path(tempfile.gettempdir()) / f"gpu-bench-{os.environ.get('MASTER_PORT', os.getpid())}"
    run_dir.mkdir(exist_ok=True)
    run_args = [f"run_dir={run_dir}", "checkpoint.resume=none", f"max_steps={steps + warmup}"]
    cfg = load_config([*overrides, *run_args])
    dist = init_distributed()
    # As `trainer.train` builds it: micro_batch_size resolved, ZeRO-3 partitioned, compiled if asked.
    run = build_run(cfg, dist)
    cfg, engine, data, model_cfg = run.cfg, run.engine, run.data, run.engine.module.cfg
    compile_s = 0.0
    engine.train()
    control = StepControl(cfg.guard, dist, StopSignal(), save_every_s=0)
    batches = iter(data.train)
    torch.cuda.reset_peak_memory_stats(dist.device)
    for i in range(steps + warmup):
        if i == warmup:
            torch.cuda.synchronize(dist.device)
            start = time.perf_counter()
        t0 = time.perf_counter()
        control.step = i + 1
        train_step(engine, next(batches), cfg.micro_batch_size, dist.device, control)
        if i == 0 and cfg.model.compile:
            torch.cuda.synchronize(dist.device)
            compile_s = time.perf_counter() - t0
    torch.cuda.synchronize(dist.device)
    tokens_per_s = steps * cfg.tokens_per_step() / (time.perf_counter() - start)
    peak = run.peak
    per_device = tokens_per_s / dist.world_size
    mfu = per_device * flops_per_token(model_cfg, cfg.data.seq_len) / peak.flops if peak else None
    return {
        "config": " ".join(overrides),
        "ranks": dist.world_size,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_mem_gb": torch.cuda.max_memory_allocated(dist.device) / 2**30,
        "compile_s": compile_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation among them)")
    p.add_argument("--models", nargs="+", default=["tiny", "gpt2-small"])
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one configuration
    p.add_argument("overrides", nargs="*", help="Hydra overrides added to every configuration")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device: trainer.benchmarks.gpu needs a GPU (the CPU figures are "
              "trainer.benchmarks.train_throughput's)", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    os.environ.setdefault("WORLD_SIZE", "1")
    if args.one:
        result = measure(args.overrides, args.steps, args.warmup)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun each rank's child joins one group
    say = print if main_rank else (lambda *a, **k: None)
    say(f"{'configuration':<72} {'tokens/s':>12} {'MFU':>7} {'peak mem':>10} {'compile':>8}")
    for overrides in configurations(args.models):
        cmd = [sys.executable, "-m", "trainer.benchmarks.gpu", "--one", f"--steps={args.steps}",
               f"--warmup={args.warmup}", *overrides, *args.overrides]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        name = " ".join(overrides)
        if proc.returncode or (main_rank and not lines):
            say(f"{name:<72} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        if not main_rank:
            continue
        r = json.loads(lines[-1][len("RESULT ") :])
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        compile_s = f"{r['compile_s']:.0f} s" if r["compile_s"] else "-"
        say(f"{name:<72} {r['tokens_per_s']:>12,.0f} {mfu:>7} {r['peak_mem_gb']:>7.2f} GB {compile_s:>8}")


if __name__ == "__main__":
    main()
