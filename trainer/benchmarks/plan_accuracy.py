"""Benchmark: the planner's memory per rank against the peak RSS measured in real CPU runs.

    python -m trainer.benchmarks.plan_accuracy [--steps 3] [--cases zero0/none zero2/full ...]

Each case is a 2-rank torchrun of ``trainer.train`` on a ~36M-parameter GPT (d_model 512, 10
layers, vocab 8192: the model dominates the process), fp32, micro-batch 2 x 128. The trainer
itself plans the run at start (baseline: its RSS before the model) and logs a ``plan_check`` event
with every rank's ``ru_maxrss`` at the end; this prints the two side by side, with the error of
the worst rank (target: within 15%), and the checkpoint's size on disk against the plan's.
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

MODEL = [
    "model.d_model=512",
    "model.n_layer=10",
    "model.n_head=8",
    "model.vocab_size=8192",
    "model.max_seq_len=128",
]
RUN = ["global_batch_size=4", "micro_batch_size=2", "eval_every=0", "log_every=1", "checkpoint.keep_last=1"]
ENGINES = {
    "zero0": ["engine=zero0"],
    "zero1": ["engine=zero1"],
    "zero2": ["engine=zero2"],
    "zero3": ["engine=zero3"],
    "zero3-offload": ["engine=zero3-offload", "engine.precision=fp32"],  # every case in fp32
}
CASES = [f"{e}/{a}" for e in ENGINES for a in ("none", "full")]
TOLERANCE = 0.15


def run_case(
    case: str, work: Path, steps: int, data_dir: Path, env: dict[str, str] | None = None, timeout: int = 1200
) -> dict:
    """One 2-rank run; returns its plan_check event plus the checkpoint's size on disk."""
    engine, act_ckpt = case.split("/")
    run_dir = work / case.replace("/", "-")
    overrides = MODEL + RUN + ENGINES[engine]
    overrides += [
        f"model.act_ckpt={act_ckpt}",
        f"max_steps={steps}",
        f"run_dir={run_dir}",
        f"data.path={data_dir}",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",
        "-m",
        "trainer.train",
        *overrides,
    ]
    env = (env or dict(os.environ)) | {"OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{case}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    check = next(e for e in events if e["event"] == "plan_check")
    plan = next(e for e in events if e["event"] == "perf")["plan"]
    step_dir = run_dir / "checkpoints" / f"step-{steps}"
    ckpt = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file()) if step_dir.is_dir() else 0
    return check | {
        "case": case,
        "seconds": time.perf_counter() - t0,
        "checkpoint_gb": ckpt / 2**30,
        "planned_checkpoint_gb": plan["checkpoint_gb"],
        "num_params": plan["num_params"],
    }


def error(result: dict) -> float:
    """The worst rank's relative error of the plan against its measured peak."""
    return max(abs(result["planned_gb"] / peak - 1) for peak in result["peak_gb"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cases", nargs="*", default=CASES, help=f"of {' '.join(CASES)}")
    p.add_argument("--dir", default=None, help="where the runs go (default: a temp dir)")
    args = p.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="plan-accuracy-"))
    data_dir = work / "data"
    print(f"load: {os.getloadavg()[0]:.1f}; runs in {work}", flush=True)
    print(
        f"{'case':22s} {'planned GiB':>11s} {'peak GiB r0':>11s} {'peak GiB r1':>11s} {'error':>7s} "
        f"{'ckpt GiB':>8s} {'planned':>8s}",
        flush=True,
    )
    worst = 0.0
    for case in args.cases:
        r = run_case(case, work, args.steps, data_dir)
        worst = max(worst, error(r))
        peaks = " ".join(f"{p:11.3f}" for p in r["peak_gb"])
        print(
            f"{case:22s} {r['planned_gb']:11.3f} {peaks} {100 * error(r):6.1f}% "
            f"{r['checkpoint_gb']:8.3f} {r['planned_checkpoint_gb']:8.3f}",
            flush=True,
        )
    verdict = "met" if worst <= TOLERANCE else "NOT met"
    print(
        f"worst error {100 * worst:.1f}% (target <= {100 * TOLERANCE:.0f}%: {verdict}); "
        f"load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
