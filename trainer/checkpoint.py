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

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trainer.checkpoint_verify import COMPLETE, STATE, damage, file_sizes
from trainer.config import CheckpointConfig, ConfigError
from trainer.distributed import DistInfo, any_rank, barrier, gather_to_main
from trainer.guard import TrainingHalted

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
    _prepare(partial, final, dist)
    try:
        _write_own_files(partial, trainer_state, dist)
        _save_engine(engine, root, partial)  # DeepSpeed writes its shards and synchronises the ranks
        if dist.is_main:
            _publish(root, partial, final, step, keep_last)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise _failure(root, partial, final, dist, f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    barrier()
    return time.perf_counter() - t0


def _prepare(partial: Path, final: Path, dist: DistInfo) -> None:
    if dist.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that died
        shutil.rmtree(final, ignore_errors=True)  # no COMPLETE: left by a deletion that died
        partial.mkdir(parents=True)
    barrier()


def _write_own_files(partial: Path, trainer_state: dict[str, Any], dist: DistInfo) -> list[Path]:
    """This rank's RNG state and (rank 0) the trainer state: small, written in the step loop."""
    written = [partial / f"rng-rank{dist.rank}.pt"]
    torch.save(_rng_state(), written[0])
    if dist.is_main:
        written.append(partial / STATE)
        _write_json(written[-1], trainer_state | {"world_size": dist.world_size})
    return written


def _save_engine(engine, root: Path, partial: Path) -> None:
    # `latest` is ours to move, once the checkpoint is complete.
    client = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
    engine.save_checkpoint(str(root), tag=partial.name, client_state=client, save_latest=False)


def _publish(root: Path, partial: Path, final: Path, step: int, keep_last: int) -> None:
    """Rank 0, once every rank's files are written: make them durable, then claim they are."""
    _fsync_tree(partial)
    _write_json(partial / COMPLETE, {"step": step, "time": time.time(), "files": file_sizes(partial)})
    os.replace(partial, final)
    _write_text(root / "latest", final.name)
    _prune(root, keep_last)


def _failure(
    root: Path, partial: Path, final: Path, dist: DistInfo, why: str, rank: int | None = None
) -> CheckpointError:
    """The one-line error of a save that failed (on ``rank``, this one by default), naming what is intact."""
    if dist.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # give back the space; it was never valid
    good = complete_checkpoints(root)
    intact = f"{good[-1]} is intact" if good else "there is no earlier checkpoint"
    free = shutil.disk_usage(root).free / 2**20
    msg = f"saving {final} failed on rank {dist.rank if rank is None else rank} ({why}; "
    return CheckpointError(msg + f"{free:.1f} MiB free there); {intact}")


@dataclass
class _Write:
    """A save whose snapshot is taken and whose files are being written in the background."""

    step: int
    partial: Path
    final: Path
    started: float
    thread: threading.Thread | None = None
    error: str | None = None  # set by the thread: why this rank's write failed
    write_s: float = 0.0  # set by the thread: how long this rank's write took


class Saver:
    """Checkpoint saves for the step loop: synchronous, or asynchronous (``checkpoint.async_save``).

    An asynchronous save blocks the loop only while DeepSpeed's state dicts are copied to host
    memory (our CheckpointEngine, below, stands in for DeepSpeed's during the call); a
    background thread then writes and fsyncs this rank's files through DeepSpeed's own engine.
    ``poll`` (every step) publishes the save, with the same steps as a synchronous one, once
    every rank's write is durable: one small collective per step while a write is in flight,
    so every rank agrees on when (and whether) it is complete. At most one save is in flight:
    the next one first waits for it. A failed write (any rank) stops every rank with one line
    naming the intact checkpoint; a process killed mid-write leaves only ``step-<N>.partial``.
    """

    def __init__(
        self,
        dist: DistInfo,
        root: Path,
        keep_last: int,
        asynchronous: bool,
        log_event: Callable[[dict[str, Any]], None] = lambda event: None,
    ) -> None:
        self.dist, self.root, self.keep_last, self.asynchronous = dist, root, keep_last, asynchronous
        self.log_event = log_event  # gets each publication's metrics event
        self.pool = _HostPool()
        self.pending: _Write | None = None

    def save(self, engine, step: int, trainer_state: dict[str, Any]) -> dict[str, float]:
        """Save at ``step``; returns ``blocked_s`` (all the loop waited) and ``wait_s`` (of that, for
        the previous save's write, if it was still running: saves come faster than they write)."""
        t0 = time.perf_counter()
        if not self.asynchronous:
            blocked = save(engine, self.root.parent, step, trainer_state, self.dist, self.keep_last)
            return {"blocked_s": blocked, "wait_s": 0.0}
        busy = self.pending is not None and self.pending.thread is not None and self.pending.thread.is_alive()
        if busy:
            log.info("checkpoint at step %d waits for the write of step %d", step, self.pending.step)
        self.finish()  # at most one in flight
        waited = time.perf_counter() - t0 if busy else 0.0
        final, partial = self.root / f"step-{step}", self.root / f"step-{step}.partial"
        if (final / COMPLETE).is_file():
            return {"blocked_s": time.perf_counter() - t0, "wait_s": waited}
        _prepare(partial, final, self.dist)
        try:
            own = _write_own_files(partial, trainer_state, self.dist)
            snapshots = _SnapshotEngine(engine.checkpoint_engine, self.pool)
            engine.checkpoint_engine, inner = snapshots, engine.checkpoint_engine
            # The copies are memory-bound, and each of them run on several threads waits for
            # the slowest: on a busy host one thread took 0.5 s for 505 MiB where two took 1-2 s.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                _save_engine(engine, self.root, partial)
            finally:
                engine.checkpoint_engine = inner
                torch.set_num_threads(threads)
        except (OSError, RuntimeError) as e:
            raise _failure(
                self.root, partial, final, self.dist, f"{type(e).__name__}: {str(e).splitlines()[0]}"
            ) from None
        write = _Write(step, partial, final, time.perf_counter())
        write.thread = threading.Thread(
            target=self._write,
            args=(write, inner, snapshots.files, own),
            name=f"checkpoint-{step}",
            daemon=True,
        )
        write.thread.start()
        self.pending = write
        return {"blocked_s": time.perf_counter() - t0, "wait_s": waited}

    def _write(self, write: _Write, inner, files: list[tuple[Any, str]], own: list[Path]) -> None:
        # The step loop's threads come first; the write takes what they leave. Measured on 2
        # busy cores: at nice 10 the steps during a write ran +141% slower (its bursts stall
        # their 2-thread parallel regions), at nice 19 +1.5%, the write taking 52 s, not 9 s.
        _lower_priority()
        try:
            for state, path in files:
                inner.save(state, path)  # DeepSpeed's own writer (torch.save, its serialization)
                _fsync(Path(path))
            for path in own:
                _fsync(path)
        except BaseException as e:  # noqa: BLE001 - any failure is reported by the loop, on every rank
            write.error = f"{type(e).__name__}: {(str(e).splitlines() or ['no message'])[0]}"
        finally:
            files.clear()  # the snapshot's buffers go back to the pool
            write.write_s = time.perf_counter() - write.started

    def poll(self, block: bool = False) -> None:
        """Publish the save in flight if every rank has written it (``block``: wait for that).

        Every rank calls it at the same steps: while a write is in flight it is a collective.
        """
        write = self.pending
        if write is None or write.thread is None:
            return
        if block:
            write.thread.join()
        running, failed = any_rank([write.thread.is_alive(), write.error is not None], self.dist)
        if running:
            return
        self.pending = None
        self.pool.release()
        if failed:
            errors = gather_to_main(write.error, self.dist) or []
            why, rank = write.error, None
            if why is None:  # another rank's write failed: rank 0 names it
                rank, why = next(
                    ((r, e) for r, e in enumerate(errors) if e), (None, "another rank's write failed")
                )
            raise _failure(self.root, write.partial, write.final, self.dist, why, rank)
        error = None
        if self.dist.is_main:
            try:
                _publish(self.root, write.partial, write.final, write.step, self.keep_last)
            except OSError as e:
                error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        if any_rank([error is not None], self.dist)[0]:
            why = error or "rank 0 could not publish it"
            raise _failure(self.root, write.partial, write.final, self.dist, why, rank=0)
        self.log_event({"event": "checkpoint_complete", "step": write.step, "write_s": write.write_s})

    def finish(self) -> None:
        """Wait for the save in flight and publish it (every rank, at the same point)."""
        self.poll(block=True)

    def __enter__(self) -> Saver:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        # The run ends (or the guard halted every rank at the same step: its save in flight
        # predates the bad step): publish it. Any other error may be one rank's alone, where a
        # collective would hang; its save stays a .partial that resume skips.
        if kind is None or issubclass(kind, TrainingHalted):
            self.finish()


class _SnapshotEngine:
    """Stands in for DeepSpeed's checkpoint engine (its CheckpointEngine interface) during an
    asynchronous save: each state dict DeepSpeed hands over is copied to host memory (the step
    loop may change the original as soon as ``save_checkpoint`` returns) and kept, with its
    path, for the background write. Everything else is DeepSpeed's own engine's."""

    def __init__(self, inner, pool: _HostPool) -> None:
        self.inner, self.pool = inner, pool
        self.files: list[tuple[Any, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        self.files.append((_snapshot(state_dict, self.pool), path))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies into pinned memory have landed

    def commit(self, info) -> bool:
        return True  # publication is the Saver's, once every rank's write is durable

    def preserves_storage_sharing(self) -> bool:
        return False  # the snapshot copies each tensor on its own: no clone needed first


class _HostPool:
    """Host buffers for snapshots, kept for the next save (allocating and faulting in a state's
    worth of memory, pinned on GPUs, would cost as much as the copy)."""

    def __init__(self) -> None:
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.used: list[tuple[tuple, torch.Tensor]] = []

    def take(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.numel(), like.dtype, pin_memory(like.device))
        free = self.free.get(key)
        buf = free.pop() if free else torch.empty(like.numel(), dtype=like.dtype, pin_memory=key[2])
        self.used.append((key, buf))
        return buf.view(like.shape)

    def release(self) -> None:
        """The write that used the buffers is done: the next snapshot may overwrite them."""
        for key, buf in self.used:
            self.free.setdefault(key, []).append(buf)
        self.used = []


def _lower_priority(niceness: int = 19) -> None:
    """Lower the calling thread's CPU priority (Linux: nice is per thread; elsewhere a no-op)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


def pin_memory(device: torch.device) -> bool:
    """Snapshots of GPU tensors go to pinned host memory (fast, asynchronous copies)."""
    return device.type == "cuda"


def _snapshot(obj: Any, pool: _HostPool, memo: dict | None = None) -> Any:
    """A host copy of a state dict: tensors copied (views of one storage stay shared), containers
    rebuilt, other values deep-copied, so that nothing the step loop changes later reaches it."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride(), obj.dtype)
        if key not in memo:
            out = pool.take(obj)
            out.copy_(obj.detach(), non_blocking=pin_memory(obj.device))
            if isinstance(obj, torch.nn.Parameter):
                out = torch.nn.Parameter(out, requires_grad=obj.requires_grad)
            memo[key] = out
        return memo[key]
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type and attributes (a module state dict's _metadata)
        for k, v in obj.items():
            out[k] = _snapshot(v, pool, memo)
        return out
    if isinstance(obj, list):
        return [_snapshot(v, pool, memo) for v in obj]
    if type(obj) is tuple:  # only plain tuples: torch.Size (param shapes) and namedtuples keep their type
        return tuple(_snapshot(v, pool, memo) for v in obj)
    return copy.deepcopy(obj)


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
            _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
