"""Which checkpoint a restart resumes from, and the step guard's rules (no DeepSpeed needed)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import trainer.checkpoint
from trainer.checkpoint import COMPLETE, STATE, check_start, complete_checkpoints, resume_dir
from trainer.config import CheckpointConfig, ConfigError, GuardConfig
from trainer.distributed import DistInfo
from trainer.guard import StepControl, TrainingHalted
from trainer.signals import StopSignal


def _step(root, n: int, complete: bool = True, name: str | None = None):
    d = root / "checkpoints" / (name or f"step-{n}")
    d.mkdir(parents=True)
    (d / STATE).write_text(json.dumps({"trainer": {"step": n, "tokens": 0}, "loader": {}, "world_size": 1}))
    if complete:
        (d / COMPLETE).write_text(json.dumps({"step": n}))  # no engine files: resume checks what is there
    return d


def test_auto_resume_takes_the_newest_complete_and_names_what_it_skips(tmp_path, caplog):
    _step(tmp_path, 5)
    newest = _step(tmp_path, 10)
    _step(tmp_path, 15, complete=False)  # died while renaming or writing COMPLETE
    _step(tmp_path, 20, complete=False, name="step-20.partial")  # died while writing shards
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert resume_dir(CheckpointConfig(), tmp_path) == newest
    assert "step-15" in caplog.text and "step-20.partial" in caplog.text


def test_latest_file_is_not_trusted_over_the_markers(tmp_path):
    good = _step(tmp_path, 2)
    _step(tmp_path, 4, complete=False)
    (tmp_path / "checkpoints" / "latest").write_text("step-4")
    assert resume_dir(CheckpointConfig(), tmp_path) == good


def test_no_checkpoint_and_resume_none(tmp_path):
    assert resume_dir(CheckpointConfig(), tmp_path) is None
    _step(tmp_path, 3)
    assert resume_dir(CheckpointConfig(resume="none"), tmp_path) is None


def test_explicit_resume_path_must_be_complete(tmp_path):
    partial = _step(tmp_path, 3, complete=False)
    with pytest.raises(ConfigError, match="checkpoint.resume="):
        resume_dir(CheckpointConfig(resume=str(partial)), tmp_path)
    assert resume_dir(CheckpointConfig(resume=str(_step(tmp_path, 4))), tmp_path).name == "step-4"


def test_a_start_below_complete_checkpoints_is_refused(tmp_path):
    """Its saves would be skipped (same step) or pruned first (older), and auto-resume would pick theirs."""
    six, twelve = _step(tmp_path, 6), _step(tmp_path, 12)
    for d, step in ((six, 6), (twelve, 12)):
        (d / STATE).write_text(json.dumps({"trainer": {"step": step}}))
    with pytest.raises(ConfigError, match=r"checkpoint.resume=none: .*\(step-6, step-12\).*new run_dir"):
        check_start(tmp_path, None, "none")
    with pytest.raises(ConfigError, match=r"\(step-12\)"):
        check_start(tmp_path, six, str(six))
    check_start(tmp_path, twelve, "auto")  # the newest: nothing later
    check_start(tmp_path / "elsewhere", six, str(six))  # a new run_dir may start from any checkpoint


def test_only_a_run_dirs_own_checkpoints_continue_its_wandb_run(tmp_path):
    own = _step(tmp_path / "run", 4)
    assert trainer.checkpoint.in_run_dir(own, tmp_path / "run")
    assert trainer.checkpoint.in_run_dir(
        tmp_path / "run" / "checkpoints" / ".." / "checkpoints" / "step-4", tmp_path / "run"
    )
    assert not trainer.checkpoint.in_run_dir(own, tmp_path / "branch")  # a branch starts its own


def test_a_prune_cut_short_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    old, new = _step(tmp_path, 2), _step(tmp_path, 4)

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # the process dies before the first file is deleted

    monkeypatch.setattr(trainer.checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.checkpoint._prune(tmp_path / "checkpoints", keep_last=1)
    assert old.is_dir() and complete_checkpoints(tmp_path / "checkpoints") == [new]


def _control(**guard) -> StepControl:
    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return StepControl(GuardConfig(**guard), one, StopSignal(), save_every_s=0)


def _feed(control: StepControl, losses: list[float]) -> list[bool]:
    drops = []
    for i, loss in enumerate(losses, start=1):
        control.step = i
        drops.append(control(torch.tensor(loss)))
    return drops


def test_spike_above_mean_plus_k_std_is_dropped_and_not_learned_from():
    control = _control(spike_k=4.0, spike_window=20, on_spike="skip")
    calm = [2.0 + 0.01 * (i % 5) for i in range(20)]
    assert _feed(control, calm) == [False] * 20
    assert _feed(control, [2.5]) == [True]  # mean ~2.02, std ~0.014: 2.5 is far out
    assert "spike" in control.drop_reason
    assert 2.5 not in control.window  # a dropped spike does not widen the band
    assert _feed(control, [2.03]) == [False]


def test_spike_with_stop_raises_naming_the_keys():
    control = _control(spike_k=3.0, on_spike="stop")
    _feed(control, [1.0, 1.1] * 10)
    with pytest.raises(TrainingHalted, match="guard.on_spike"):
        _feed(control, [9.0])


def test_nonfinite_loss_rules():
    assert _feed(_control(on_nonfinite="skip"), [1.0, math.inf, 1.0]) == [False, True, False]
    with pytest.raises(TrainingHalted, match="non-finite loss at step 2"):
        _feed(_control(), [1.0, math.nan])
    injected = _control(on_nonfinite="skip", inject_nan_at=[2])
    assert _feed(injected, [1.0, 1.0, 1.0]) == [False, True, False]


def test_stop_request_and_timed_save_are_reported():
    control = _control()
    control.stop.received = 10
    _feed(control, [1.0])
    assert control.stop_requested and not control.save_due
    timed = StepControl(GuardConfig(), control.dist, StopSignal(), save_every_s=1e-9)
    _feed(timed, [1.0])
    assert timed.save_due


def test_async_snapshot_copies_tensors_and_keeps_shapes():
    """ZeRO-3's checkpoints hold parameter shapes as torch.Size (zero_to_fp32 calls .numel() on them)."""
    from trainer.checkpoint import _HostPool, _snapshot

    t = torch.ones(3)
    state = {"param_shapes": [{"w": torch.Size([2, 3])}], "t": t, "pair": (t, 1)}
    snap = _snapshot(state, _HostPool())
    assert type(snap["param_shapes"][0]["w"]) is torch.Size and snap["param_shapes"][0]["w"].numel() == 6
    t.add_(1)  # the step loop moves on: the snapshot keeps the moment it was taken
    assert snap["t"].eq(1).all() and snap["pair"][0] is snap["t"]
