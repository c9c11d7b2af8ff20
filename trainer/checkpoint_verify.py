"""Is a complete checkpoint still intact? Checked before resuming from it, so that a file damaged
after its save (truncated, overwritten, deleted) is found and named before anything loads it.

- ``COMPLETE`` lists every file of the step directory with its size (``file_sizes``, at save):
  a missing or resized file is damage. Checkpoints saved before that list existed are checked
  file by file without it.
- ``COMPLETE`` and ``trainer_state.json`` must parse and agree on the step.
- Every torch file (DeepSpeed's shards, ``rng-rank<r>.pt``) must be a readable zip archive whose
  entries match their CRC-32: torch itself reads damaged bytes silently. This reads each file
  once; the ranks split the files between them (rank r takes every W-th), so a resume reads the
  checkpoint about twice in all. RNG states also load (``weights_only=True``).

``damage`` returns the first problem found as one line naming the file, or None.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"
STATE = "trainer_state.json"


def file_sizes(step_dir: Path) -> dict[str, int]:
    """Every file under ``step_dir`` (relative path -> bytes), for ``COMPLETE`` to list."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    return {str(p.relative_to(step_dir)): p.stat().st_size for p in files}


def damage(step_dir: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """The first damage found in complete checkpoint ``step_dir``, as ``<file>: <what>``, or None.

    Every rank checks the JSON files and sizes; the zip contents of the torch files are split
    between the ranks. A file the checkpoint's own list does not name (e.g. ``universal/``, made
    later) is not checked here.
    """
    try:
        marker = _json(step_dir / COMPLETE)
        state = _json(step_dir / STATE)
    except _Damaged as e:
        return str(e)
    if not isinstance(marker, dict) or not isinstance(state, dict):
        return f"{COMPLETE if not isinstance(marker, dict) else STATE}: not a JSON object"
    problem = _state_problem(state, marker, _step_of(step_dir))
    if problem:
        return problem
    listed = marker.get("files")
    if isinstance(listed, dict):
        for name, size in listed.items():
            path = step_dir / name
            if not path.is_file():
                return f"{name}: missing"
            if path.stat().st_size != size:
                return f"{name}: {path.stat().st_size} bytes, saved with {size} (truncated or overwritten)"
        torch_files = sorted(n for n in listed if n.endswith(".pt"))
    else:  # saved before COMPLETE listed the files: check the ones that are there
        torch_files = sorted(str(p.relative_to(step_dir)) for p in step_dir.glob("*.pt"))
        for r in range(state["world_size"]):
            if not (step_dir / f"rng-rank{r}.pt").is_file() and torch_files:
                return f"rng-rank{r}.pt: missing"
    for name in torch_files[rank::world_size]:
        problem = _torch_file_problem(step_dir / name)
        if problem:
            return f"{name}: {problem}"
    return None


class _Damaged(Exception):
    pass


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise _Damaged(f"{path.name}: missing") from None
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise _Damaged(f"{path.name}: unreadable ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:80]}" if text else type(e).__name__


def _step_of(step_dir: Path) -> int | None:
    tail = step_dir.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _state_problem(state: dict, marker: dict, dir_step: int | None) -> str | None:
    trainer, loader, world = state.get("trainer"), state.get("loader"), state.get("world_size")
    if not isinstance(trainer, dict) or not isinstance(loader, dict):
        return f"{STATE}: no trainer or loader state"
    step, tokens = trainer.get("step"), trainer.get("tokens")
    if not (isinstance(step, int) and isinstance(tokens, int) and isinstance(world, int) and world >= 1):
        return f"{STATE}: step, tokens or world_size missing or not whole numbers"
    if dir_step is not None and step != dir_step:
        return f"{STATE}: step {step} in a directory of step {dir_step}"
    if "step" in marker and marker["step"] != step:
        return f"{COMPLETE}: step {marker['step']}, but {STATE} holds step {step}"
    return None


def _torch_file_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every entry, checks its CRC-32
    except FileNotFoundError:
        return "missing"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"not a readable torch file ({_first_line(e)})"
    if bad is not None:
        return f"corrupt data in its entry {bad} (CRC mismatch)"
    if path.name.startswith("rng-rank"):
        try:
            rng = torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to load is damage, named in one line
            return f"does not load ({type(e).__name__})"
        if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
            return "holds no CPU RNG state"
    return None
