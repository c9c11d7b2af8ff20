"""MFU/HFU against hand-computed FLOPs, the peak lookup, the step-time split on a fake clock, the sinks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.config import ModelConfig, ProfileConfig
from trainer.metrics import MetricsSink, format_event, truncate_metrics
from trainer.model import flops_per_token
from trainer.perf import (
    PerfMeter,
    device_peak,
    hardware_flops_per_token,
    measure_matmul_flops,
    memory_stats,
    table_peak,
)
from trainer.profiling import StepProfiler

# nano, vocab 64: per block qkv 32*96 + out 32*32 + swiglu 3*32*128 (ffn 85 -> 128) + 2 norms 2*32
BLOCK = 32 * 96 + 32 * 32 + 3 * 32 * 128 + 2 * 32  # 16448
N = 2 * BLOCK + 32 + 64 * 32  # + final norm + the tied table, counted once as the lm_head matmul
ATTN = 12 * 2 * 2 * 16 * 64  # 12 * L * H * Q * T
NANO = dict(n_layer=2, n_head=2, d_model=32, max_seq_len=64, vocab_size=64)


def test_flops_per_token_by_hand():
    assert flops_per_token(ModelConfig(**NANO), 64) == 6 * N + ATTN == 259008


@pytest.mark.parametrize(
    "policy, recomputed",
    [("none", 0), ("selective", 0), ("full", 2), ("every_n", 1)],  # every_n (k=2): block 0 of 2
)
def test_hfu_adds_one_forward_of_each_recomputed_block(policy, recomputed):
    cfg = ModelConfig(**NANO, act_ckpt=policy, act_ckpt_every=2)
    block_forward = 2 * BLOCK + 4 * 2 * 16 * 64  # 2 * params + q@k^T and att@v over T keys
    assert hardware_flops_per_token(cfg, 64) == 6 * N + ATTN + recomputed * block_forward


def test_mfu_tokens_per_s_and_split_on_a_fake_clock():
    now = [100.0]
    peak = device_peak(torch.device("cpu"), "fp32", override_tflops=1e-3)
    meter = PerfMeter(
        512, 2, flops_per_token=246720, hw_flops_per_token=328896, peak=peak, clock=lambda: now[0]
    )
    for _ in range(2):  # two steps of 0.5 s: data 0.1, forward-backward 0.3, optimizer 0.1
        meter.step_start()
        now[0] += 0.1
        meter.data_done()
        now[0] += 0.3
        meter.optimizer_start()
        now[0] += 0.1
        meter.step_done()
    meter.add_checkpoint(0.25)
    now[0] += 0.25
    r = meter.report(steps_left=10)
    assert r["tokens_per_s"] == pytest.approx(2 * 512 / 1.25)
    assert r["tokens_per_s_per_device"] == pytest.approx(512 / 1.25)
    assert r["mfu"] == pytest.approx(512 / 1.25 * 246720 / 1e9)
    assert r["hfu"] == pytest.approx(512 / 1.25 * 328896 / 1e9)
    assert (r["data_s"], r["fwd_bwd_s"], r["optimizer_s"]) == pytest.approx((0.1, 0.3, 0.1))
    assert r["checkpoint_s"] == pytest.approx(0.125) and r["other_s"] == pytest.approx(0.0, abs=1e-9)
    assert r["eta_s"] == pytest.approx(10 * 0.625) and r["data_wait_frac"] == pytest.approx(0.2 / 1.25)
    assert meter.report(0)["tokens_per_s"] == 0  # a new window


def test_peak_table_override_and_cpu_measurement():
    assert table_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert table_peak("NVIDIA H100 PCIe", "bf16") == 756e12  # not the SXM number
    assert table_peak("NVIDIA H100 80GB HBM3", "fp32") == 67e12
    assert table_peak("NVIDIA H100 80GB HBM3", "fp32", tf32=True) == 494e12
    assert table_peak("Some Future GPU", "bf16") is None
    assert device_peak(torch.device("cpu"), "fp32", 2.5).flops == 2.5e12
    assert device_peak(torch.device("cpu"), "fp16") is None
    assert 1e8 < measure_matmul_flops(256, 1) < 1e13
    torch.manual_seed(0)
    measure_matmul_flops(128, 1, 0.0, torch.float64)  # a new measurement...
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # ...leaves the run's seeded generator alone
    bf16 = device_peak(torch.device("cpu"), "bf16")  # measured in bf16: this CPU's own rate
    assert "bf16" in bf16.source and 1e8 < bf16.flops < 1e14


def test_memory_stats_on_cpu():
    stats = memory_stats(torch.device("cpu"))
    assert set(stats) == {"rss_gb"} and 0.01 < stats["rss_gb"] < 100


def test_truncate_returns_what_wandb_holds_and_skips_torn_lines(tmp_path: Path):
    lines = [json.dumps({"event": "train", "step": s}) for s in (1, 2, 3, 4)] + ['{"event": "tr']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert truncate_metrics(tmp_path, 2) == 4
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


class _FailingRun:  # W&B's run object as seen after its service died: every call raises
    id = "abc"
    summary: dict = {}

    def log(self, *a, **k):
        raise BrokenPipeError("service gone")

    def finish(self):
        raise BrokenPipeError("service gone")


class _Run(_FailingRun):
    def __init__(self):
        self.logged = []

    def log(self, data, step):
        self.logged.append(step)


def test_sink_skips_steps_wandb_has_and_survives_wandb_failing(tmp_path: Path, capsys):
    run = _Run()
    sink = MetricsSink(tmp_path, run, wandb_floor=2, progress=False)
    for s in (1, 2, 3):
        sink.log({"event": "eval", "step": s, "val_loss": 1.0})
    assert run.logged == [3]
    sink = MetricsSink(tmp_path, _FailingRun(), progress=False)
    sink.log({"event": "eval", "step": 4, "val_loss": 1.0})
    sink.log({"event": "eval", "step": 5, "val_loss": 1.0})
    sink.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert "eval  step      5" in capsys.readouterr().out


def test_train_line_shows_mfu_and_memory():
    e = {"event": "train", "step": 3, "total_steps": 9, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 1000.0,
         "data_wait_frac": 0.0, "eta_s": 5.0, "mfu": 0.123, "rss_gb": 0.5}  # fmt: skip
    assert "mfu 12.3% | mem 0.50 GB | eta 0:00:05" in format_event(e)


def test_eval_line_shows_bits_per_byte_when_known():
    e = {"event": "eval", "step": 50, "val_loss": 2.0, "val_bpb": 1.5}
    assert format_event(e) == "eval  step     50 | val_loss 2.0000 | ppl 7.39 | bpb 1.5000"
    assert format_event(e | {"val_bpb": None}).endswith("ppl 7.39")


def test_profiler_writes_a_chrome_trace_of_the_chosen_steps(tmp_path: Path):
    prof = StepProfiler(ProfileConfig(enabled=True, steps=[2, 3]), tmp_path, 0, torch.device("cpu"))
    for step in range(1, 6):
        prof.before_step(step)
        torch.mm(torch.randn(64, 64), torch.randn(64, 64))
    prof.close()
    trace = json.loads((tmp_path / "profile" / "rank0.steps2-3.pt.trace.json").read_text())
    marks = {ev["name"] for ev in trace["traceEvents"] if ev.get("name", "").startswith("ProfilerStep#")}
    assert marks == {"ProfilerStep#2", "ProfilerStep#3"}
    other_rank = StepProfiler(
        ProfileConfig(enabled=True, steps=[1, 1]), tmp_path / "r1", 1, torch.device("cpu")
    )
    other_rank.before_step(1)
    other_rank.close()
    assert not (tmp_path / "r1").exists()
