"""Faults during training: a NaN loss (dropped or fatal), a loss spike, a full disk during a save, SIGUSR1."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import assert_ok, frozen, read_metrics, run_module, start_module

FAST = [
    "debug=fast",
    "max_steps=8",
    "log_every=1",
    "eval_every=0",
    "global_batch_size=8",
    "micro_batch_size=4",
]


def test_nan_step_is_dropped_and_recorded(tmp_path, cli_env):
    args = [*FAST, "guard.inject_nan_at=[3]", "guard.on_nonfinite=skip", "run_dir=out"]
    assert_ok(run_module("trainer.train", args, tmp_path, cli_env))
    run_dir = tmp_path / "out"
    (skip,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").open() if '"skip"' in line]
    assert skip["step"] == 3 and skip["reason"] == "non-finite loss"
    assert len(skip["sample_ids"]) == 8  # the whole global batch, for whoever investigates
    train = read_metrics(run_dir)
    assert [e["skipped_steps"] for e in train] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(e["loss"] == e["loss"] for e in train if e["step"] != 3)  # nothing else is NaN
    assert train[-1]["loss"] < train[0]["loss"]  # training went on, the weights are intact


def test_nan_step_with_stop_halts_without_saving(tmp_path, cli_env):
    """Inside a profiling window too: the profiler is stopped (a running one crashed the exit)."""
    args = [*FAST, "guard.inject_nan_at=[5]", "checkpoint.every_steps=2", "run_dir=out"]
    args += ["profile.enabled=true", "profile.steps=[4,6]"]
    proc = run_module("trainer.train", args, tmp_path, cli_env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: non-finite loss at step 5" in proc.stderr
    saved = sorted(p.name for p in (tmp_path / "out" / "checkpoints").glob("step-*"))
    assert saved == ["step-2", "step-4"]  # nothing written after the NaN
    assert (tmp_path / "out" / "profile" / "rank0.steps4-6.pt.trace.json").stat().st_size > 0


def test_skip_on_zero0_is_refused(tmp_path, cli_env):
    args = [*FAST, "engine=zero0", "guard.on_nonfinite=skip", "run_dir=out"]
    proc = run_module("trainer.train", args, tmp_path, cli_env)
    assert proc.returncode == 2 and "engine.zero_stage" in proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A real 1.2 MiB filesystem: one nano checkpoint fits (~0.75 MiB), two do not."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, cli_env, small_disk):
    args = [*FAST, "checkpoint.every_steps=2", "checkpoint.keep_last=1", f"run_dir={small_disk}/run"]
    proc = run_module("trainer.train", args, tmp_path, cli_env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: saving") and "step-2 is intact" in err, err
    ckpts = sorted(p.name for p in (small_disk / "run" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-2"]  # the failed one's partial directory was removed

    moved = tmp_path / "moved"  # the user frees space (here: moves the run) and restarts it
    shutil.copytree(small_disk / "run", moved)
    args[-1] = f"run_dir={moved}"
    proc = run_module("trainer.train", args, tmp_path, cli_env)
    assert_ok(proc)
    assert [e["step"] for e in read_metrics(moved)] == list(range(1, 9))


def test_sigusr1_saves_and_exits_with_the_requeue_code(tmp_path, cli_env):
    args = [*FAST, "max_steps=400", "checkpoint.every_steps=0", "run_dir=out"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer.train", *args], cwd=tmp_path, env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    for _ in range(5):  # a burst: the later ones arrive while saving or shutting down
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 85, err[-2000:]
    (step_dir,) = (tmp_path / "out" / "checkpoints").glob("step-*")
    assert (step_dir / "COMPLETE").is_file()
    assert int(step_dir.name.split("-")[1]) < 400


def test_a_stop_request_while_the_run_is_built_saves_at_the_first_step_and_requeues(tmp_path, cli_env):
    """SLURM may preempt a job while it is still building the model (minutes for a large one)."""
    proc = start_module("trainer.train", [*FAST, "max_steps=400", "run_dir=out"], tmp_path, cli_env)
    config = tmp_path / "out" / ".config.yaml.new"  # written just before the run is built
    deadline = time.monotonic() + 120
    while not config.is_file():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    with frozen([proc.pid]):  # the signal lands during the build, however late this process is
        assert config.is_file(), "the run was built before the signal"  # config.yaml replaces it then
        proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 85, err[-2000:]
    (step_dir,) = (tmp_path / "out" / "checkpoints").glob("step-*")
    assert step_dir.name == "step-1" and (step_dir / "COMPLETE").is_file()


def _steps(run_dir) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in read_metrics(run_dir)]


def test_resume_keeps_the_spike_guards_recent_losses(tmp_path, cli_env):
    """The guard's window is in the checkpoint: resumed at step 4, the run drops the same steps
    and reaches the same losses as without the stop (with an empty window it would not drop 7)."""
    args = [*FAST, "optim.lr=0.05", "guard.spike_k=0.01", "guard.spike_window=3", "guard.on_spike=skip",
            "checkpoint.every_steps=4", "checkpoint.keep_last=5", "run_dir=out"]  # fmt: skip
    (tmp_path / "whole").mkdir()
    assert_ok(run_module("trainer.train", args, tmp_path / "whole", cli_env))
    whole = tmp_path / "whole" / "out"
    dropped = [e["step"] for e in read_metrics(whole, "skip")]
    assert dropped and min(dropped) >= 7, dropped  # the window of steps 4-6 drops step 7
    shutil.copytree(whole, tmp_path / "resumed" / "out")
    shutil.rmtree(tmp_path / "resumed" / "out" / "checkpoints" / "step-8")
    proc = run_module("trainer.train", args, tmp_path / "resumed", cli_env)
    assert_ok(proc)
    assert "resumed from" in proc.stderr
    assert [e["step"] for e in read_metrics(tmp_path / "resumed" / "out", "skip")] == dropped
    assert str(_steps(tmp_path / "resumed" / "out")) == str(_steps(whole))  # str: nan == nan
