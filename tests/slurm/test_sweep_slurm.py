"""A Hydra sweep through hydra-submitit-launcher on the real local cluster, then its summary."""

from __future__ import annotations

import csv

import pytest
import yaml

from tests.helpers import assert_ok, run_module
from tests.launch_helpers import losses

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
