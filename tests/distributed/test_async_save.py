"""Asynchronous checkpoint saves: a snapshot that later steps do not change, at most one save in
flight, and a kill -9 during a background write that leaves the previous checkpoint to resume."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.test_resume import BASE, finish, losses, start, wait_for
from tests.helpers import SHORT_RUN, assert_ok, frozen, read_metrics, torchrun, written_events
from trainer.checkpoint import pin_memory

pytestmark = pytest.mark.distributed

WORKER = str(Path(__file__).with_name("async_save_worker.py"))


@pytest.mark.slow  # a 2-rank run
def test_async_save_holds_the_moment_it_was_taken_and_waits_for_the_previous_write(tmp_path, cli_env):
    args = [WORKER, str(tmp_path), *SHORT_RUN, "engine=zero2", "run_dir=out"]
    assert_ok(torchrun(2, args, tmp_path, cli_env))
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["in_flight"] and r["changed"]  # written while the loop changed the state...
        assert r["differ"] == [] and r["compared"] > 10  # ...yet equal to a synchronous save then
        assert r["third_wait_s"] > 0.4  # a save due while the previous one writes (>= 0.5 s) waits for it
        assert [e["step"] for e in r["events"]] == [1, 2, 3]  # each published, in order
        assert all(e["event"] == "checkpoint_complete" and e["write_s"] > 0 for e in r["events"])
        assert r["dirs"] == ["latest", "step-2", "step-3", "zero_to_fp32.py", "zero_to_torch.py"]
        assert r["latest"] == "step-3"  # and keep_last=2 pruned step 1
    shards = list((tmp_path / "out" / "async" / "checkpoints" / "step-3").glob("*optim_states.pt"))
    assert len(shards) == 2  # each rank wrote its own ZeRO partition


@pytest.mark.slow  # three runs
def test_kill_9_during_a_background_write_resumes_from_the_previous_checkpoint(tmp_path, cli_env):
    """Killed after a save's snapshot, while its write is in flight (not yet published): the
    restart resumes from the save before, and the losses are those of an uninterrupted run."""
    args = [sys.executable, "-m", "trainer.train", *BASE, "max_steps=30", "checkpoint.every_steps=2",
            "checkpoint.keep_last=20", "run_dir=out"]  # fmt: skip
    ckpt = tmp_path / "out" / "checkpoints"
    caught: list[int] = []

    def writing() -> bool:  # a snapshot logged, its checkpoint not yet complete
        snapshots = [e["step"] for e in written_events(tmp_path / "out", "checkpoint")]
        if snapshots and snapshots[-1] > 2 and not (ckpt / f"step-{snapshots[-1]}" / "COMPLETE").exists():
            caught.append(snapshots[-1])
            return True
        return False

    proc = start(args, tmp_path, cli_env)
    while True:
        wait_for(writing, proc)
        with frozen([proc.pid]):  # look at the files once nothing moves (every thread stopped)
            step = caught[-1]
            if (ckpt / f"step-{step}.partial").is_dir() and not (ckpt / f"step-{step}").exists():
                os.killpg(proc.pid, signal.SIGKILL)
                break
        # published in the meantime: catch a later one
    proc.wait()
    previous = max(int(p.name.split("-")[1]) for p in ckpt.glob("step-*") if (p / "COMPLETE").is_file())
    assert previous < step
    resumed = start(args, tmp_path, cli_env)
    out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    assert f"checkpoints/step-{previous} at step {previous}" in out  # resumed from the one before
    assert [e["step"] for e in read_metrics(tmp_path / "out")] == list(range(1, 31))

    straight = tmp_path / "straight"
    straight.mkdir()
    straight_run = start(args, straight, cli_env)
    out = finish(straight_run)
    assert straight_run.returncode == 0, out[-3000:]
    assert losses(tmp_path / "out") == losses(straight / "out")  # bitwise


def test_gpu_snapshots_go_to_pinned_memory():
    assert pin_memory(torch.device("cuda", 0)) and not pin_memory(torch.device("cpu"))
