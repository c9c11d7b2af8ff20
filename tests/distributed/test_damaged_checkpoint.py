"""A checkpoint damaged after its save completed: every file it holds, one at a time, missing,
truncated, overwritten with garbage, or with garbage in the middle (same size).

One real 2-rank checkpoint (ZeRO-1: DeepSpeed's shards, both ranks' RNG, the trainer state) is
saved once; each case damages a copy. Which checkpoint a restart picks is decided before anything
is built (``checkpoint.resume_dir``), so the cases run in-process; two restarts through the CLI
show the whole path: no traceback, one line, and the run continues from the older checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import assert_ok, read_metrics, run_module, torchrun
from trainer.checkpoint import check_start, resume_dir
from trainer.config import CheckpointConfig, ConfigError

pytestmark = pytest.mark.distributed

RUN = ["-m", "trainer.train", "debug=fast", "max_steps=2", "log_every=1", "eval_every=0",
       "checkpoint.every_steps=1", "run_dir=run"]  # fmt: skip
# Every file of a 2-rank ZeRO-1 step directory (the first test checks the list against a real one).
FILES = [
    "COMPLETE",
    "trainer_state.json",
    "rng-rank0.pt",
    "rng-rank1.pt",
    "mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "zero_pp_rank_1_mp_rank_00_optim_states.pt",
]
DAMAGES = ["missing", "truncated", "garbage", "garbage-inside"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, base_env) -> Path:
    """A 2-rank run with complete checkpoints at steps 1 and 2."""
    cwd = tmp_path_factory.mktemp("saved")
    assert_ok(torchrun(2, RUN, cwd, base_env))
    return cwd / "run"


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(how + path.name)
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(rng.randbytes(len(data)))
    else:  # a few bytes in the middle: same size, and a torch file still opens as a zip archive
        mid, n = len(data) // 2, max(1, min(64, len(data) // 4))
        data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
        path.write_bytes(bytes(data))


def copy_run(saved: Path, dest: Path) -> Path:
    shutil.copytree(saved, dest / "run")
    return dest / "run"


def test_the_cases_cover_every_file_of_a_real_checkpoint(saved):
    for step in (1, 2):
        assert sorted(p.name for p in (saved / "checkpoints" / f"step-{step}").iterdir()) == sorted(FILES)
    listed = json.loads((saved / "checkpoints" / "step-2" / "COMPLETE").read_text())["files"]
    assert sorted(listed) == sorted(set(FILES) - {"COMPLETE"})


def test_an_intact_checkpoint_is_taken_without_a_warning(saved, tmp_path, caplog):
    run = copy_run(saved, tmp_path)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert resume_dir(CheckpointConfig(), run) == run / "checkpoints" / "step-2"
        assert resume_dir(CheckpointConfig(resume=str(run / "checkpoints" / "step-1")), run).name == "step-1"
    assert not caplog.records


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", FILES)
def test_auto_resume_names_the_damage_and_falls_back(saved, tmp_path, caplog, name, how):
    run = copy_run(saved, tmp_path)
    ckpts = run / "checkpoints"
    damage(ckpts / "step-2" / name, how)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert resume_dir(CheckpointConfig(), run) == ckpts / "step-1"
    (record,) = caplog.records
    msg = record.getMessage()
    assert "\n" not in msg
    if name == "COMPLETE" and how == "missing":  # indistinguishable from a save that did not finish
        assert "incomplete checkpoint" in msg and (ckpts / "step-2").is_dir()  # the next save replaces it
    else:
        assert f"step-2 is damaged ({name}: " in msg and "resuming from step-1 instead" in msg, msg
        assert not (ckpts / "step-2").exists() and (ckpts / "step-2.damaged").is_dir()  # kept to inspect
    check_start(run, ckpts / "step-1", "auto")  # nothing later left to collide with the run's saves
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert resume_dir(CheckpointConfig(), run) == ckpts / "step-1"  # and the next restart is quiet
    assert all("incomplete" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", FILES)
def test_an_explicit_damaged_checkpoint_stops_naming_the_file(saved, tmp_path, name, how):
    run = copy_run(saved, tmp_path)
    step2 = run / "checkpoints" / "step-2"
    damage(step2 / name, how)
    with pytest.raises(ConfigError) as err:
        resume_dir(CheckpointConfig(resume=str(step2)), tmp_path / "new")
    msg = str(err.value)
    assert msg.startswith(f"checkpoint.resume={step2} is ") and "\n" not in msg
    assert name in msg or (name == "COMPLETE" and how == "missing" and "not a complete checkpoint" in msg)
    assert step2.is_dir()  # a checkpoint named explicitly is left where it is


@pytest.mark.slow
def test_damage_one_rank_sees_moves_both_ranks_to_the_older_checkpoint(saved, tmp_path, base_env):
    """Rank r verifies the zip contents of every W-th torch file (sorted by name): rank 1 alone
    reads rank 0's optimizer shard. A same-size flip inside it must still send both ranks back."""
    run = copy_run(saved, tmp_path)
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert name in sorted(n for n in FILES if n.endswith(".pt"))[1::2]
    damage(run / "checkpoints" / "step-2" / name, "garbage-inside")
    proc = torchrun(2, [*RUN[:-1], "max_steps=3", "run_dir=run"], tmp_path, base_env, timeout=300)
    assert_ok(proc)
    assert "Traceback" not in proc.stderr + proc.stdout
    (line,) = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "is damaged" in ln]
    assert name in line and "seen by rank 1" in line and "resuming from step-1 instead" in line
    out = proc.stderr + proc.stdout
    assert re.findall(r"resumed from \S*/(step-\d+) at step (\d+)", out) == [("step-1", "1")]
    assert [e["step"] for e in read_metrics(run)] == [1, 2, 3]  # steps 2 and 3 trained again
    assert (run / "checkpoints" / "step-3" / "COMPLETE").is_file()


def test_explicit_damaged_checkpoint_through_the_cli_is_one_line(saved, tmp_path, base_env):
    step2 = copy_run(saved, tmp_path) / "checkpoints" / "step-2"
    damage(step2 / "rng-rank1.pt", "truncated")
    args = [*RUN[2:-1], "max_steps=3", "run_dir=branch", f"checkpoint.resume={step2}"]
    proc = run_module("trainer.train", args, tmp_path, base_env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint.resume={step2} is damaged (rng-rank1.pt:"), proc.stderr
