"""`python -m trainer.train` as a user runs it: the run directory it leaves, and how it fails."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from tests.helpers import assert_ok, read_metrics, read_wandb_run, run_module

FAST = ["debug=fast", "max_steps=12", "eval_every=6", "checkpoint.every_steps=6"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, base_env):
    """One short run shared by the tests that only read what it left behind."""
    cwd = tmp_path_factory.mktemp("run")
    proc = run_module("trainer.train", [*FAST, "run_dir=out"], cwd, base_env)
    assert_ok(proc)
    return cwd / "out", proc


def test_run_dir_has_config_metrics_and_checkpoint(finished_run):
    run_dir, _ = finished_run
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["model"]["d_model"] == 32 and cfg["max_steps"] == 12  # nano preset + override, resolved
    assert cfg["data"]["seq_len"] == cfg["model"]["max_seq_len"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-12"
    for step in (6, 12):
        state = json.loads((run_dir / "checkpoints" / f"step-{step}" / "trainer_state.json").read_text())
        assert state["trainer"]["step"] == step
        assert state["loader"]  # the loader's position is part of the checkpoint


def test_loss_falls_and_every_step_is_logged(finished_run):
    run_dir, proc = finished_run
    train = read_metrics(run_dir)
    assert [e["step"] for e in train] == list(range(1, 13))
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, [e["loss"] for e in train]
    assert all(e["tokens_per_s"] > 0 and e["lr"] > 0 for e in train)
    assert train[-1]["tokens"] == 12 * 8 * 64
    optim = yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]  # the lr each step applied:
    assert train[0]["lr"] == pytest.approx(optim["lr"] / (optim["warmup_steps"] + 1))  # warmup's first
    assert train[-1]["lr"] == pytest.approx(optim["lr"] * optim["min_lr_ratio"])  # the floor, at the end
    evals = read_metrics(run_dir, "eval")
    assert [e["step"] for e in evals] == [6, 12]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert "train step     12/12 | loss" in proc.stdout  # the progress line a user sees


def test_zero0_logs_the_grad_norm_and_clips_like_deepspeed(tmp_path, cli_env, finished_run):
    """ZeRO-0 fp32 is DeepSpeed's plain path, which clips but drops the norm: the trainer clips
    there. Same run on ZeRO-0 and ZeRO-1 (the default): the same norms, the same losses; the norms
    exceed optim.grad_clip=1.0, so the clipping itself is compared too."""
    assert_ok(run_module("trainer.train", [*FAST, "engine=zero0", "run_dir=out"], tmp_path, cli_env))
    zero0, zero1 = read_metrics(tmp_path / "out"), read_metrics(finished_run[0])
    assert len(zero0) == len(zero1) == 12 and max(e["grad_norm"] for e in zero1) > 1.0
    for a, b in zip(zero0, zero1):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_restart_resumes_and_finishes(tmp_path, cli_env, finished_run):
    """Same run dir, higher max_steps: continues from step 12 instead of starting over."""
    run_dir = tmp_path / "out"
    shutil.copytree(finished_run[0], run_dir)
    proc = run_module("trainer.train", [*FAST, "run_dir=out"], tmp_path, cli_env)
    assert_ok(proc)
    assert "already complete" in proc.stderr
    assert len(read_metrics(run_dir)) == 12  # nothing was trained twice

    proc = run_module("trainer.train", [*FAST, "run_dir=out", "max_steps=14"], tmp_path, cli_env)
    assert_ok(proc)
    steps = [e["step"] for e in read_metrics(run_dir)]
    assert steps == list(range(1, 13)) + [13, 14]


def test_a_start_below_the_run_dirs_checkpoints_is_refused_and_changes_nothing(
    tmp_path, cli_env, finished_run
):
    """Starting over (or from an older checkpoint) inside a run_dir with later checkpoints would
    skip or prune its own saves among them; refused, and the way out the message names works."""
    run_dir = tmp_path / "out"
    shutil.copytree(finished_run[0], run_dir)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    six = run_dir / "checkpoints" / "step-6"
    for resume, later in (("none", "step-6, step-12"), (str(six), "step-12")):
        proc = run_module(
            "trainer.train", [*FAST, "run_dir=out", f"checkpoint.resume={resume}"], tmp_path, cli_env
        )
        err = _fails(proc, f"checkpoint.resume={resume}", f"({later})", "new run_dir")
        assert proc.returncode == 2 and err.strip().count("\n") == 0, err
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    # config.yaml too; logs/ holds each start's library lines (a refused start's as well)
    kept = {k: v for k, v in after.items() if k.name != ".config.yaml.new" and k.parts[0] != "logs"}
    assert kept == {k: v for k, v in before.items() if k.parts[0] != "logs"}

    proc = run_module(
        "trainer.train", [*FAST, "run_dir=branch", f"checkpoint.resume={six}"], tmp_path, cli_env
    )
    assert_ok(proc)
    assert [e["step"] for e in read_metrics(tmp_path / "branch")] == list(range(7, 13))


@pytest.mark.parametrize(
    "override, needles",
    [
        ("data.seed=1", ["data.seed", "seed=0", "seed=1"]),
        ("model.n_layer=3", ["does not fit this run's model", "model.*"]),
    ],
)
def test_resume_under_another_data_order_or_model_is_one_line(
    tmp_path, cli_env, finished_run, override, needles
):
    run_dir = tmp_path / "out"
    shutil.copytree(finished_run[0], run_dir)
    config = (run_dir / "config.yaml").read_bytes()
    proc = run_module("trainer.train", [*FAST, "run_dir=out", "max_steps=14", override], tmp_path, cli_env)
    err = _fails(proc, "checkpoint.resume", "step-12", *needles)
    assert proc.returncode == 2 and err.strip().count("\n") == 0, err
    assert (run_dir / "config.yaml").read_bytes() == config  # eval and export still rebuild the run's model


def _fails(proc, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    return proc.stderr


def test_typo_in_override_names_the_key(tmp_path, cli_env):
    proc = run_module("trainer.train", ["optim.lrr=0.1", "run_dir=out"], tmp_path, cli_env)
    _fails(proc, "optim.lrr")
    assert not (tmp_path / "out").exists()


def test_missing_group_option_lists_the_choices(tmp_path, cli_env):
    proc = run_module("trainer.train", ["model=huge", "run_dir=out"], tmp_path, cli_env)
    _fails(proc, "model/huge", "tiny")


def test_wrong_type_names_the_key(tmp_path, cli_env):
    proc = run_module("trainer.train", ["optim.lr=fast", "run_dir=out"], tmp_path, cli_env)
    _fails(proc, "optim.lr")


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.n_head=3", "model.n_head"),
        ("engine.zero_stage=4", "engine.zero_stage"),
        *([] if torch.cuda.is_available() else [("engine.precision=fp16", "engine.precision")]),
    ],
)
def test_impossible_value_is_one_line_exit_2_and_writes_nothing(tmp_path, cli_env, override, key):
    proc = run_module("trainer.train", ["debug=fast", override, "run_dir=out"], tmp_path, cli_env)
    err = _fails(proc, key)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: "), err
    assert not (tmp_path / "out").exists()


def test_world_size_that_does_not_fit_the_batch(tmp_path, cli_env):
    env = cli_env | {"WORLD_SIZE": "3"}
    proc = run_module("trainer.train", ["debug=fast", "run_dir=out"], tmp_path, env)
    _fails(proc, "global_batch_size=8", "world size 3")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()


def test_unwritable_run_dir(tmp_path, cli_env):
    (tmp_path / "file").write_text("not a directory")
    proc = run_module("trainer.train", ["debug=fast", "run_dir=file/run"], tmp_path, cli_env)
    err = _fails(proc, "run_dir=file/run", "not writable")
    assert proc.returncode == 2 and err.strip().count("\n") == 0


def test_dataset_prepared_for_another_seq_len(tmp_path, cli_env, finished_run, data_dir):
    prepared = next(data_dir.glob("builtin-seq*"))
    args = ["debug=fast", "data=prepared", f"data.path={prepared}", "data.seq_len=16", "run_dir=out"]
    proc = run_module("trainer.train", args, tmp_path, cli_env)
    _fails(proc, "data.seq_len=16")
    assert proc.returncode == 2


def test_wandb_offline_logs_the_resolved_config_and_metrics(tmp_path, cli_env):
    env = cli_env | {"WANDB_MODE": "offline", "WANDB_API_KEY": "fake-key-0123456789abcdef0123456789abcdef"}
    args = ["debug=fast", "max_steps=4", "logger=wandb", "logger.mode=offline", "run_dir=out"]
    proc = run_module("trainer.train", args, tmp_path, env)
    assert_ok(proc)
    run_dir = tmp_path / "out"
    wb = read_wandb_run(run_dir)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {k: v for k, v in wb["config"].items() if not k.startswith("_")} == resolved
    logged = [row["loss"] for row in wb["history"] if "loss" in row]
    assert logged == [e["loss"] for e in read_metrics(run_dir)]
    state = json.loads((run_dir / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["trainer"]["wandb_id"] == wb["run_id"]  # so a resumed run continues this W&B run
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert b"fake-key-0123456789" not in path.read_bytes(), path
