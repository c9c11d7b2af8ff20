"""`python -m trainer.plan` as a user runs it, and the plan `trainer.train` checks at start."""

from __future__ import annotations

from tests.helpers import assert_ok, read_metrics, run_module

SEVEN_B = [
    "model=llama-7b",
    "engine=zero3",
    "engine.precision=bf16",
    "data.seq_len=4096",
    "global_batch_size=64",
    "micro_batch_size=1",
    "max_steps=1000",
    "plan.device=h100-sxm",
    "plan.gpus_per_node=8",
    "plan.nodes=2",
]


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


def test_train_logs_the_plan_and_its_peak_memory(tmp_path, cli_env):
    proc = run_module(
        "trainer.train", ["debug=fast", "max_steps=3", "eval_every=0", "run_dir=out"], tmp_path, cli_env
    )
    assert_ok(proc)
    (perf,) = read_metrics(tmp_path / "out", "perf")
    plan = perf["plan"]
    assert plan["device"] == "cpu" and plan["fits"] and plan["items_gb"]["process baseline"] > 0.1
    (check,) = read_metrics(tmp_path / "out", "plan_check")
    # nano: the process is all of it (the 15% target is for models that dominate it: tests/distributed)
    assert check["planned_gb"] == plan["memory_gb"] and 0.75 < check["ratio"] < 1.25
