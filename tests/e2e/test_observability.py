"""W&B across a stop and a resume, a W&B outage, MFU, profiling and the report, as a user runs them."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import psutil
import yaml

from tests.helpers import assert_ok, frozen, read_metrics, read_wandb_run, run_module, written_events

FAKE_KEY = "fake-key-0123456789abcdef0123456789abcdef"
WANDB = ["logger=wandb", "logger.mode=offline", "logger.tags=[obs]", "logger.notes=kill-resume"]


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trainer.train", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if any(e["step"] >= step for e in written_events(run_dir, "train")):
            return
        time.sleep(0.01)
    raise TimeoutError(f"no train event at step {step}")


def _wandb_runs(run_dir: Path, tmp: Path) -> list[dict]:
    """Every offline W&B file under run_dir (one per process start), oldest first."""
    out = []
    for i, d in enumerate(sorted(run_dir.glob("wandb/offline-run-*"))):
        (tmp / f"w{i}" / "wandb").mkdir(parents=True)
        (tmp / f"w{i}" / "wandb" / d.name).symlink_to(d)
        out.append(read_wandb_run(tmp / f"w{i}"))
    return out


def test_stopped_and_resumed_run_is_one_wandb_run_with_monotonic_steps(tmp_path, cli_env):
    """SIGUSR1 (as SLURM sends before preemption) saves and exits 85; the same command resumes."""
    env = cli_env | {"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY}
    # Enough steps that the signal lands mid-run even when the test polls late (a few ms a step).
    args = ["debug=fast", "max_steps=100", "eval_every=50", *WANDB, "run_dir=out"]
    run_dir = tmp_path / "out"
    proc = _start(args, tmp_path, env)
    _wait_for_step(proc, run_dir, 3)
    with frozen([proc.pid]):  # the signal lands mid-run however late this process gets the CPU
        assert written_events(run_dir, "train")[-1]["step"] < 100, "finished before the signal"
        proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 85, err[-3000:]
    assert_ok(run_module("trainer.train", args, tmp_path, env))

    assert [e["step"] for e in read_metrics(run_dir)] == list(range(1, 101))  # each step once
    runs = _wandb_runs(run_dir, tmp_path / "wb")
    assert len(runs) == 2 and runs[0]["run_id"] == runs[1]["run_id"]
    steps = [row["_step"] for r in runs for row in r["history"] if "loss" in row]
    assert steps == list(range(1, 101)), steps  # one W&B run, every step once, never backwards
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for r in runs:
        assert {k: v for k, v in r["config"].items() if not k.startswith("_")} == resolved
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_wandb_outage_does_not_stop_training_and_perf_profile_report_work(tmp_path, cli_env):
    """A real outage: the W&B service process is killed while the run logs to it. The same run
    logs MFU, memory and the step-time split, records a profile, and feeds the report."""
    env = cli_env | {"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY}
    args = ["debug=fast", "max_steps=8", "eval_every=4", *WANDB, "run_dir=out"]
    args += ["profile.enabled=true", "profile.steps=[4,5]"]
    run_dir = tmp_path / "out"
    proc = _start(args, tmp_path, env)
    _wait_for_step(proc, run_dir, 2)
    with frozen([proc.pid]):  # the service dies while the run still has steps to log to it
        assert written_events(run_dir, "train")[-1]["step"] < 8, "finished before the outage"
        services = [
            p for p in psutil.Process(proc.pid).children(recursive=True) if "wandb" in " ".join(p.cmdline())
        ]
        assert services, "no W&B service process found"
        for p in services:
            p.kill()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "W&B" in err and FAKE_KEY not in out + err

    train = read_metrics(run_dir)
    assert [e["step"] for e in train] == list(range(1, 9))  # every event, W&B or not
    (perf,) = read_metrics(run_dir, "perf")
    assert perf["peak_source"].startswith("measured") and perf["peak_tflops"] > 0
    for e in train:
        assert 0 < e["mfu"] == e["hfu"] < 1  # no activation checkpointing: nothing recomputed
        assert e["tokens_per_s_per_device"] == e["tokens_per_s"] and e["rss_gb"] > 0
        split = e["data_s"] + e["fwd_bwd_s"] + e["optimizer_s"] + e["checkpoint_s"] + e["other_s"]
        assert abs(split - e["step_time_s"]) < 1e-6 and e["fwd_bwd_s"] > 0 and e["optimizer_s"] > 0
    trace = json.loads((run_dir / "profile" / "rank0.steps4-5.pt.trace.json").read_text())
    assert any("ProfilerStep" in ev.get("name", "") for ev in trace["traceEvents"])

    report = run_module("trainer.report", [str(run_dir)], tmp_path, env)
    assert_ok(report)
    for png in ("loss.png", "throughput.png"):
        assert (run_dir / "report" / png).stat().st_size > 10_000
    assert "best val" in report.stdout


def _run_on_a_terminal(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run the trainer with stdout on a pseudo-terminal, as in an interactive shell; its output."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # rows, columns
    cmd = [sys.executable, "-m", "trainer.train", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=child, stderr=subprocess.DEVNULL)
    os.close(child)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(main, 4096)  # EIO once the child has closed the terminal
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
    assert proc.wait() == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


def test_terminal_shows_a_live_bar_and_the_default_model_has_a_sane_mfu(tmp_path, cli_env):
    """On a terminal: a tqdm bar redrawn in place (step, loss, tokens/s, ETA), no plain step lines.
    The default model is the one whose MFU a badly measured CPU peak once put at 212%."""
    args = ["max_steps=20", "log_every=5", "eval_every=0", "checkpoint.save_final=false", "run_dir=out"]
    out = _run_on_a_terminal(args, tmp_path, cli_env)
    drawings = [line for line in re.split(r"[\r\n]+", out) if line.startswith("train:")]
    assert len(drawings) >= 2 and "train step" not in out, out[-2000:]  # redrawn, no plain lines
    bar = drawings[-1]
    assert "100%" in bar and "20/20" in bar and "tok/s" in bar and "eta 0:00:00" in bar, bar
    assert "perf  peak" in out  # other events still print, above the bar

    (perf,) = read_metrics(tmp_path / "out", "perf")
    assert perf["peak_source"].startswith("measured") and perf["peak_tflops"] > 0
    for e in read_metrics(tmp_path / "out"):
        assert 0 < e["mfu"] == e["hfu"] < 1, (e["mfu"], perf)


def test_full_disk_under_wandb_files_is_a_warning_and_training_goes_on(tmp_path, cli_env):
    """W&B's offline files on a real 40 KiB filesystem that fills up a few steps in."""
    wandb_dir = tmp_path / "out" / "wandb"
    wandb_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(wandb_dir)], check=True)
    try:
        args = ["debug=fast", "max_steps=30", "eval_every=0", *WANDB, "run_dir=out"]
        proc = run_module("trainer.train", args, tmp_path, cli_env | {"WANDB_MODE": "offline"})
        free = os.statvfs(wandb_dir).f_bavail
    finally:
        subprocess.run(["umount", str(wandb_dir)], check=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert free == 0  # the disk did fill up
    assert "the disk is full" in proc.stderr and "metrics.jsonl keeps them" in proc.stderr
    assert [e["step"] for e in read_metrics(tmp_path / "out")] == list(range(1, 31))


def test_log_level_debug_shows_library_lines_on_the_console(tmp_path, cli_env):
    """log_level=info (the default) keeps libraries' lines in <run_dir>/logs/ (tests/distributed
    checks a 2-rank console); log_level=debug brings them to the console too."""
    args = ["debug=fast", "max_steps=1", "eval_every=0", "log_level=debug", "run_dir=out"]
    proc = run_module("trainer.train", args, tmp_path, cli_env)
    assert_ok(proc)
    assert "Setting accelerator to CPU" in proc.stdout  # DeepSpeed's own logger
    assert "INFO compilers.C.base: gcc" in proc.stdout  # its compiler probes
    log = (tmp_path / "out" / "logs" / "rank0.log").read_text()
    assert "Setting accelerator to CPU" in log and "compilers.C.base: gcc" in log  # in the file too
