"""Benchmark: peak host memory per rank of a 2-rank gpt2-medium run, ZeRO-3 against its prediction.

    python -m trainer.benchmarks.memory [--steps 2] [--engines zero3 zero1 zero2 zero3-offload]

Runs, one after another (never two at once: each takes gigabytes),

    torchrun --nproc_per_node 2 -m trainer.train model=gpt2-medium model.max_seq_len=128
        engine=<engine> global_batch_size=2 micro_batch_size=1 max_steps=<steps>

and reads the worst rank's peak resident memory from the run's metrics: ``build_peak_rss_gb`` of
the ``perf`` event (data, model, engine: everything before the first step) and ``peak_rss_gb``
of the last ``train`` event. Each rank reads its own kernel high-water mark
(``getrusage(RUSAGE_SELF).ru_maxrss``, exact, no sampling), and the trainer takes the maximum
over ranks. The reference, measured in the same run: the peak of a rank that imported torch and
DeepSpeed, joined the process group and built nothing (``--baseline``, also 2 ranks).

The prediction for ZeRO-3: 16 bytes x params / world size (fp32 weights, gradients and Adam's
two moments, partitioned) over that baseline; the target is the measured peak <= baseline +
1.25 x that. ZeRO-1/2 keep whole fp32 weights and gradients on every rank (8 bytes x params) and
partition the optimizer state (8 x params / world); printed beside for comparison.
zero3-offload runs in fp32 here (bf16 matmuls are hundreds of times slower on these CPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

WORLD = 2
RUN = ["model=gpt2-medium", "model.max_seq_len=128", "global_batch_size=2", "micro_batch_size=1",
       "log_every=1", "eval_every=0", "checkpoint.save_final=false", "checkpoint.every_steps=0"]  # fmt: skip
EXTRA = {"zero3-offload": ["engine.precision=fp32"]}
GB = 2**30


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def baseline(out_dir: Path) -> None:
    """One rank of the reference: torch and DeepSpeed imported, process group joined, nothing built."""
    import deepspeed  # noqa: F401
    import torch  # noqa: F401

    from trainer.distributed import barrier, init_distributed
    from trainer.perf import peak_rss_gb

    dist = init_distributed()
    barrier()
    (out_dir / f"baseline-{dist.rank}.json").write_text(json.dumps({"peak_rss_gb": peak_rss_gb()}))


def measure_baseline(work: Path) -> float:
    proc = torchrun(["-m", "trainer.benchmarks.memory", "--baseline", str(work)], work)
    if proc.returncode != 0:
        raise SystemExit(f"baseline failed:\n{proc.stderr[-3000:]}")
    return max(json.loads((work / f"baseline-{r}.json").read_text())["peak_rss_gb"] for r in range(WORLD))


def measure_run(engine: str, steps: int, work: Path) -> dict:
    run_dir = work / engine
    args = ["-m", "trainer.train", *RUN, f"engine={engine}", *EXTRA.get(engine, []), f"max_steps={steps}",
            f"run_dir={run_dir}"]  # fmt: skip
    t0 = time.perf_counter()
    proc = torchrun(args, work)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200], "seconds": seconds}
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (perf,) = [e for e in events if e["event"] == "perf"]
    train = [e for e in events if e["event"] == "train"]
    return {"build": perf["build_peak_rss_gb"], "steps": train[-1]["peak_rss_gb"], "seconds": seconds}


def num_params() -> int:
    from trainer.model import num_params as count
    from trainer.train import load_config

    return count(load_config(RUN).model)


def predicted_state_gb(engine: str, params: int) -> float:
    """Training state per rank: ZeRO-3 partitions all 16 B/param; ZeRO-1/2 only the optimizer's 8."""
    if engine.startswith("zero3"):
        return 16 * params / WORLD / GB
    return (8 * params + 8 * params / WORLD) / GB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--engines", nargs="+", default=["zero3", "zero1", "zero2", "zero3-offload"])
    p.add_argument("--baseline", type=Path, help=argparse.SUPPRESS)  # internal: one reference rank
    args = p.parse_args()
    if args.baseline:
        return baseline(args.baseline)
    params = num_params()
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        work = Path(tmp)
        base = measure_baseline(work)
        print(f"gpt2-medium, seq 128, {params:,} params, {WORLD} ranks, {args.steps} steps; baseline "
              f"(torch + DeepSpeed imported, nothing built): {base:.2f} GiB per rank")  # fmt: skip
        head = ("engine", "state/rank", "bound", "build", "steps", "peak/bound", "time")
        print("{:14} {:>10} {:>8} {:>8} {:>8} {:>10} {:>6}".format(*head))
        for engine in args.engines:
            free = psutil.virtual_memory().available / GB
            state = predicted_state_gb(engine, params)
            bound = base + 1.25 * state
            if free < WORLD * bound:  # the machine may be shared: an OOM kill would take other work along
                print(f"{engine:14} skipped: {free:.1f} GiB available, needs about {WORLD * bound:.0f}")
                continue
            r = measure_run(engine, args.steps, work)
            if "error" in r:
                print(f"{engine:14} failed after {r['seconds']:.0f} s: {r['error']}")
                continue
            peak = max(r["build"], r["steps"])
            print(f"{engine:14} {state:9.2f}G {bound:7.2f}G {r['build']:7.2f}G {r['steps']:7.2f}G "
                  f"{peak / bound:10.2f} {r['seconds']:5.0f}s", flush=True)  # fmt: skip
        print("GiB; state/rank: the predicted training state (ZeRO-3: 16 B x params / ranks); bound: "
              "baseline + 1.25 x state;\nbuild, steps: the worst rank's peak RSS before the first step, "
              "and by the last step")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
