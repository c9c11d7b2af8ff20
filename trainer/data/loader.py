"""The streaming loader: a global sample order fixed by (seed, epoch), sliced per rank, resumable anywhere.

Global order of one epoch (train): shuffle the shard order with an RNG seeded from (seed, epoch),
group consecutive shards into windows of ``shuffle_window`` shards, and permute the samples of
each window with an RNG seeded from (seed, epoch, window). Shards are still read sequentially;
only one window is held in memory. The val split keeps manifest order, so every evaluation
sees the same samples. Epoch e+1 follows epoch e with nothing dropped.

Global batch k is global positions [k*G, (k+1)*G); rank r of W takes [k*G + r*G/W, k*G + (r+1)*G/W).
So the samples of batch k, and their order, do not depend on the world size, and the state is
just the number of samples consumed: a loader on any world size continues at the next batch,
opening only the windows that hold its positions. Every rank reads whole windows (W times the
I/O of a disjoint split), which keeps the order exact and is cheap next to a model step.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset import tariterators

from trainer.data import DataError
from trainer.data.prepare import FIELD, FORMAT, FORMAT_VERSION, MANIFEST, SPLITS

_DTYPES = {"uint16": "<u2", "uint32": "<u4"}
_SHARD_KEYS = {"path": str, "samples": int, "sha256": str, "bytes": int}


def _manifest_problem(m: Any) -> str | None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return f"not a {FORMAT} manifest"
    if m.get("version") != FORMAT_VERSION:
        return f"format version {m.get('version')}, this code reads version {FORMAT_VERSION}"
    if not isinstance(m.get("seq_len"), int) or m["seq_len"] <= 0 or m.get("dtype") not in _DTYPES:
        return "seq_len or dtype missing or invalid"
    if not isinstance(m.get("tokenizer"), dict) or not isinstance(m["tokenizer"].get("vocab_size"), int):
        return "tokenizer section missing"
    for split in SPLITS:
        shards = m.get("splits", {}).get(split, {}).get("shards")
        if not isinstance(shards, list):
            return f"split {split!r} missing"
        for shard in shards:
            if not isinstance(shard, dict) or any(
                not isinstance(shard.get(k), t) for k, t in _SHARD_KEYS.items()
            ):
                return f"a shard entry of split {split!r} lacks path, samples, sha256 or bytes"
    return None


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """The dataset's ``manifest.json``, checked; DataError names the file and what to do."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path}: not found (not a prepared dataset, or its preparation did not finish): "
            "prepare the data first, or set data.builtin=true for the built-in corpus"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exn:
        raise DataError(f"{path}: not valid JSON ({exn}): prepare the data again") from exn
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path}: {problem}: prepare the data again")
    return manifest


def _shard_url(dataset_dir: Path, path: str) -> str:
    """Manifest paths are relative to the dataset directory unless they are URLs or ``pipe:`` commands."""
    if "://" in path or path.startswith("pipe:"):
        return path
    return str(dataset_dir / path)


def _rng(seed: int, epoch: int, tag: int, index: int) -> np.random.Generator:
    # Always four words: SeedSequence treats [a, b] and [a, b, 0] alike, so lengths must not vary.
    return np.random.default_rng([seed % (1 << 63), epoch, tag, index])


class _EpochPlan:
    """One epoch's windows: which shards in which order, and where each window starts."""

    def __init__(self, counts: np.ndarray, epoch: int, seed: int, window: int, shuffle: bool):
        self.epoch, self.seed, self.shuffle = epoch, seed, shuffle
        order = _rng(seed, epoch, 0, 0).permutation(len(counts)) if shuffle else np.arange(len(counts))
        self.windows = [order[i : i + window] for i in range(0, len(order), window)]
        self.starts = np.cumsum([0] + [int(counts[w].sum()) for w in self.windows])

    def window_of(self, offset: int) -> int:
        return int(np.searchsorted(self.starts, offset, side="right")) - 1

    def permutation(self, w: int) -> np.ndarray:
        size = int(self.starts[w + 1] - self.starts[w])
        return _rng(self.seed, self.epoch, 1, w).permutation(size) if self.shuffle else np.arange(size)


class _HashingReader:
    """A read-only stream that hashes what passes through it (sha256 check in the same single read)."""

    def __init__(self, stream: Any):
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


class _Prefetcher:
    """Runs a generator in one background thread, handing its items over through a bounded queue.

    One producer and FIFO order: the items and their order are exactly the generator's. The thread
    is not a daemon: a daemon thread still inside torch when the interpreter finalizes aborts the
    process. Instead it stops on close() or once the main thread has finished.
    """

    _END = object()

    def __init__(self, source: Iterator[Any], depth: int):
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = False
        threading.Thread(target=self._run, args=(source,), name="ShardLoader-prefetch").start()

    def _run(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as exn:  # handed to the consumer, re-raised there
            self._put((self._END, exn))

    def _put(self, entry: tuple) -> bool:
        # Poll, so that close() or the end of the main thread frees a producer blocked on a full queue.
        while not self._stop.is_set() and threading.main_thread().is_alive():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item, exn = self._queue.get()
        if item is self._END:
            self._done = True
            if exn is not None:
                raise exn
            raise StopIteration
        return item

    def close(self) -> None:
        self._done = True
        self._stop.set()


class _LoaderIterator:
    """One pass of a ShardLoader; the loader's position advances only when a batch is handed out."""

    def __init__(self, loader: ShardLoader, start: int):
        self._loader = loader
        source = loader._batches(start)
        self._items = _Prefetcher(source, loader.prefetch) if loader.prefetch > 0 else source
        self._closed = False

    def __iter__(self) -> _LoaderIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._closed:
            raise StopIteration
        end, batch = next(self._items)
        self._loader._consumed = end
        return batch

    def close(self) -> None:
        self._closed = True
        if isinstance(self._items, _Prefetcher):
            self._items.close()

    def __del__(self) -> None:
        self.close()


class ShardLoader:
    """Iterates this rank's slice of each global batch: dicts of ``input_ids`` and ``labels``
    (LongTensor [G/W, seq_len]) and ``sample_ids`` (LongTensor [G/W], stable global ids: the
    sample's index over the split's shards in manifest order).

    ``infinite=True`` (train) runs epoch after epoch; the position lives in the loader, so a new
    ``iter()`` continues where the last one stopped. ``infinite=False`` (val) makes one pass that
    ends after the last full global batch (the final ``samples % G`` are dropped); each new
    ``iter()`` starts again from the beginning, unless a state was just loaded. Only the newest
    iterator of a loader is live. ``shuffle`` defaults to True except for the ``val`` split.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_window: int = 4,
        infinite: bool = True,
        shuffle: bool | None = None,
        verify: bool = False,
        prefetch: int = 2,
    ):
        if global_batch_size <= 0 or global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"world_size={world_size}: change global_batch_size"
            )
        if not 0 <= rank < world_size or shuffle_window <= 0:
            raise ValueError(f"need 0 <= rank={rank} < world_size={world_size} and shuffle_window >= 1")
        self.dir = Path(dataset_dir)
        manifest = load_manifest(self.dir)
        if split not in manifest["splits"]:
            raise ValueError(f"split={split!r} is not in {self.dir / MANIFEST}: use one of {SPLITS}")
        self.split, self.seed, self.window, self.infinite = split, seed, shuffle_window, infinite
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.shuffle = split != "val" if shuffle is None else shuffle
        self.verify, self.prefetch = verify, prefetch
        self.seq_len, self.dtype = manifest["seq_len"], _DTYPES[manifest["dtype"]]
        self.shards = manifest["splits"][split]["shards"]
        self.counts = np.array([s["samples"] for s in self.shards], dtype=np.int64)
        self.first_ids = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.num_samples = int(self.counts.sum())
        if self.num_samples == 0:
            raise DataError(f"{self.dir / MANIFEST}: split {split!r} has no samples: prepare more data")
        blob = json.dumps([[s["samples"], s["sha256"]] for s in self.shards]).encode()  # content, not paths
        self.fingerprint = hashlib.sha256(blob).hexdigest()
        self._consumed = 0
        self._resumed = False
        self._active: _LoaderIterator | None = None
        self.shard_reads: Counter[str] = Counter()  # times each shard was read (observability, tests)

    def stats(self) -> dict[str, float]:
        """Counters for the trainer's metrics (merged into every train log event)."""
        return {}

    def __len__(self) -> int:
        """Global batches in one epoch (whole batches only)."""
        return self.num_samples // self.global_batch_size

    def __iter__(self) -> _LoaderIterator:
        if self._active is not None:
            self._active.close()
        if not self.infinite and not self._resumed:
            self._consumed = 0
        self._resumed = False
        self._active = _LoaderIterator(self, self._consumed)
        return self._active

    def state_dict(self) -> dict[str, Any]:
        """Samples consumed (global, over all epochs) plus what must match on resume."""
        return {
            "consumed_samples": self._consumed,
            "epoch": self._consumed // self.num_samples,
            "split": self.split,
            "seed": self.seed,
            "shuffle_window": self.window,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
            "dataset": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state["consumed_samples"]``; the next batch is that position's global batch."""
        mine = self.state_dict()
        if state.get("dataset") != mine["dataset"] or state.get("num_samples") != mine["num_samples"]:
            raise DataError(
                f"the saved loader state belongs to a different {self.split!r} split than {self.dir}: "
                "resume with the same dataset, or start a new run"
            )
        for key in ("seed", "shuffle_window", "shuffle"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"the saved loader state has {key}={state.get(key)} but this loader {key}={mine[key]}: "
                    "exact resume needs the same value"
                )
        if self._active is not None:
            self._active.close()  # its prefetched batches belong to the old position
            self._active = None
        self._consumed = int(state["consumed_samples"])
        self._resumed = True

    # ---- producing batches (runs in the prefetch thread when prefetch > 0) ----

    def _batches(self, start: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(position after the batch, this rank's slice) for global batches from position ``start``."""
        per_rank = self.global_batch_size // self.world_size
        cache: dict[str, Any] = {}  # this pass' epoch plan and its one window in memory
        pos = start
        while self.infinite or pos + self.global_batch_size <= self.num_samples:
            first = pos + self.rank * per_rank
            ids, rows = self._take(first, per_rank, cache)
            yield pos + self.global_batch_size, self._to_batch(ids, rows)
            pos += self.global_batch_size

    def _take(self, first: int, count: int, cache: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Sample ids and rows at global positions [first, first + count), which may span windows/epochs."""
        ids, rows = [], []
        pos, end = first, first + count
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            if cache.get("epoch") != epoch:
                cache.clear()
                cache.update(epoch=epoch, plan=self.epoch_plan(epoch))
            plan = cache["plan"]
            w = plan.window_of(offset)
            if cache.get("window") != w:
                cache.pop("rows", None)  # free the old window before reading the next one
                cache.update(window=w, perm=plan.permutation(w), **self._read_window(plan.windows[w]))
            j = offset - int(plan.starts[w])
            picked = cache["perm"][j : j + min(end - pos, len(cache["perm"]) - j)]
            ids.append(cache["ids"][picked])
            rows.append(cache["rows"][picked])
            pos += len(picked)
        return np.concatenate(ids), np.concatenate(rows)

    def epoch_plan(self, epoch: int) -> _EpochPlan:
        """Which shards form each window of ``epoch``, in order, and where each window starts."""
        return _EpochPlan(self.counts, epoch, self.seed, self.window, self.shuffle)

    def _read_window(self, shard_indices: np.ndarray) -> dict[str, np.ndarray]:
        """All samples of the window's shards, read shard after shard: rows [n, seq_len+1] and ids [n]."""
        rows = [self._read_shard(int(i)) for i in shard_indices]
        ids = [np.arange(self.counts[i]) + self.first_ids[i] for i in shard_indices]
        return {"rows": np.concatenate(rows), "ids": np.concatenate(ids)}

    def _read_shard(self, index: int) -> np.ndarray:
        shard = self.shards[index]
        url = _shard_url(self.dir, shard["path"])
        self.shard_reads[shard["path"]] += 1
        payloads = []
        try:
            stream = wds.gopen(url, "rb")  # local path, URL or pipe: command
            reader = _HashingReader(stream) if self.verify else stream
            files = tariterators.tar_file_expander([{"url": url, "stream": reader}])
            for sample in tariterators.group_by_keys(files):
                payloads.append(sample.get(FIELD, b""))
            digest = reader.drain() if self.verify else None
            stream.close()
        except Exception as exn:  # tarfile errors carry webdataset's extra args: keep the message
            reason = getattr(exn, "strerror", None) or (exn.args[0] if exn.args else type(exn).__name__)
            raise DataError(
                f"shard {url}: cannot read it ({reason}): restore the file or prepare the data again"
            ) from exn
        self._check_shard(url, shard, payloads, digest)
        return np.frombuffer(b"".join(payloads), self.dtype).reshape(len(payloads), self.seq_len + 1)

    def _check_shard(
        self, url: str, shard: dict[str, Any], payloads: list[bytes], digest: str | None
    ) -> None:
        if len(payloads) != shard["samples"]:
            raise DataError(
                f"shard {url}: holds {len(payloads)} samples but the manifest says {shard['samples']} "
                "(truncated or replaced): restore the file or prepare the data again"
            )
        size = (self.seq_len + 1) * np.dtype(self.dtype).itemsize
        if any(len(p) != size for p in payloads):
            raise DataError(f"shard {url}: a sample's {FIELD} is not {size} bytes: prepare the data again")
        if digest is not None and digest != shard["sha256"]:
            raise DataError(
                f"shard {url}: sha256 differs from the manifest: restore the file or prepare again"
            )

    @staticmethod
    def _to_batch(ids: np.ndarray, rows: np.ndarray) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(rows.astype(np.int64))  # [G/W, seq_len + 1]
        return {
            "input_ids": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "sample_ids": torch.from_numpy(ids.astype(np.int64)),
        }
