"""Resume that survives anything: kill -9, signals, torchrun restarts, another world size.

Every test compares against an uninterrupted run of the same config: bitwise-equal losses at
the same world size (CPU fp32), and a continuation without a jump on another world size.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import assert_ok, frozen, kill_group, read_metrics, torchrun, written_events

pytestmark = pytest.mark.distributed

STEPS = 40
# Global batch 6 divides over 1, 2 and 3 ranks; the nano model keeps a step at a few ms.
BASE = ["debug=fast", f"max_steps={STEPS}", "log_every=1", "eval_every=0", "global_batch_size=6",
        "micro_batch_size=1", "checkpoint.every_steps=10", "checkpoint.keep_last=10"]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "127.0.0.1:0"]  # fmt: skip


def losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_env):
    """Uninterrupted 2-rank runs, one per ZeRO stage: {stage: run_dir}."""
    runs = {}
    for stage in (1, 2, 3):
        cwd = tmp_path_factory.mktemp(f"ref{stage}")
        assert_ok(
            torchrun(2, ["-m", "trainer.train", *BASE, f"engine=zero{stage}", "run_dir=out"], cwd, base_env)
        )
        runs[stage] = cwd / "out"
        assert len(losses(runs[stage])) == STEPS
    return runs


def start(cmd: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    env = env | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for `proc` and return its output; on a timeout kill its whole process group."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited {proc.returncode} too early:\n{proc.stdout.read()[-3000:]}"
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError("timed out")
        time.sleep(0.002)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_kill_9_then_resume_is_bitwise_exact(tmp_path, cli_env, reference, stage):
    args = [
        *TORCHRUN,
        "--nproc-per-node",
        "2",
        "-m",
        "trainer.train",
        *BASE,
        f"engine=zero{stage}",
        "run_dir=out",
    ]
    proc = start(args, tmp_path, cli_env)
    ckpt = tmp_path / "out" / "checkpoints"
    wait_for(lambda: (ckpt / "step-20" / "COMPLETE").is_file(), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, wherever they are
    proc.wait()
    assert not (ckpt / f"step-{STEPS}").exists(), "the run finished before it was killed"

    resumed = start(args, tmp_path, cli_env)
    out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from" in out
    assert losses(tmp_path / "out") == losses(reference[stage])  # bitwise, every step once


@pytest.mark.parametrize("stage, world", [(2, 1), (2, 3), (3, 1), (3, 3)])
def test_resume_on_another_world_size(tmp_path, cli_env, reference, stage, world):
    """DeepSpeed's universal checkpoint carries the partitioned optimizer state across."""
    step20 = reference[stage] / "checkpoints" / "step-20"
    args = ["-m", "trainer.train", *BASE, f"engine=zero{stage}", "run_dir=out", f"checkpoint.resume={step20}"]
    proc = torchrun(world, args, tmp_path, cli_env)
    assert_ok(proc)
    assert (step20 / "universal" / "COMPLETE").is_file()  # converted once, then reused
    got, want = losses(tmp_path / "out"), losses(reference[stage])[20:]
    assert len(got) == STEPS - 20
    assert got[0] == pytest.approx(want[0], rel=1e-6)  # the restored weights, exactly
    # ZeRO-2: the same curve, summed in another order. ZeRO-3: DeepSpeed 0.19's universal load
    # leaves the optimizer slightly off (measured ~0.1% after a few steps), so no jump, not exact.
    assert got == pytest.approx(want, rel=1e-5 if stage == 2 else 5e-3)


def test_signal_on_one_rank_saves_on_all_and_exits_for_requeue(tmp_path, cli_env, reference):
    args = [*TORCHRUN, "--nproc-per-node", "2", "-m", "trainer.train", *BASE, "engine=zero2",
            "checkpoint.every_steps=0", "run_dir=out"]  # fmt: skip
    proc = start(args, tmp_path, cli_env)
    wait_for(lambda: len(written_events(tmp_path / "out", "train")) >= 4, proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    (rank1,) = [p for p in workers if p.environ().get("RANK") == "1"]
    with frozen([proc.pid, *(p.pid for p in workers)]):  # the signal lands mid-run, however late
        assert written_events(tmp_path / "out", "train")[-1]["step"] < STEPS, "finished before the signal"
        rank1.send_signal(signal.SIGUSR1)
    out = finish(proc, 120)
    assert "exitcode  : 85" in out or "exitcode: 85" in out.replace(" ", ""), out[-3000:]
    saved = [p for p in (tmp_path / "out" / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file()]
    assert len(saved) == 1 and len(list(saved[0].glob("*optim_states.pt"))) == 2  # both ranks saved
    stopped_at = int(saved[0].name.split("-")[1])
    assert 5 <= stopped_at < STEPS

    resumed = start(args, tmp_path, cli_env)
    out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    assert losses(tmp_path / "out") == losses(reference[2])


def test_torchrun_restarts_a_killed_rank_and_the_run_finishes(tmp_path, cli_env, reference):
    args = [*TORCHRUN, "--nproc-per-node", "2", "--max-restarts", "1", "-m", "trainer.train", *BASE,
            "engine=zero2", "run_dir=out"]  # fmt: skip
    proc = start(args, tmp_path, cli_env)
    wait_for(lambda: (tmp_path / "out" / "checkpoints" / "step-10" / "COMPLETE").is_file(), proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    (rank0,) = [p for p in workers if p.environ().get("RANK") == "0"]
    with frozen([proc.pid, *(p.pid for p in workers)]):  # killed mid-run, however late
        assert written_events(tmp_path / "out", "train")[-1]["step"] < STEPS, "finished before the kill"
        rank0.kill()
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    assert losses(tmp_path / "out") == losses(reference[2])


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path, cli_env):
    args = [sys.executable, "-m", "trainer.train", *BASE, "max_steps=30", "checkpoint.every_steps=1",
            "checkpoint.keep_last=2", "run_dir=out"]  # fmt: skip
    ckpt = tmp_path / "out" / "checkpoints"
    proc = start(args, tmp_path, cli_env)
    wait_for(lambda: ckpt.is_dir() and any(p.suffix == ".partial" for p in ckpt.glob("step-*")), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = start(args, tmp_path, cli_env)
    out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    steps = [e["step"] for e in read_metrics(tmp_path / "out")]
    assert steps == list(range(1, 31))

    straight = tmp_path / "straight"
    straight.mkdir()
    straight_run = start(args, straight, cli_env)
    out = finish(straight_run)
    assert straight_run.returncode == 0, out[-3000:]
    assert losses(tmp_path / "out") == losses(straight / "out")
