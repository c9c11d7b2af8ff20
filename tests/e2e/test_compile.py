"""`model.compile=true`: the same losses as eager, and checkpoints that load either way.

Compiling on 2 CPU cores takes about a minute (longer under load); the compiled runs below
compile twice (forward and backward each; the second start reuses inductor's on-disk cache).
"""

from __future__ import annotations

import pytest

from tests.helpers import assert_ok, read_metrics, run_module

RUN = ["debug=fast", "max_steps=50", "eval_every=0", "log_every=1", "checkpoint.every_steps=25"]
COMPILED = "model.compile=true"


def _losses(run_dir, first=1):
    return {e["step"]: e["loss"] for e in read_metrics(run_dir) if e["step"] >= first}


@pytest.mark.slow
def test_compiled_training_equals_eager_and_checkpoints_interchange(tmp_path, cli_env):
    assert_ok(run_module("trainer.train", [*RUN, "run_dir=eager"], tmp_path, cli_env))
    assert_ok(run_module("trainer.train", [*RUN, COMPILED, "run_dir=compiled"], tmp_path, cli_env))
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert sorted(compiled) == list(range(1, 51))
    for step in eager:  # fused kernels reorder fp32 sums: equal within rounding, not bit for bit
        assert compiled[step] == pytest.approx(eager[step], rel=2e-4, abs=1e-5), step
    (perf,) = read_metrics(tmp_path / "compiled", "perf")
    assert perf["compile"] is True and perf["compile_s"] > 0

    # Saved compiled, resumed eager; and the other way round: each continues the same curve.
    pairs = (("compiled", "eager-from-compiled", []), ("eager", "compiled-from-eager", [COMPILED]))
    for saved, resumed, extra in pairs:
        start = f"checkpoint.resume={tmp_path / saved / 'checkpoints' / 'step-25'}"
        proc = run_module("trainer.train", [*RUN, *extra, start, f"run_dir={resumed}"], tmp_path, cli_env)
        assert_ok(proc)
        assert "Missing key" not in proc.stderr and "_orig_mod" not in proc.stderr
        after = _losses(tmp_path / resumed, first=26)
        assert sorted(after) == list(range(26, 51))
        for step, loss in after.items():
            assert loss == pytest.approx(eager[step], rel=2e-4, abs=1e-5), (resumed, step)
