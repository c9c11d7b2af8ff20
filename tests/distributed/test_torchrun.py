"""Two ranks under torchrun on gloo: ZeRO-2 and ZeRO-3 train, agree, and match one rank."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import SHORT_RUN, assert_ok, read_metrics, run_module, torchrun

pytestmark = pytest.mark.distributed

WORKER = str(Path(__file__).with_name("agree_worker.py"))

# What a user's console may show of a run: the trainer's progress (stdout), its log lines (stderr,
# tagged with the rank), and torchrun's own (glog-style lines from torch/distributed's launcher).
OURS_STDOUT = re.compile(r"(perf|train|eval|ckpt|plan) ")
OURS_STDERR = re.compile(r"\[rank\d+\] |[IWE]\d{4} [\d:.]+ \d+ torch/distributed/(run|launcher|elastic)/")


def foreign_lines(proc) -> list[str]:
    """Console lines the trainer did not write (libraries': compiler probes, warnings)."""
    out = [line for line in proc.stdout.splitlines() if line.strip() and not OURS_STDOUT.match(line)]
    return out + [line for line in proc.stderr.splitlines() if line.strip() and not OURS_STDERR.match(line)]


@pytest.fixture(scope="module")
def single_rank_losses(tmp_path_factory, base_env) -> list[float]:
    """The reference: the same run on one process (ZeRO stage does not change the maths)."""
    cwd = tmp_path_factory.mktemp("single")
    assert_ok(run_module("trainer.train", [*SHORT_RUN, "engine=zero0", "run_dir=out"], cwd, base_env))
    return [e["loss"] for e in read_metrics(cwd / "out")]


@pytest.mark.parametrize("stage, act_ckpt", [(2, "none"), (3, "none"), (3, "full"), (3, "selective")])
def test_two_ranks_train_like_one(tmp_path, cli_env, single_rank_losses, stage, act_ckpt):
    """Activation checkpointing recomputes, it does not change the maths: the same curve again."""
    args = [
        "-m",
        "trainer.train",
        *SHORT_RUN,
        f"engine=zero{stage}",
        f"model.act_ckpt={act_ckpt}",
        "run_dir=out",
    ]
    proc = torchrun(2, args, tmp_path, cli_env)
    assert_ok(proc)
    run_dir = tmp_path / "out"
    losses = [e["loss"] for e in read_metrics(run_dir)]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.3, losses
    assert proc.stdout.count("train step") == 8  # rank 0 alone reports; the other rank is quiet
    assert "[rank1] INFO" not in proc.stderr
    # Libraries' lines (DeepSpeed's accelerator notice and compiler probes, torch.distributed's
    # deprecation warnings) are in each rank's log file, not on the console.
    assert not foreign_lines(proc), foreign_lines(proc)
    for rank in (0, 1):
        assert "Setting accelerator to CPU" in (run_dir / "logs" / f"rank{rank}.log").read_text()
    # Same global batches, gradients averaged over ranks: the loss curve is the one-rank curve.
    assert losses == pytest.approx(single_rank_losses, rel=1e-4, abs=1e-5)
    assert (run_dir / "checkpoints" / "step-8").is_dir()
    shards = list((run_dir / "checkpoints" / "step-8").glob("*optim_states.pt"))
    assert len(shards) == 2, "each rank saves its own ZeRO partition"


@pytest.mark.parametrize("stage", [2, 3])
def test_ranks_agree_on_weights_and_loss(tmp_path, cli_env, stage):
    args = [WORKER, str(tmp_path), *SHORT_RUN, "max_steps=4", f"engine=zero{stage}", "run_dir=out"]
    proc = torchrun(2, args, tmp_path, cli_env)
    assert_ok(proc)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["step"] == r1["step"] == 4
    assert r0["fingerprint"] == r1["fingerprint"]  # bitwise-identical weights on both ranks
    assert r0["loss"] == r1["loss"]
