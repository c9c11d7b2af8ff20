"""`model.compile=true`: the same losses as eager, and checkpoints that load either way.

One compiled process (compiling on 2 CPU cores takes about a minute, longer under load): it starts
from an eager run's checkpoint, trains 50 steps compiled and saves; an eager run resumes from that.
"""

from __future__ import annotations

import pytest

from tests.helpers import assert_ok, read_metrics, run_module

RUN = ["debug=fast", "max_steps=75", "eval_every=0", "log_every=1", "checkpoint.every_steps=25"]


def _losses(run_dir, first=1):
    return {e["step"]: e["loss"] for e in read_metrics(run_dir) if e["step"] >= first}


def _resume(tmp_path, saved, step):
    return f"checkpoint.resume={tmp_path / saved / 'checkpoints' / f'step-{step}'}"


@pytest.mark.slow
def test_compiled_training_equals_eager_and_checkpoints_interchange(tmp_path, cli_env):
    assert_ok(run_module("trainer.train", [*RUN, "run_dir=eager"], tmp_path, cli_env))
    eager = _losses(tmp_path / "eager")
    # Saved eager, resumed compiled: 50 compiled steps on the eager curve.
    compiled_run = [*RUN, "model.compile=true", _resume(tmp_path, "eager", 25), "run_dir=compiled"]
    proc = run_module("trainer.train", compiled_run, tmp_path, cli_env)
    assert_ok(proc)
    assert "_orig_mod" not in proc.stderr  # the checkpoint's keys are the plain module's
    compiled = _losses(tmp_path / "compiled")
    assert sorted(compiled) == list(range(26, 76))
    for step, loss in compiled.items():  # fused kernels reorder fp32 sums: equal within rounding
        assert loss == pytest.approx(eager[step], rel=2e-4, abs=1e-5), step
    (perf,) = read_metrics(tmp_path / "compiled", "perf")
    assert perf["compile"] is True and perf["compile_s"] > 0
    # Saved compiled, resumed eager: the same curve again.
    resumed = [*RUN, _resume(tmp_path, "compiled", 50), "run_dir=eager-from-compiled"]
    proc = run_module("trainer.train", resumed, tmp_path, cli_env)
    assert_ok(proc)
    after = _losses(tmp_path / "eager-from-compiled")
    assert sorted(after) == list(range(51, 76))
    for step, loss in after.items():
        assert loss == pytest.approx(eager[step], rel=2e-4, abs=1e-5), step
