"""The streaming loader: a global sample order fixed by (seed, epoch), sliced per rank, resumable anywhere.

Order of one source (one split of one prepared dataset), per epoch: shuffle the shard order with
an RNG seeded from (seed, epoch), group consecutive shards into windows of ``shuffle_window``
shards, and permute the samples of each window with an RNG seeded from (seed, epoch, window).
Each shard is still read sequentially (two of a window at a time); only one window per source is
held in memory, in shard order beside its permutation, and each batch gathers its rows through it.
The val split keeps manifest order, so every evaluation sees the same samples. Epoch e+1 follows
epoch e with nothing dropped. A train loader reads the next window in a background thread while the
current one is consumed, so a window boundary does not stall training.

Several sources are interleaved into one global stream by a weighted ``Mixture``: position p draws
the next sample of the source the mixture picks for it. Each source keeps its own order and epochs
(a small source with a large weight simply repeats sooner). One source is the mixture of one.

Global batch k is the next G positions of the stream; rank r of W takes entries [r*G/W, (r+1)*G/W)
of it. So the samples of batch k, and their order, do not depend on the world size, and the state
is just the number of positions consumed from each source: a loader on any world size continues
at the next batch, opening only the windows that hold its positions. Every rank reads whole windows
(W times the I/O of a disjoint split), which keeps the order exact and is cheap next to a model step.

``on_corrupt="skip"``: a sample that cannot be trusted (its shard missing, truncated, unreadable,
or failing its sha256 with ``verify``) is passed over, and the batch is filled with the next intact
positions of the stream. Every rank scans the whole batch, so all ranks agree on which positions a
batch used; the state after the batch counts the skipped positions as consumed, so a resumed run
never revisits them. ``stats()["data_skipped"]`` counts them over the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from trainer.data import DataError
from trainer.data.manifest import DTYPES, MANIFEST, SPLITS, load_manifest
from trainer.data.mixture import Mixture
from trainer.data.order import EpochPlan
from trainer.data.prefetch import LoaderIterator
from trainer.data.shards import ReadBuffer, VerifiedShards, read_shard

log = logging.getLogger("trainer")

ON_CORRUPT = ("error", "skip")
_KEPT = ("ahead", "pool", "readers")  # a pass' cache entries that outlive an epoch
_WINDOW = ("ids", "rows", "valid", "order", "lo", "hi")  # its entries of the window in use
# Shards of a window read at once. sha256 (data.verify_shards) bounds a reading thread at ~1 GB/s and
# releases the GIL: a window of the benchmark dataset read at 1.9-2.0 GB/s with two threads, 1.1 GB/s
# with one. Without sha256 both read it at 3.6-3.8 GB/s: there the second thread adds nothing.
_READ_THREADS = min(2, os.cpu_count() or 1)
# Batches per hand-off from the prefetch thread (see ShardLoader._batches): enough that the hand-off
# no longer bounds small batches (batch 16 went from ~0.2M to ~0.9M samples/s), few enough bytes
# to stay in cache on their way to the step.
_CHUNK_BATCHES, _CHUNK_BYTES = 64, 1 << 20


def _shard_url(dataset_dir: Path, path: str) -> str:
    """Manifest paths are relative to the dataset directory unless they are URLs or ``pipe:`` commands."""
    if "://" in path or path.startswith("pipe:"):
        return path
    return str(dataset_dir / path)


@dataclass
class _Reading:
    """How a source reads its shards (the same for every source of one loader)."""

    seed: int
    window: int
    shuffle: bool
    verify: bool
    skip: bool
    warn: bool  # log skipped shards (rank 0 only, so a bad shard is reported once, not W times)
    read_ahead: bool  # read the next window in a background thread while this one is consumed


class _Readers:
    """A pass' shard-reading threads, each with its own read buffer, reused shard after shard."""

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="ShardLoader-read")
        self._local = threading.local()

    def buffer(self) -> ReadBuffer:
        """The calling thread's buffer."""
        if not hasattr(self._local, "buffer"):
            self._local.buffer = ReadBuffer()
        return self._local.buffer

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Source:
    """One split of one prepared dataset, read by position in its own endless (seed, epoch) order."""

    def __init__(self, dataset_dir: str | Path, split: str, how: _Reading):
        self.dir, self.split, self.how = Path(dataset_dir), split, how
        self.manifest = load_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise ValueError(f"split={split!r} is not in {self.dir / MANIFEST}: use one of {SPLITS}")
        self.seq_len, self.dtype = self.manifest["seq_len"], DTYPES[self.manifest["dtype"]]
        self.shards = self.manifest["splits"][split]["shards"]
        self.counts = np.array([s["samples"] for s in self.shards], dtype=np.int64)
        self.first_ids = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.num_samples = int(self.counts.sum())
        if self.num_samples == 0:
            raise DataError(f"{self.dir / MANIFEST}: split {split!r} has no samples: prepare more data")
        blob = json.dumps([[s["samples"], s["sha256"]] for s in self.shards]).encode()  # content, not paths
        self.fingerprint = hashlib.sha256(blob).hexdigest()
        self.shard_reads: Counter[str] = Counter()  # times each shard was read (observability, tests)
        self.verified = VerifiedShards()  # with how.verify: sha256 once per shard file, not per read
        self._warned: set[str] = set()

    @property
    def shard_hashes(self) -> Counter[str]:
        """Times each shard (manifest path) was hashed with ``verify``."""
        return self.verified.hashes

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """Which shards form each window of ``epoch``, in order, and where each window starts."""
        return EpochPlan(self.counts, epoch, self.how.seed, self.how.window, self.how.shuffle)

    def take(
        self, first: int, count: int, cache: dict[str, Any], select: np.ndarray | None = None
    ) -> tuple[np.ndarray, ...]:
        """(ids, rows, valid) at this source's positions [first, first + count), across windows/epochs.

        ``select``: sorted offsets into that run to keep (None: all of them), e.g. one rank's slices
        of several global batches. ``cache`` holds one pass' epoch plan and its one window, in shard
        order beside the window's permutation, so a run of positions within a window is one gather
        (unshuffled and unselected: a slice, a view; the caller copies what it keeps).
        """
        parts = []
        pos, end = first, first + count
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            if cache.get("epoch") != epoch:
                kept = {k: cache[k] for k in _KEPT if k in cache}  # the read-ahead carries on
                cache.clear()
                cache.update(epoch=epoch, plan=self.epoch_plan(epoch), **kept)
            if not cache.get("lo", 0) <= offset < cache.get("hi", 0):  # another window: load it
                plan = cache["plan"]
                w = plan.window_of(offset)
                for key in _WINDOW:  # free the old window first; a failed read leaves none
                    cache.pop(key, None)
                window = self._window(plan, w, cache)
                cache.update(lo=int(plan.starts[w]), hi=int(plan.starts[w + 1]), **window)
            j, k = offset - cache["lo"], min(end - pos, cache["hi"] - offset)
            arrays, order = (cache["ids"], cache["rows"], cache["valid"]), cache["order"]
            if select is not None:  # the selected offsets within [pos, pos + k), as window indices
                a, b = np.searchsorted(select, [pos - first, pos - first + k])
                at = select[a:b] - (pos - first) + j
                parts.append([x.take(at if order is None else order.take(at), axis=0) for x in arrays])
            elif order is None:
                parts.append([x[j : j + k] for x in arrays])
            else:  # take(): a plain gather, markedly faster than fancy indexing of the rows
                at = order[j : j + k]
                parts.append([x.take(at, axis=0) for x in arrays])
            pos += k
        return tuple(parts[0]) if len(parts) == 1 else tuple(np.concatenate(p) for p in zip(*parts))

    def window_end(self, position: int, cache: dict[str, Any]) -> int:
        """The first position after the window that holds ``position``."""
        epoch, offset = divmod(position, self.num_samples)
        plan = cache["plan"] if cache.get("epoch") == epoch else self.epoch_plan(epoch)
        return epoch * self.num_samples + int(plan.starts[plan.window_of(offset) + 1])

    def _window(self, plan: EpochPlan, w: int, cache: dict[str, Any]) -> dict[str, Any]:
        """Window ``w`` of ``plan``'s epoch (from the read-ahead when it has it); starts reading the next.

        With read-ahead two windows per source are in memory: the one in use and the next.
        """
        readers = cache.setdefault("readers", _Readers(min(_READ_THREADS, self.how.window)))
        ahead = cache.pop("ahead", None)
        if ahead is not None and ahead[0] == (plan.epoch, w):
            window = ahead[1].result()  # a read error surfaces here, where the window is needed
        else:
            window = self._load_window(plan, w, readers)
        if self.how.read_ahead:
            following = (plan, w + 1) if w + 1 < len(plan.windows) else (self.epoch_plan(plan.epoch + 1), 0)
            pool = cache.setdefault("pool", ThreadPoolExecutor(1, thread_name_prefix="ShardLoader-ahead"))
            future = pool.submit(self._load_window, *following, readers)
            cache["ahead"] = ((following[0].epoch, following[1]), future)
        return window

    def _load_window(self, plan: EpochPlan, w: int, readers: _Readers) -> dict[str, Any]:
        """Window ``w`` of ``plan``'s epoch in shard order, and ``order``: its permutation (None: as read).

        The samples are not permuted here: each batch gathers its rows through ``order``, one copy.
        """
        window: dict[str, Any] = self._read_window(plan.windows[w], readers)
        window["order"] = plan.permutation(w) if plan.shuffle else None
        return window

    def _read_window(self, shard_indices: np.ndarray, readers: _Readers) -> dict[str, np.ndarray]:
        """All samples of the window's shards: rows [n, seq_len+1], ids, valid.

        Each shard is read sequentially, by ``readers`` (several shards at a time); an error is
        that of the first bad shard in window order, as when they were read one after the other.
        """
        counts = self.counts[shard_indices]
        rows = np.empty((int(counts.sum()), self.seq_len + 1), self.dtype)
        payload = rows.view(np.uint8)  # each shard's payloads are copied straight into their rows
        ends = np.cumsum(counts)
        jobs = []
        for i, n, e in zip(shard_indices, counts, ends):
            self.shard_reads[self.shards[i]["path"]] += 1  # counted here: Counter is not thread-safe
            jobs.append(readers.pool.submit(self._read_shard, int(i), payload[e - n : e], readers))
        valid = [job.result() for job in jobs]
        ids = [np.arange(self.counts[i]) + self.first_ids[i] for i in shard_indices]
        return {"rows": rows, "valid": np.concatenate(valid), "ids": np.concatenate(ids)}

    def _read_shard(self, index: int, out: np.ndarray, readers: _Readers) -> np.ndarray:
        shard = self.shards[index]
        url = _shard_url(self.dir, shard["path"])
        sha256, identity = (
            (shard["sha256"], VerifiedShards.identity(url)) if self.how.verify else (None, None)
        )
        if sha256 is not None and not self.verified.needs_hash(url, identity, sha256):
            sha256 = None  # this very file was hashed and matched before
        valid, problem = read_shard(url, out, sha256, readers.buffer())
        if sha256 is not None:
            self.verified.hashed(url, shard["path"], identity, sha256, problem is None)
        if problem is not None:
            if not self.how.skip:
                raise DataError(
                    f"shard {url}: {problem}: restore the file or prepare the data again "
                    "(or set data.on_corrupt=skip to train on without its bad samples)"
                )
            if self.how.warn and url not in self._warned:
                self._warned.add(url)
                bad = int((~valid).sum())
                log.warning(
                    "shard %s: %s: skipping its %d bad samples (data.on_corrupt=skip)", url, problem, bad
                )
        return valid


@dataclass(frozen=True)
class _Position:
    counts: tuple[int, ...]  # positions consumed from each source's order (skipped ones included)
    skipped: int = 0  # of all those, positions skipped as corrupt

    @property
    def total(self) -> int:
        return sum(self.counts)


def _check_compatible(sources: list[Source]) -> None:
    """Mixed sources must be interchangeable samples: one seq_len and one tokenizer."""
    first = sources[0]
    ident = first.manifest["tokenizer"].get("identity")
    for src in sources[1:]:
        if src.seq_len != first.seq_len:
            raise DataError(
                f"{src.dir / MANIFEST}: seq_len={src.seq_len} but {first.dir / MANIFEST} has seq_len="
                f"{first.seq_len}: mixed sources need one seq_len: prepare them with the same seq_len"
            )
        if src.manifest["tokenizer"].get("identity") != ident:
            raise DataError(
                f"{src.dir / MANIFEST}: its tokenizer differs from the one of {first.dir / MANIFEST}: "
                f"mixed sources need one tokenizer: prepare it with tokenizer={first.dir / 'tokenizer'}"
            )


class ShardLoader:
    """Iterates this rank's slice of each global batch: dicts of ``tokens`` (IntTensor
    [G/W, seq_len + 1], the samples as stored, int32: pass them to ``trainer.data.to_device`` for the
    model's inputs and labels), ``sample_ids`` (LongTensor [G/W], stable global ids: the sample's
    index over its split's shards in manifest order, plus the sizes of the sources listed before
    its own) and ``source`` (LongTensor [G/W], the index of the sample's source).

    ``dataset`` is a prepared dataset directory, or ``[(directory, weight), ...]`` to mix several
    (see ``trainer.data.mixture``). ``infinite=True`` (train) runs on forever, each source epoch
    after epoch; the position lives in the loader, so a new ``iter()`` continues where the last one
    stopped. ``infinite=False`` (val) makes one pass of as many samples as its sources hold together,
    in whole global batches (the tail is dropped; in a mixture, a source that runs out starts over);
    each new ``iter()`` starts again from the beginning, unless a state was just loaded. Only the
    newest iterator of a loader is live. ``shuffle`` defaults to True except for the ``val`` split.
    Consecutive train batches may be views of one tensor (they are built, and handed over, in chunks
    of up to ~1 MiB of tokens; ``prefetch`` chunks ahead): copy a batch's tensors before saving them,
    or torch.save writes the chunk.
    ``on_corrupt``: ``error`` raises a DataError naming the shard, ``skip`` passes over bad samples
    (see the module docstring).
    """

    def __init__(
        self,
        dataset: str | Path | Sequence[tuple[str | Path, float]],
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
        on_corrupt: str = "error",
    ):
        if global_batch_size <= 0 or global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"world_size={world_size}: change global_batch_size"
            )
        if not 0 <= rank < world_size or shuffle_window <= 0 or on_corrupt not in ON_CORRUPT:
            raise ValueError(
                f"need 0 <= rank={rank} < world_size={world_size}, shuffle_window >= 1 and "
                f"on_corrupt in {ON_CORRUPT}"
            )
        pairs = [(dataset, 1.0)] if isinstance(dataset, (str, Path)) else [(p, float(w)) for p, w in dataset]
        self.split, self.seed, self.window, self.infinite = split, seed, shuffle_window, infinite
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.shuffle = split != "val" if shuffle is None else shuffle
        self.prefetch, self.skip = prefetch, on_corrupt == "skip"
        how = _Reading(seed, shuffle_window, self.shuffle, verify, self.skip, rank == 0, read_ahead=infinite)
        self.weights = [w for _, w in pairs]
        self.mixture = Mixture(self.weights)
        self.sources = [Source(path, split, how) for path, _ in pairs]
        _check_compatible(self.sources)
        self.seq_len, self.dtype = self.sources[0].seq_len, self.sources[0].dtype
        sizes = [s.num_samples for s in self.sources]
        self.sizes, self.offsets, self.num_samples = np.array(sizes), np.cumsum([0] + sizes[:-1]), sum(sizes)
        prints = [s.fingerprint for s in self.sources]
        self.fingerprint = (
            prints[0] if len(prints) == 1 else hashlib.sha256(json.dumps(prints).encode()).hexdigest()
        )
        self._slice = (rank * global_batch_size // world_size, (rank + 1) * global_batch_size // world_size)
        batch_bytes = (self._slice[1] - self._slice[0]) * (self.seq_len + 1) * 4
        self._chunk_batches = max(1, min(_CHUNK_BATCHES, _CHUNK_BYTES // batch_bytes)) if infinite else 1
        self._position = _Position((0,) * len(self.sources))
        self._resumed = False
        self._active: LoaderIterator | None = None

    def stats(self) -> dict[str, float]:
        """Counters for the trainer's metrics (merged into every train log event)."""
        out: dict[str, float] = {}
        if self.skip:
            out["data_skipped"] = self._position.skipped
        total = self._position.total
        if len(self.sources) > 1 and total:
            out |= {f"data_mix_{i}": c / total for i, c in enumerate(self._position.counts)}
        return out

    def __len__(self) -> int:
        """Global batches in one pass of a finite loader (an epoch's worth; whole batches only)."""
        return self.num_samples // self.global_batch_size

    def __iter__(self) -> LoaderIterator:
        if self._active is not None:
            self._active.close()
        if not self.infinite and not self._resumed:
            self._position = _Position((0,) * len(self.sources))
        self._resumed = False
        self._active = LoaderIterator(self, self._position)
        return self._active

    def state_dict(self) -> dict[str, Any]:
        """Positions consumed (global, over all epochs; per source) plus what must match on resume."""
        pos = self._position
        sources = [
            {
                "path": str(s.dir),
                "weight": w,
                "dataset": s.fingerprint,
                "num_samples": s.num_samples,
                "consumed_samples": c,
                "epoch": c // s.num_samples,
            }
            for s, w, c in zip(self.sources, self.weights, pos.counts)
        ]
        return {
            "consumed_samples": pos.total,
            "skipped_samples": pos.skipped,
            "split": self.split,
            "seed": self.seed,
            "shuffle_window": self.window,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
            "dataset": self.fingerprint,
            "sources": sources,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position; the next batch is that position's global batch."""
        counts = self._saved_counts(state)
        mine = self.state_dict()
        for key in ("seed", "shuffle_window", "shuffle"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"the saved loader state has {key}={state.get(key)} but this loader {key}={mine[key]}: "
                    "exact resume needs the same value"
                )
        if self._active is not None:
            self._active.close()  # its prefetched batches belong to the old position
            self._active = None
        self._position = _Position(counts, int(state.get("skipped_samples", 0)))
        self._resumed = True

    def _saved_counts(self, state: dict[str, Any]) -> tuple[int, ...]:
        """Per-source positions of a saved state, after checking it belongs to these sources."""
        saved = state.get("sources") or [{**state, "weight": 1.0}]  # older states: one source, no list
        if len(saved) != len(self.sources):
            raise DataError(
                f"the saved loader state mixes {len(saved)} sources, this loader {len(self.sources)}: "
                "resume with the same data.sources, or start a new run"
            )
        for i, (entry, src, weight) in enumerate(zip(saved, self.sources, self.weights)):
            if entry.get("dataset") != src.fingerprint or entry.get("num_samples") != src.num_samples:
                raise DataError(
                    f"the saved loader state belongs to a different {self.split!r} split than {src.dir} "
                    f"(source {i}): resume with the same dataset, or start a new run"
                )
            if entry.get("weight") != weight:
                raise ValueError(
                    f"the saved loader state has weight {entry.get('weight')} for source {i} ({src.dir}) but "
                    f"this loader {weight}: exact resume needs the same weights"
                )
        counts = tuple(int(entry["consumed_samples"]) for entry in saved)
        if sum(counts) != state.get("consumed_samples"):
            raise DataError(
                f"the saved loader state is inconsistent: consumed_samples={state.get('consumed_samples')} "
                f"but its sources consumed {list(counts)}: resume from an unmodified checkpoint"
            )
        if state.get("dataset") != self.fingerprint:
            raise DataError(
                f"the saved loader state belongs to a different {self.split!r} split: start a new run"
            )
        return counts

    # ---- producing batches (runs in the prefetch thread when prefetch > 0) ----

    def _batches(self, start: _Position) -> Iterator[list[tuple[_Position, dict[str, torch.Tensor]]]]:
        """Chunks of consecutive global batches from position ``start``: [(position after it, this
        rank's slice), ...]. A chunk crosses threads in one hand-off, which costs tens of
        microseconds: as much as building a small batch."""
        caches: list[dict[str, Any]] = [{} for _ in self.sources]  # this pass' plan and window, per source
        pos = start
        try:
            while True:
                chunk, error = self._next_chunk(pos, caches)
                if chunk:
                    yield chunk
                    pos = chunk[-1][0]
                if error is not None:
                    raise error
                if not chunk:
                    return
        finally:  # the pass ends or is abandoned: stop its read-ahead and reading threads
            for cache in caches:
                if "pool" in cache:
                    cache["pool"].shutdown(wait=False, cancel_futures=True)
                if "readers" in cache:
                    cache["readers"].shutdown()

    def _next_chunk(self, pos: _Position, caches: list[dict]) -> tuple[list, DataError | None]:
        """The next chunk (empty when a finite pass ends) and the error that ended it early, if any.

        A chunk holds up to ``_CHUNK_BATCHES`` batches or ``_CHUNK_BYTES`` of this rank's tokens
        (at least one batch); a finite pass, usually cut short (``eval.batches``), hands out one
        batch at a time, so it reads no further ahead than the batches it may hand out. Built
        batch by batch (a mixture), a chunk stops at a bad shard's error (with
        ``on_corrupt=error``): the batches before it are still handed out, and the error is
        raised where the first batch that needs the shard would have been.
        """
        if not self.skip and len(self.sources) == 1:
            # Its first batch needs every window the chunk reads, so an error here comes where
            # batch by batch it would have come too.
            return self._plain_chunk(pos, caches[0]), None
        chunk: list[tuple[_Position, dict]] = []
        try:
            while len(chunk) < self._chunk_batches and (step := self._next_batch(pos, caches)) is not None:
                chunk.append(step)
                pos = step[0]
        except DataError as exn:
            if not chunk:
                raise
            return chunk, exn
        return chunk, None

    def _plain_chunk(self, pos: _Position, cache: dict[str, Any]) -> list[tuple[_Position, dict]]:
        """``_next_chunk`` of one source without skipping, built at once: one gather for the chunk.

        Its batches are views of one tensor per field. A chunk ends with the window that holds this
        rank's first position (or after one batch), so it never reads further ahead than batch by
        batch would.
        """
        G, (lo, hi) = self.global_batch_size, self._slice
        (first,) = pos.counts
        room = self.sources[0].window_end(first + lo, cache) - first - hi  # batch i fits if i*G <= room
        k = max(1, min(self._chunk_batches, room // G + 1))
        if not self.infinite:
            k = min(k, (self.num_samples - first) // G)
            if k <= 0:
                return []
        b = hi - lo
        select = None if b == G else (np.arange(k)[:, None] * G + np.arange(b)).ravel()
        ids, rows, _ = self.sources[0].take(first + lo, (k - 1) * G + b, cache, select)
        whole = self._to_batch(np.zeros(k * b, np.int64), ids, rows)
        parts = zip(*(tensor.split(b) for tensor in whole.values()))
        return [
            (_Position((first + (i + 1) * G,), pos.skipped), dict(zip(whole, fields)))
            for i, fields in enumerate(parts)
        ]

    def _next_batch(self, pos: _Position, caches: list[dict]) -> tuple[_Position, dict] | None:
        """The next global batch's position after it and this rank's slice; None when a finite pass ends."""
        G = self.global_batch_size
        lo, hi = self._slice
        counts = np.array(pos.counts, np.int64)
        if not self.skip:  # every position is used: read only this rank's slice
            picks = self.mixture.picks(counts, G)
            after = counts + self._tally(picks)
            if not self._fits(after):
                return None
            src, ids, rows, _ = self._fetch(counts + self._tally(picks[:lo]), picks[lo:hi], caches)
            return _Position(tuple(after.tolist()), pos.skipped), self._to_batch(src, ids, rows)
        start, parts, got = counts, [], 0
        while got < G:  # scan on until G intact samples: identical on every rank
            picks = self.mixture.picks(counts, G - got)
            after = counts + self._tally(picks)
            if not self._fits(after):
                return None
            *fetched, ok = self._fetch(counts, picks, caches)
            parts.append([a[ok] for a in fetched])
            got, counts = got + int(ok.sum()), after
            if got == 0 and (counts - start >= self.sizes).all():
                dirs = ", ".join(str(s.dir) for s in self.sources)
                raise DataError(
                    f"{dirs}: no intact sample in a whole epoch of {self.split!r}: prepare the data again"
                )
        src, ids, rows = (np.concatenate([p[i] for p in parts])[lo:hi] for i in range(3))
        skipped = int((counts - start).sum()) - G
        return _Position(tuple(counts.tolist()), pos.skipped + skipped), self._to_batch(src, ids, rows)

    def _tally(self, picks: np.ndarray) -> np.ndarray:
        if len(self.sources) == 1:
            return np.array([len(picks)])
        return np.bincount(picks, minlength=len(self.sources))

    def _fits(self, counts: np.ndarray) -> bool:
        return self.infinite or int(counts.sum()) <= self.num_samples

    def _fetch(self, counts: np.ndarray, picks: np.ndarray, caches: list[dict]) -> tuple[np.ndarray, ...]:
        """(source, id, row, valid) of the positions whose sources are ``picks``, starting at ``counts``."""
        if len(self.sources) == 1:
            return (picks, *self.sources[0].take(int(counts[0]), len(picks), caches[0]))
        ids, valid = np.empty(len(picks), np.int64), np.empty(len(picks), bool)
        rows = np.empty((len(picks), self.seq_len + 1), self.dtype)
        for s, source in enumerate(self.sources):
            mask = picks == s
            if mask.any():
                i, r, v = source.take(int(counts[s]), int(mask.sum()), caches[s])
                ids[mask], rows[mask], valid[mask] = i + self.offsets[s], r, v
        return picks, ids, rows, valid

    @staticmethod
    def _to_batch(src: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> dict[str, torch.Tensor]:
        # rows [G/W, seq_len + 1] as stored (uint16/uint32), already gathered (or a view of the window,
        # unshuffled): astype writes one contiguous int32 copy. numpy's take cannot cast into an int32
        # ``out``, and gathering the 2-byte rows first then widening them is the cheaper order. int32,
        # not torch.uint16, whose CUDA op support is thin; the int64 inputs and labels are made on the
        # device by trainer.data.to_device.
        return {
            "tokens": torch.from_numpy(rows.astype(np.int32)),
            "sample_ids": torch.from_numpy(ids.astype(np.int64)),
            "source": torch.from_numpy(src.astype(np.int64)),
        }
