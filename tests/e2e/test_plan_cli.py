"""`python -m trainer.plan` as a user runs it, and the plan `trainer.train` checks at start (its
`perf` and `plan_check` events: tests/distributed/test_plan_accuracy.py)."""

from __future__ import annotations

from tests.helpers import run_module
from tests.unit.test_plan import SEVEN_B  # the README's worked example


def test_unknown_device_is_one_line_naming_the_known_ones(tmp_path, cli_env):
    proc = run_module("trainer.plan", [*SEVEN_B, "plan.device=h200"], tmp_path, cli_env)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: plan.device='h200'") and "h100-sxm" in line and "cpu" in line


def test_train_refuses_a_run_that_cannot_fit_before_building_it(tmp_path, cli_env):
    """A ~13B-parameter model on this machine's RAM: one line, exit 2, no config.yaml published."""
    big = ["debug=fast", "model.d_model=4096", "model.n_layer=64", "model.n_head=32", "run_dir=out"]
    proc = run_module("trainer.train", big, tmp_path, cli_env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the plan says this run does not fit") and "plan.check=false" in last
    assert not (tmp_path / "out" / "config.yaml").exists()
