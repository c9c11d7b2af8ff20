"""Run-level checkpoints: DeepSpeed's sharded engine state plus the trainer's own state.

Layout: ``<run_dir>/checkpoints/step-<N>/`` holds DeepSpeed's files, ``trainer_state.json``
(step, tokens, loader position, W&B id) and one ``rng-rank<r>.pt`` per rank;
``<run_dir>/checkpoints/latest`` names the newest step directory and is written last.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from trainer.config import CheckpointConfig, ConfigError
from trainer.distributed import DistInfo, barrier

log = logging.getLogger("trainer")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save(engine, run_dir: Path, step: int, trainer_state: dict[str, Any], dist: DistInfo) -> Path:
    """Save every rank's shard and the trainer state; DeepSpeed moves `latest` after all ranks wrote."""
    root = checkpoint_root(run_dir)
    step_dir = root / f"step-{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), step_dir / f"rng-rank{dist.rank}.pt")
    if dist.is_main:
        _write_json(step_dir / "trainer_state.json", trainer_state)
    barrier()
    # DeepSpeed writes its shards, then `latest` (rank 0), then synchronises the ranks.
    engine.save_checkpoint(str(root), tag=step_dir.name)
    return step_dir


def resume_dir(cfg: CheckpointConfig, run_dir: Path) -> Path | None:
    """The step directory to resume from, or None to start fresh."""
    if cfg.resume == "none":
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(
                f"checkpoint.resume={cfg.resume} is not a checkpoint step directory "
                "(no trainer_state.json): point it at <run_dir>/checkpoints/step-<N>"
            )
        return path
    latest = checkpoint_root(run_dir) / "latest"
    if not latest.is_file():
        return None
    step_dir = latest.parent / latest.read_text().strip()
    if not (step_dir / "trainer_state.json").is_file():
        log.warning("checkpoint %s named by %s is incomplete; starting fresh", step_dir, latest)
        return None
    return step_dir


def load(engine, step_dir: Path, dist: DistInfo) -> dict[str, Any]:
    """Restore engine (weights, optimizer, LR schedule) and this rank's RNG; return the trainer state."""
    path, _ = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name)
    if path is None:
        raise ConfigError(f"checkpoint.resume: DeepSpeed found no engine state in {step_dir}")
    rng = step_dir / f"rng-rank{dist.rank}.pt"
    if rng.is_file():  # absent when the world size grew; the data order does not depend on it
        _set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((step_dir / "trainer_state.json").read_text())


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)  # readers never see a half-written file
