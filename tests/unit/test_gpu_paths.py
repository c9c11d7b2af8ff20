"""The GPU-only paths, at the level a machine without a GPU can check: what they select, and the
GPU benchmark's refusal to run without one."""

from __future__ import annotations

import subprocess
import sys

import torch

from trainer.benchmarks.gpu import configurations
from trainer.data.batch import pins_for, to_device


def test_gpu_benchmark_refuses_without_cuda_in_one_line():
    assert not torch.cuda.is_available()  # this test is about a machine without CUDA
    proc = subprocess.run([sys.executable, "-m", "trainer.benchmarks.gpu"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_gpu_benchmark_covers_models_stages_and_compile_in_bf16():
    runs = configurations(["tiny", "gpt2-small"])
    assert len(runs) == 8 and all("engine.precision=bf16" in r for r in runs)
    seen = {(r[0], r[1], r[3]) for r in runs}
    for model in ("model=tiny", "model=gpt2-small"):
        for stage in ("engine=zero1", "engine=zero3"):
            for compiled in ("model.compile=true", "model.compile=false"):
                assert (model, stage, compiled) in seen


def test_batches_bound_for_a_gpu_are_pinned_first():
    rows = torch.randint(0, 100, (4, 9), dtype=torch.int32)
    assert pins_for(rows, "cuda") and pins_for(rows, torch.device("cuda", 1))
    assert not pins_for(rows, "cpu")  # a CPU run copies nothing across a bus
    x, y = to_device(rows, "cpu")
    assert x.dtype == y.dtype == torch.int64 and torch.equal(x, rows[:, :-1].long())
    assert torch.equal(y, rows[:, 1:].long())
