"""Run the trainer's entry points as a user would: in subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

# A short run on the nano model that the ZeRO stages must all train alike (losses within 1e-4).
# Global batch 8 = 2 ranks x micro 2 x 2 accumulation steps, or 1 rank x micro 2 x 4.
SHORT_RUN = ["debug=fast", "max_steps=8", "eval_every=4", "global_batch_size=8", "micro_batch_size=2",
             "checkpoint.every_steps=0"]  # fmt: skip


def start_module(module: str, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``python -m module args`` in its own process group (``kill_group`` ends it all), text
    output captured."""
    pipe = subprocess.PIPE
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, text=True, stdout=pipe, stderr=pipe, start_new_session=True
    )


def run_module(module: str, args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600):
    """Run ``python -m module args`` and return the CompletedProcess (text output captured).

    On a timeout the whole process group dies (torchrun's workers too), then the test fails.
    """
    proc = start_module(module, args, cwd, env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def torchrun(nproc: int, args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600):
    """``torchrun --nproc-per-node nproc args`` on this machine (gloo on CPU); args start with
    ``-m module`` or a script path."""
    launcher = [
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",
    ]
    return run_module(
        "torch.distributed.run", [*launcher, *args], cwd, env | {"OMP_NUM_THREADS": "1"}, timeout
    )


def read_metrics(run_dir: Path, event: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


def written_events(run_dir: Path, event: str | None = None) -> list[dict]:
    """The events of a run that is still writing metrics.jsonl: its whole lines only (the last one
    may be half written when the file is read), of one kind or all."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    lines = text[: text.rfind("\n") + 1].splitlines()
    return [e for e in map(json.loads, lines) if event is None or e["event"] == event]


# --- processes frozen in place, and their signals ----------------------------------------------


def _thread_states(pid: int) -> list[str]:
    """The scheduler state (R, S, D, T, Z, ...) of every thread of `pid`, from /proc."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError, IndexError):  # a thread that exited meanwhile
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
    return states


@contextlib.contextmanager
def frozen(pids: Iterable[int], timeout: float = 60) -> Iterator[None]:
    """SIGSTOP the processes and wait until all their threads have stopped; SIGCONT them on exit.

    While frozen a process runs no code: what a test reads of its run stays true, and a signal
    sent to it stays pending until it continues, then lands where it stopped. A test that must
    signal a run in its middle freezes it, checks that it is in the middle, then signals it: the
    signal cannot come after the run's end however late the test process gets the CPU.
    """
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # exited: the caller's checks will say so
            os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while not all(state in "TtZX" for pid in pids for state in _thread_states(pid)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes {pids} not stopped after {timeout:.0f} s")
            time.sleep(0.001)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _signal_mask(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    raise ValueError(f"/proc/{pid}/status has no {field}")


def catches(pid: int, sig: int) -> bool:
    """Whether `pid` has installed a handler for `sig` (until then its default action applies)."""
    return bool(_signal_mask(pid, "SigCgt") >> (sig - 1) & 1)


def pending(pid: int, sig: int) -> bool:
    """Whether `sig` was sent to `pid` and not yet delivered (e.g. while it is frozen)."""
    return bool((_signal_mask(pid, "ShdPnd") | _signal_mask(pid, "SigPnd")) >> (sig - 1) & 1)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    )


def read_wandb_run(run_dir: Path) -> dict:
    """The one offline W&B run under run_dir/wandb: its id, config and history rows.

    The .wandb file is a LevelDB-style log (32 KiB blocks, 7-byte record headers) of
    wandb_internal_pb2.Record messages; wandb 0.31 no longer ships a Python reader for it.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, chunks, pending = path.read_bytes(), 7, [], b""
    assert data.startswith(b":W&B"), path
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer or zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            chunks.append(pending)
    out: dict = {"config": {}, "history": []}
    for chunk in chunks:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(chunk)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
            out["config"] |= {i.key: json.loads(i.value_json) for i in rec.run.config.update}
        elif kind == "config":
            out["config"] |= {i.key: json.loads(i.value_json) for i in rec.config.update}
        elif kind == "history":
            out["history"].append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            )
    return out
