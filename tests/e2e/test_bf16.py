"""`engine.precision=bf16` trains on the CPU (DeepSpeed's bf16 weights, fp32 master weights,
attention in fp32: trainer.model.attend) on the fp32 run's loss curve, within bf16's rounding."""

from __future__ import annotations

import pytest

from tests.helpers import assert_ok, read_metrics, run_module

RUN = ["debug=fast", "max_steps=40", "eval_every=0", "log_every=1", "checkpoint.every_steps=0",
       "checkpoint.save_final=false", "optim.lr=3e-3"]  # fmt: skip


@pytest.mark.slow
def test_bf16_training_follows_the_fp32_curve(tmp_path, cli_env):
    curves = {}
    for precision in ("fp32", "bf16"):  # the default engine, ZeRO-1
        run = [*RUN, f"engine.precision={precision}", f"run_dir={precision}"]
        assert_ok(run_module("trainer.train", run, tmp_path, cli_env))
        curves[precision] = {e["step"]: e["loss"] for e in read_metrics(tmp_path / precision)}
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert sorted(bf16) == sorted(fp32) == list(range(1, 41))
    assert bf16 != fp32  # it did run in bf16
    for step in fp32:  # bf16 keeps 8 bits of mantissa: the curves part by a few percent at most
        assert bf16[step] == pytest.approx(fp32[step], rel=0.03), step
    assert bf16[40] < bf16[1] - 0.5  # and it learns
