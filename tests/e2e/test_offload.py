"""ZeRO-3 with parameters and optimizer on the CPU: DeepSpeed's CPU Adam (JIT-built once), one process.

It lives apart from tests/distributed because it starts one process: under xdist it runs beside
the multi-process tests (its JIT build is the longest step of the suite on a clean machine).
"""

from __future__ import annotations

import pytest

from tests.helpers import SHORT_RUN, assert_ok, read_metrics, run_module


@pytest.mark.slow
def test_zero3_offload_trains_like_the_reference(tmp_path, cli_env):
    assert_ok(run_module("trainer.train", [*SHORT_RUN, "engine=zero0", "run_dir=ref"], tmp_path, cli_env))
    args = [*SHORT_RUN, "engine=zero3-offload", "engine.precision=fp32", "run_dir=out"]
    assert_ok(run_module("trainer.train", args, tmp_path, cli_env, timeout=900))
    reference = [e["loss"] for e in read_metrics(tmp_path / "ref")]
    losses = [e["loss"] for e in read_metrics(tmp_path / "out")]
    assert len(losses) == 8
    assert losses == pytest.approx(reference, rel=1e-4, abs=1e-5)
