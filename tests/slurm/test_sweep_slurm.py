"""A Hydra sweep through hydra-submitit-launcher on the real local cluster, then its summary."""

from __future__ import annotations

import csv
import re

import pytest
import yaml

from tests.helpers import assert_ok, kill_group, run_module, start_module
from tests.launch_helpers import job_info, losses, slurm, train_steps, wait_for

pytestmark = pytest.mark.slurm


def test_two_member_sweep_of_two_process_members(tmp_path, slurm_env):
    args = [
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=local",
        "hydra.launcher.tasks_per_node=2",  # each member: 2 ranks on one node
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        "name=lrs",
        "debug=fast",
        "engine=zero2",
        "max_steps=6",
        "optim.lr=1e-3,3e-3",
    ]
    proc = run_module("trainer.train", args, tmp_path, slurm_env, timeout=300)
    assert_ok(proc)
    sweep = tmp_path / "runs" / "sweeps" / "lrs"
    for num in (0, 1):
        member = sweep / str(num)
        cfg = yaml.safe_load((member / "config.yaml").read_text())
        assert cfg["run_dir"] == str(member)  # its own run dir, the same for both ranks
        assert cfg["logger"]["group"] == "lrs"  # one W&B group: the sweep
        assert len(losses(member)) == 6
        assert len(list((member / "checkpoints" / "step-6").glob("*optim_states.pt"))) == 2  # 2 ranks
    assert list((sweep / ".submitit").glob("*_0/*_0_log.out")), "submitted through submitit"

    proc = run_module("trainer.sweep", [str(sweep)], tmp_path, slurm_env)
    assert_ok(proc)
    assert "optim.lr=0.001" in proc.stdout and "optim.lr=0.003" in proc.stdout
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert sorted(r["overrides"] for r in rows) == ["optim.lr=0.001", "optim.lr=0.003"]
    assert [r["status"] for r in rows] == ["done", "done"]
    val = [float(r["val_loss"]) for r in rows]
    assert val == sorted(val)  # best first
    assert (sweep / "summary.md").read_text().count("| done |") == 2


def test_a_signalled_member_saves_requeues_itself_and_ends_like_an_uninterrupted_one(tmp_path, slurm_env):
    """USR2, what SLURM sends a submitit job before its time limit, to member 0 of two identical
    members (seed=0,0): it saves, requeues its own job and resumes; the sweep command waits for it."""
    steps = 60
    args = [
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=local",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        "name=pre",
        "debug=fast",
        f"max_steps={steps}",
        "eval_every=30",
        "checkpoint.every_steps=0",  # the only checkpoint before the end: the one the signal asks for
        "seed=0,0",
    ]
    proc = start_module("trainer.train", args, tmp_path, slurm_env)
    sweep = tmp_path / "runs" / "sweeps" / "pre"
    try:
        wait_for(lambda: len(train_steps(sweep / "0")) >= 3, 180, "sweep member 0 training", interval=0.02)
        (job_dir,) = (sweep / ".submitit").glob("*_0")  # <array job>_0: member 0's SLURM job
        slurm("scancel", "--signal=USR2", job_dir.name, env=slurm_env)
        out, err = proc.communicate(timeout=300)
    except BaseException:
        kill_group(proc)
        slurm("scancel", "--name=pre", env=slurm_env, check=False)
        raise
    assert proc.returncode == 0, (out + err)[-5000:]

    logs = "".join(p.read_text() for p in sorted(job_dir.glob("*_log.*")))
    assert f"requeued SLURM job {job_dir.name}" in logs, logs[-5000:]
    resumed = re.findall(r"resumed from \S+ at step (\d+)", logs)
    assert len(resumed) == 1 and 0 < int(resumed[0]) < steps, logs[-5000:]  # stopped in the middle
    assert job_info(job_dir.name, slurm_env)["Restarts"] == "1"
    (other,) = (sweep / ".submitit").glob("*_1")
    assert job_info(other.name, slurm_env)["Restarts"] == "0"
    # every step once, and the losses of the member that ran through
    assert train_steps(sweep / "0") == list(range(1, steps + 1))
    assert losses(sweep / "0") == pytest.approx(losses(sweep / "1"), rel=1e-6, abs=1e-7)
