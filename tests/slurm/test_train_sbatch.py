"""slurm/train.sbatch on the real local cluster: 2 nodes x 1 process, preemption and requeue, failure."""

from __future__ import annotations

import re

import pytest

from tests.helpers import assert_ok
from tests.launch_helpers import (
    TORCHRUN_SH,
    job_logs,
    losses,
    run_script,
    sbatch,
    slurm,
    train_steps,
    wait_for,
    wait_job,
    wandb_run_ids,
)

pytestmark = pytest.mark.slurm

STEPS = 120  # long enough (several seconds) to be stopped in the middle
# ZeRO-2 over 2 ranks; global batch 8 = 2 ranks x micro 4, or 1 rank x micro 4 x 2 accumulation.
COMMON = ["debug=fast", "engine=zero2", f"max_steps={STEPS}", "eval_every=40", "checkpoint.every_steps=0"]


@pytest.fixture(scope="module")
def two_node_job(tmp_path_factory, slurm_env):
    """One uninterrupted 2-node job: the reference for the preemption test too."""
    cwd = tmp_path_factory.mktemp("two")
    job = sbatch(["--nodes=2", "--job-name=two"], COMMON, cwd, slurm_env)
    return cwd, job, wait_job(job, slurm_env)


def test_two_nodes_train_to_completion_like_one_node(two_node_job, tmp_path, slurm_env):
    cwd, job, info = two_node_job
    logs = job_logs(cwd, "two", job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs[-5000:]
    assert info["Restarts"] == "0", "a job that finished must not be requeued"
    for node in (0, 1):  # one torchrun per node, each with its own log
        node_log = (cwd / "logs" / f"two-{job}.node{node}.out").read_text()
        assert f"torchrun.sh: node {node} of 2" in node_log
    run_dir = cwd / "runs" / f"two-{job}"  # derived from the job
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    shards = list((run_dir / "checkpoints" / f"step-{STEPS}").glob("*optim_states.pt"))
    assert len(shards) == 2, "ZeRO-2: each of the 2 ranks saves its partition"

    # The same global batch on one node, one process: the same final loss.
    proc = run_script(TORCHRUN_SH, ["--nproc", "1", *COMMON, "run_dir=ref"], tmp_path, slurm_env)
    assert_ok(proc)
    assert losses(run_dir)[-1] == pytest.approx(losses(tmp_path / "ref")[-1], rel=1e-4, abs=1e-5)


def test_usr1_saves_requeues_resumes_and_finishes(two_node_job, tmp_path, slurm_env):
    env = slurm_env | {"WANDB_MODE": "offline", "WANDB_API_KEY": "fake-key-0123456789abcdef0123456789abcdef"}
    overrides = [*COMMON, "logger=wandb", "logger.mode=offline"]
    job = sbatch(["--nodes=2", "--job-name=pre"], overrides, tmp_path, env)
    run_dir = tmp_path / "runs" / f"pre-{job}"
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 3, 120, f"job {job} training", interval=0.02)
    except TimeoutError:
        slurm("scancel", job, env=env, check=False)
        raise
    slurm("scancel", "--signal=USR1", "--batch", job, env=env)  # what --signal=B:USR1@<s> sends
    info = wait_job(job, env)
    logs = job_logs(tmp_path, "pre", job)

    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs[-5000:]
    assert info["Restarts"] == "1", logs[-5000:]
    assert "requeueing job" in logs and f"job {job} attempt 2" in logs
    resumed = re.findall(r"resumed from \S+ at step (\d+)", logs)
    assert len(resumed) == 1 and 0 < int(resumed[0]) < STEPS, logs[-5000:]  # stopped in the middle
    # Every step once, and the loss sequence of the uninterrupted job.
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    cwd, ref_job, _ = two_node_job
    assert losses(run_dir) == pytest.approx(losses(cwd / "runs" / f"two-{ref_job}"), rel=1e-6, abs=1e-7)
    ids = wandb_run_ids(run_dir)
    assert len(ids) == 2 and len(set(ids)) == 1, f"one W&B run continued by the second attempt: {ids}"


def test_failing_job_is_not_requeued_and_its_error_is_logged(tmp_path, slurm_env):
    job = sbatch(["--nodes=1", "--job-name=bad"], ["debug=fast", "optim.lrr=0.1"], tmp_path, slurm_env)
    info = wait_job(job, slurm_env, timeout=120)
    logs = job_logs(tmp_path, "bad", job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", logs[-5000:]
    assert info["ExitCode"] != "0:0"
    node_log = (tmp_path / "logs" / f"bad-{job}.node0.out").read_text()
    assert "optim.lrr" in node_log  # the trainer's own error, in the node's log
    assert "not requeueing" in (tmp_path / f"bad-{job}.out").read_text()
