"""Run the launchers (launch/, slurm/) as a user would, and read what their runs leave behind."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SBATCH = REPO / "slurm" / "train.sbatch"
LOCAL_CLUSTER = REPO / "slurm" / "local-cluster.sh"
EXIT_REQUEUE = 85


def launcher_env(base: dict[str, str]) -> dict[str, str]:
    """The scripts run this interpreter, one thread per process (2 cores, several processes)."""
    return base | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TRAINER_HOME": str(REPO)}


def free_port() -> int:
    """A port nothing listens on, for a process that binds it seconds later (after importing torch).

    Not one the kernel picks (bind to port 0): it hands out the same ephemeral range to every
    socket other processes bind to port 0 or connect from (the other xdist worker's torchrun
    stores and gloo connections), so one of them may take the port before it is bound. A free
    port below that range goes only to an explicit bind, and nothing else in the suite binds
    these (SLURM: 17000-17002 and 20000 + job id; accelerate: 29500).
    """
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    outside = [port for port in range(10_000, 17_000) if not low <= port <= high]
    for port in random.Random().sample(outside, len(outside)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
            return port
    with socket.socket() as s:  # an ephemeral range that covers them all: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: Path, args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600):
    return subprocess.run(
        ["bash", str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def losses(run_dir: Path) -> list[float]:
    events = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [e["loss"] for e in events if e["event"] == "train"]


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # being written
            continue
        if event["event"] == "train":
            steps.append(event["step"])
    return steps


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(interval)


# --- the local SLURM cluster (slurm/local-cluster.sh) ---------------------------------------


def slurm(*args: str, env: dict[str, str], check: bool = True) -> str:
    proc = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def sbatch(sbatch_args: list[str], overrides: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Submit slurm/train.sbatch to the local cluster (its partition, no GPUs); the job id."""
    local = ["--partition=local", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
    proc = subprocess.run(
        ["sbatch", "--parsable", *local, *sbatch_args, str(SBATCH), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_info(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); accounting is off here."""
    out = slurm("scontrol", "show", "job", "-o", job_id, env=env)
    return dict(re.findall(r"(\w+)=(\S*)", out))


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def wait_job(job_id: str, env: dict[str, str], timeout: float = 240) -> dict[str, str]:
    """Wait until the job has ended for good (a requeued job passes through PENDING again)."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id, env)
        if info.get("JobState") in FINAL_STATES:
            return info
        if time.monotonic() > deadline:
            slurm("scancel", job_id, env=env, check=False)
            raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s: {info}")
        time.sleep(1)


def job_logs(cwd: Path, name: str, job_id: str) -> str:
    """The batch script's log and every node's log of one job, for assertion messages."""
    paths = [cwd / f"{name}-{job_id}.out", *sorted((cwd / "logs").glob(f"{name}-{job_id}.node*.out"))]
    return "\n".join(f"==> {p.name}\n{p.read_text()}" for p in paths if p.is_file())


def wandb_run_ids(run_dir: Path) -> list[str]:
    """One offline-run-<time>-<id> dir per attempt that logged to W&B; their ids."""
    return [p.name.rsplit("-", 1)[1] for p in sorted(run_dir.glob("wandb/offline-run-*"))]


def cluster_env(base: dict[str, str]) -> dict[str, str]:
    state = os.environ.get("TRAINER_SLURM_DIR", "/tmp/trainer-slurm")
    return base | {"SLURM_CONF": f"{state}/slurm.conf"}
