"""Run-level checkpoints: DeepSpeed's sharded engine state plus the trainer's own state.

Layout of ``<run_dir>/checkpoints/``:

    step-<N>/               DeepSpeed's files (one optimizer shard per rank under ZeRO),
                            trainer_state.json (step, tokens, loader position, W&B id, world size),
                            rng-rank<r>.pt, and COMPLETE, written last
    step-<N>.partial/       a save in progress (or one that died): never resumed from
    latest                  the newest complete step directory's name (for people and tools)

A save writes into ``step-<N>.partial``; once every rank has finished, rank 0 writes
``COMPLETE``, renames the directory to ``step-<N>``, then moves ``latest`` and deletes the
oldest complete checkpoints beyond ``keep_last``. Killing any process at any moment leaves
the previous complete checkpoint as the newest one that resume finds.

Loading: our own files load with ``weights_only=True``. DeepSpeed's shards are pickles that
DeepSpeed itself loads (with ``weights_only=False``): only resume from checkpoints you trust.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint_verify import COMPLETE, STATE, damage, file_sizes
from trainer.config import CheckpointConfig, ConfigError
from trainer.distributed import DistInfo, any_rank, barrier

log = logging.getLogger("trainer")

UNIVERSAL = "universal"  # DeepSpeed's world-size-independent form, converted on demand
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A save that could not complete; the message names the checkpoint that is still good."""


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step directories, oldest first."""
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / COMPLETE).is_file()]


def _step(step_dir: Path) -> int:
    return int(step_dir.name.split("-")[1])  # a name complete_checkpoints matched: step-<N>


def save(
    engine, run_dir: Path, step: int, trainer_state: dict[str, Any], dist: DistInfo, keep_last: int
) -> float:
    """Save every rank's shard and the trainer state, crash-safely; returns seconds it blocked."""
    t0 = time.perf_counter()
    root = checkpoint_root(run_dir)
    final, partial = root / f"step-{step}", root / f"step-{step}.partial"
    if (final / COMPLETE).is_file():  # e.g. a signal right after the periodic save of this step
        return 0.0
    if dist.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that died
        shutil.rmtree(final, ignore_errors=True)  # no COMPLETE: left by a deletion that died
        partial.mkdir(parents=True)
    barrier()
    try:
        torch.save(_rng_state(), partial / f"rng-rank{dist.rank}.pt")
        if dist.is_main:
            _write_json(partial / STATE, trainer_state | {"world_size": dist.world_size})
        # DeepSpeed writes its shards and synchronises the ranks; `latest` is ours to move.
        client = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        engine.save_checkpoint(str(root), tag=partial.name, client_state=client, save_latest=False)
        if dist.is_main:
            _fsync_tree(partial)
            _write_json(partial / COMPLETE, {"step": step, "time": time.time(), "files": file_sizes(partial)})
            os.replace(partial, final)
            _write_text(root / "latest", final.name)
            _prune(root, keep_last)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if dist.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # give back the space; it was never valid
        good = complete_checkpoints(root)
        intact = f"{good[-1]} is intact" if good else "there is no earlier checkpoint"
        free = shutil.disk_usage(root).free / 2**20
        msg = f"saving {final} failed on rank {dist.rank} ({type(e).__name__}: {str(e).splitlines()[0]}; "
        raise CheckpointError(msg + f"{free:.1f} MiB free there); {intact}") from None
    barrier()
    return time.perf_counter() - t0


def _prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
        (old / COMPLETE).unlink()  # first: a deletion cut short must not leave one that looks complete
        shutil.rmtree(old)
    for stale in root.glob("step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)  # only rank 0 saves, and it just finished


def resume_dir(cfg: CheckpointConfig, run_dir: Path, dist: DistInfo | None = None) -> Path | None:
    """The complete, intact step directory to resume from, or None to start fresh.

    ``auto``: the newest complete checkpoint that every rank finds intact; a damaged one is named,
    moved aside to ``step-<N>.damaged`` (its saves would collide with the resumed run's) and the
    next older one is tried. An explicit directory that is damaged stops the run, naming the file.
    """
    dist = dist or DistInfo(0, 1, 0, torch.device("cpu"))
    if cfg.resume == "none":
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not (path / COMPLETE).is_file() or not (path / STATE).is_file():
            raise ConfigError(
                f"checkpoint.resume={cfg.resume} is not a complete checkpoint (no {COMPLETE} and {STATE}): "
                "point it at <run_dir>/checkpoints/step-<N>"
            )
        problem = _agreed_damage(path, dist)
        if problem:
            raise ConfigError(
                f"checkpoint.resume={cfg.resume} is damaged ({problem}): point checkpoint.resume at "
                "another checkpoint (auto: the newest intact one)"
            )
        return path
    root = checkpoint_root(run_dir)
    complete = _rank0_list(complete_checkpoints(root), dist)  # the same candidates on every rank
    newest = _step(complete[-1]) if complete else -1
    for p in sorted(root.glob("step-*")):
        m = _STEP_DIR.match(p.name)
        if p not in complete and ".damaged" not in p.name and (m is None or int(m.group(1)) > newest):
            log.warning("skipping incomplete checkpoint %s (its save did not finish)", p)
    while complete:
        candidate = complete.pop()
        problem = _agreed_damage(candidate, dist)
        if problem is None:
            return candidate
        aside = _move_aside(candidate, dist)
        instead = f"resuming from {complete[-1].name} instead" if complete else "none older: starting over"
        if dist.is_main:
            log.warning(
                "checkpoint %s is damaged (%s); moved to %s; %s", candidate, problem, aside.name, instead
            )
    return None


def _agreed_damage(step_dir: Path, dist: DistInfo) -> str | None:
    """Damage any rank found in ``step_dir`` (the lowest such rank's finding), the same on every
    rank, so that a problem only one rank sees never splits the group."""
    mine = damage(step_dir, dist.rank, dist.world_size)
    if dist.world_size == 1:
        return mine
    found: list[str | None] = [None] * dist.world_size
    torch.distributed.all_gather_object(found, mine, group=dist.cpu_group)
    return next((f"{p} (seen by rank {r})" for r, p in enumerate(found) if p), None)


def _rank0_list(paths: list[Path], dist: DistInfo) -> list[Path]:
    if dist.world_size == 1:
        return paths
    box = [paths]
    torch.distributed.broadcast_object_list(box, src=0, group=dist.cpu_group)
    return box[0]


def _move_aside(step_dir: Path, dist: DistInfo) -> Path:
    """Rename a damaged checkpoint out of auto-resume's and pruning's way, keeping it to inspect."""
    aside, n = step_dir.with_name(step_dir.name + ".damaged"), 1
    while aside.exists():
        aside, n = step_dir.with_name(f"{step_dir.name}.damaged-{n}"), n + 1
    failed = None
    if dist.is_main:
        try:
            os.replace(step_dir, aside)
        except OSError as e:
            failed = e.strerror or type(e).__name__
    if any_rank([failed is not None], dist)[0]:  # every rank stops alike (a barrier too)
        raise ConfigError(
            f"checkpoint {step_dir} is damaged and could not be moved aside ({failed or 'on rank 0'}): "
            "move it out of checkpoints/ yourself, or set checkpoint.resume to an intact checkpoint"
        )
    return aside


def in_run_dir(step_dir: Path, run_dir: Path) -> bool:
    """Whether ``step_dir`` is one of ``run_dir``'s own checkpoints."""
    return checkpoint_root(run_dir).resolve() == step_dir.resolve().parent


def check_start(run_dir: Path, step_dir: Path | None, resume: str) -> None:
    """Refuse to start a run below complete checkpoints already in its run_dir.

    Its saves would collide with them: one at a step they hold would be skipped, older ones would
    be pruned first (keep_last counts by step), and auto-resume would later pick theirs.
    """
    start = -1 if step_dir is None else saved_state(step_dir)["trainer"]["step"]
    later = [p.name for p in complete_checkpoints(checkpoint_root(run_dir)) if _step(p) > start]
    if later:
        raise ConfigError(
            f"checkpoint.resume={resume}: run_dir={run_dir} already holds later checkpoints "
            f"({', '.join(later)}) that this run would overwrite and prune: use a new run_dir "
            "(checkpoint.resume can point into this one), or move them away"
        )


def saved_state(step_dir: Path) -> dict[str, Any]:
    """The trainer state a complete checkpoint holds: step, tokens, loader position, world size."""
    return json.loads((step_dir / STATE).read_text())


def saved_world_size(step_dir: Path) -> int:
    return saved_state(step_dir)["world_size"]


def universal_dir(step_dir: Path, dist: DistInfo) -> Path:
    """DeepSpeed's universal form of a checkpoint (any world size); converted once, by rank 0."""
    out = step_dir / UNIVERSAL
    if dist.is_main and not (out / COMPLETE).is_file():
        log.info("converting %s to a universal checkpoint for world size %d", step_dir, dist.world_size)
        tmp = step_dir / f"{UNIVERSAL}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir)]
        cmd += ["--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise CheckpointError(f"converting {step_dir} to a universal checkpoint failed: {tail[0]}")
        _write_json(tmp / COMPLETE, {"from": str(step_dir)})
        os.replace(tmp, out)
    barrier()
    return out


def load(engine, step_dir: Path, dist: DistInfo, universal: bool = False) -> dict[str, Any]:
    """Restore engine (weights, optimizer, LR schedule) and this rank's RNG; return the trainer state."""
    load_dir, tag = (step_dir, UNIVERSAL) if universal else (step_dir.parent, step_dir.name)
    groups = _group_hyperparameters(engine)
    try:
        path, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    except Exception as e:  # e.g. another model size (missing keys) or ZeRO stage (no optimizer shards)
        # (damage resume_dir's checks cannot see would also end here: DeepSpeed unpickles its shards)
        raise ConfigError(
            f"checkpoint.resume: {step_dir} does not fit this run's model or engine, or is damaged "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}): "
            "resume with the model.* and engine settings it was saved with, or start a new run_dir"
        ) from e
    if path is None:
        raise ConfigError(f"checkpoint.resume: DeepSpeed found no engine state in {step_dir}")
    if universal:
        # DeepSpeed 0.19's ZeRO-3 universal load copies param group 0's hyperparameters onto
        # every group, giving norms and embeddings weight decay; put each group's own back.
        for group, saved in zip(_inner_optimizer(engine).param_groups, groups):
            group.update(saved)
    rng = step_dir / f"rng-rank{dist.rank}.pt"
    if rng.is_file():  # absent for ranks a grown world did not have; dropout then draws anew
        try:
            _set_rng_state(torch.load(rng, weights_only=True))
        except Exception as e:  # checked by resume_dir; changed since, or a rank that did not check it
            msg = f"checkpoint.resume: {rng} is damaged ({type(e).__name__}): resume from another checkpoint"
            raise ConfigError(msg) from e
    return saved_state(step_dir)


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer


def _group_hyperparameters(engine) -> list[dict[str, Any]]:
    """Each param group's settings except its params and lr (the restored schedule sets lr)."""
    skip = ("params", "lr", "initial_lr")
    return [{k: v for k, v in g.items() if k not in skip} for g in _inner_optimizer(engine).param_groups]


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers never see a half-written file


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2))


def _fsync_tree(directory: Path) -> None:
    """Make the shards durable before COMPLETE claims they are (a crash of the machine, not just
    of the process, must not leave a COMPLETE checkpoint with missing data)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
