"""Benchmark: checkpoint save and load against a raw write/read of the same bytes on the same disk.

    python -m trainer.benchmarks.checkpoint_io [--dir /path/on/the/disk] [--repeats 3] [overrides]

Saves go through ``trainer.checkpoint.save`` (DeepSpeed shards, trainer state, fsync, COMPLETE,
rename) and loads through ``trainer.checkpoint.load``. The reference writes one file of the
same total size with fsync and reads it back. Both alternate, so page cache and disk noise hit
both alike; the figures are medians and their ratios (target <= 1.5).

Asynchronous saves (``checkpoint.Saver``, as the loop uses it) of the same state, in the same
repeats: the time the step loop is blocked (the snapshot to host memory) against the synchronous
save's (target <= 0.10), and the training steps taken while the background write is in flight
against as many steps taken right after with no write in flight (target: < 20% slower). The
snapshot is a memory copy: its floor, one plain copy of the same bytes, is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.distributed import init_distributed
from trainer.engine import build_engine, deepspeed_config
from trainer.model import GPT, num_params
from trainer.train import load_config


def raw_write_read(path: Path, nbytes: int) -> tuple[float, float]:
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes >> 20):
            f.write(block)
        f.write(block[: nbytes & ((1 << 20) - 1)])
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with open(path, "rb") as f:  # into fresh memory, as a load must end with the bytes in RAM
        buf = bytearray(nbytes)
        f.readinto(memoryview(buf))
    read_s = time.perf_counter() - t0
    path.unlink()
    return write_s, read_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=None, help="a directory on the disk to measure (default: a temp dir)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seq", type=int, default=32, help="tokens per training step of the overlap figure")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (default: a 33M-parameter model, ZeRO-1)")
    args = p.parse_args()
    os.environ.setdefault("WORLD_SIZE", "1")
    defaults = [
        "model.d_model=512",
        "model.n_layer=9",
        "model.n_head=8",
        "model.vocab_size=8192",
        "engine=zero1",
    ]
    cfg = load_config(defaults + args.overrides)
    dist = init_distributed()
    model = GPT(cfg.model)
    ds_cfg = deepspeed_config(cfg.engine, cfg.optim, micro_batch_size=1, grad_accum_steps=1, world_size=1,
                              total_steps=10)  # fmt: skip
    engine = build_engine(model, ds_cfg, cfg.optim, 10)
    x = torch.randint(0, cfg.model.vocab_size, (1, args.seq))

    def train_step() -> float:
        t0 = time.perf_counter()
        engine.backward(engine(x, x)[1])
        engine.step()
        return time.perf_counter() - t0

    train_step()  # so the optimizer state exists and is saved

    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="ckpt-bench-"))
    saves, loads, writes, reads = [], [], [], []
    blocked, write_s, overlapped, alone, copies = [], [], [], [], []
    src = dst = None  # the floor of a snapshot: one plain host memory copy of the checkpoint's bytes
    saver = checkpoint.Saver(dist, work / "async" / "checkpoints", keep_last=1, asynchronous=True)
    try:
        for i in range(args.repeats):
            # Asynchronous: blocked time, then steps while the write is in flight (the loop polls
            # after each step), then as many steps with nothing in flight.
            events = []
            saver.log_event = events.append
            blocked.append(saver.save(engine, i + 1, {"trainer": {}})["blocked_s"])
            during = []
            while saver.pending is not None:
                during.append(train_step())
                saver.poll()
            overlapped += during
            alone += [train_step() for _ in range(max(len(during), 2))]
            write_s.append(events[0]["write_s"])
            run_dir = work / f"run{i}"
            saves.append(checkpoint.save(engine, run_dir, 1, {"trainer": {}}, dist, keep_last=1))
            step_dir = run_dir / "checkpoints" / "step-1"
            nbytes = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
            t0 = time.perf_counter()
            checkpoint.load(engine, step_dir, dist)
            loads.append(time.perf_counter() - t0)
            w, r = raw_write_read(work / "raw.bin", nbytes)
            if src is None:
                src, dst = torch.ones(nbytes // 4), torch.zeros(nbytes // 4)
                dst.copy_(src)  # fault the pages in, as the snapshot's kept buffers are
            t0 = time.perf_counter()
            dst.copy_(src)
            copies.append(time.perf_counter() - t0)
            writes.append(w)
            reads.append(r)
            shutil.rmtree(run_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s, ld, w, r = (statistics.median(v) for v in (saves, loads, writes, reads))
    size = f"checkpoint {nbytes / 2**20:.0f} MiB"
    print(f"model: {num_params(cfg.model):,} params | ZeRO-{cfg.engine.zero_stage} | {size}")
    print(f"save : {s:6.2f} s  vs raw write+fsync {w:6.2f} s  -> ratio {s / w:.2f} (target <= 1.5)")
    print(f"load : {ld:6.2f} s  vs raw read        {r:6.2f} s  -> ratio {ld / r:.2f} (target <= 1.5)")
    print(f"a save blocks training for {s:.2f} s ({nbytes / 2**20 / s:.0f} MiB/s)")
    b, bw = statistics.median(blocked), statistics.median(write_s)
    print(f"async: blocks  {b:6.3f} s vs synchronous save {s:6.2f} s -> ratio {b / s:.3f} (target <= 0.10)")
    print(f"       (the first {blocked[0]:.3f} s: it allocates the host buffers); writes in {bw:.2f} s")
    c = statistics.median(copies)
    print(f"       vs one plain memory copy of the same bytes {c:.3f} s -> ratio {b / c:.2f} (the floor)")
    o, a = statistics.median(overlapped), statistics.median(alone)
    n = f"{len(overlapped)} vs {len(alone)} steps"
    print(f"async: steps during the write {o:.3f} s vs {a:.3f} s with none in flight "
          f"-> {100 * (o / a - 1):+.1f}% (target < +20%; {n})")  # fmt: skip


if __name__ == "__main__":
    main()
