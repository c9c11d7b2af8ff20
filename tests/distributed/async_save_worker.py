"""Run under torchrun: asynchronous saves of a real engine, against a synchronous save.

    torchrun ... tests/distributed/async_save_worker.py <out_dir> [hydra overrides]

Every rank writes ``<out_dir>/rank<r>.json`` with what the test checks: whether the async save
holds exactly what a synchronous save of the same moment holds although the step loop changed
the state while it was written, the metrics events, and how long back-to-back saves waited.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.distributed import init_distributed
from trainer.loop import build_run, train_step
from trainer.train import load_config


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a loaded state dict, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return {k: v for key, val in items for k, v in tensors(val, f"{prefix}/{key}").items()}


def same_files(a: Path, b: Path) -> tuple[list[str], int]:
    """Names of DeepSpeed files whose tensors differ between two step directories, and the count compared."""
    differ, n = [], 0
    for fa in sorted(a.glob("*.pt")):
        ta = tensors(torch.load(fa, map_location="cpu", weights_only=False))
        tb = tensors(torch.load(b / fa.name, map_location="cpu", weights_only=False))
        n += len(ta)
        if ta.keys() != tb.keys() or any(not torch.equal(ta[k], tb[k]) for k in ta):
            differ.append(fa.name)
    return differ, n


class SlowDisk:
    """DeepSpeed's checkpoint engine behind a disk that takes ``delay_s`` more for each file: a
    write still running when the next save is due, however fast this machine's disk is."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        time.sleep(self.delay_s)
        self.inner.save(state_dict, path)


def main() -> None:
    out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(overrides)
    dist = init_distributed()
    run = build_run(cfg, dist)
    batches = iter(run.data.train)

    def step() -> None:
        train_step(run.engine, next(batches), cfg.micro_batch_size, dist.device)

    step()
    state = {"trainer": {"step": 1}}
    sync_dir = Path(cfg.run_dir) / "sync"
    checkpoint.save(run.engine, sync_dir, 1, state, dist, keep_last=5)
    events: list[dict] = []
    root = Path(cfg.run_dir) / "async" / "checkpoints"
    saver = checkpoint.Saver(dist, root, keep_last=2, asynchronous=True, log_event=events.append)
    first = saver.save(run.engine, 1, state)
    in_flight = (root / "step-1.partial").is_dir() and not (root / "step-1").exists()
    before = {k: v.clone() for k, v in run.engine.module.state_dict().items()}
    step()  # changes the weights and optimizer state in place while step 1 is being written
    changed = any(not torch.equal(before[k], v) for k, v in run.engine.module.state_dict().items())
    saver.finish()
    differ, compared = same_files(sync_dir / "checkpoints" / "step-1", root / "step-1")

    fast, run.engine.checkpoint_engine = (
        run.engine.checkpoint_engine,
        SlowDisk(run.engine.checkpoint_engine, 0.5),
    )
    second = saver.save(run.engine, 2, state)
    third = saver.save(run.engine, 3, state)  # right away: step 2's write is still going
    saver.finish()
    run.engine.checkpoint_engine = fast
    result = {
        "in_flight": in_flight,
        "changed": changed,
        "differ": differ,
        "compared": compared,
        "blocked_s": [first["blocked_s"], second["blocked_s"]],
        "third_wait_s": third["wait_s"],
        "events": events,
        "dirs": sorted(p.name for p in root.iterdir()),
        "latest": (root / "latest").read_text(),
    }
    (out_dir / f"rank{dist.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
