"""Prepare a dataset: text / JSON Lines -> tokens -> packed samples -> webdataset tar shards + manifest.

Inputs (files, directories, globs; see ``readers``) are streamed, never read whole; tokenization
runs in ``num_workers`` processes, in input order.

Every document's ids are followed by the end-of-text id and the stream is cut into samples of
``seq_len + 1`` tokens (the final partial sample is dropped). In each block of
``round(1 / val_fraction)`` consecutive samples one, chosen from ``seed``, goes to validation.
Sample ``i`` of the stream is stored under key ``%010d`` as raw little-endian uint16 (uint32 when
the vocabulary exceeds 65536 ids) in the field ``tokens.bin``.

``manifest.json`` is written last and atomically; a directory without it is not a dataset.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import uuid
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import webdataset as wds

from trainer.data import DataError
from trainer.data.corpus import CORPUS_VERSION, write_builtin_corpus
from trainer.data.manifest import (
    FIELD,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TOKENIZER_DIR,
    load_manifest,
)
from trainer.data.readers import ReadCounter, expand_inputs, iter_documents
from trainer.data.tokenizer import Tokenizer, build_tokenizer

_BATCH_CHARS = 1 << 20  # characters per tokenization task
BUILTIN_DOCS = 6000
Progress = Callable[[str, dict[str, int]], None]  # (stage, counts) -> None
BUILTIN_VAL_FRACTION = 0.02


# ---- tokenize and pack -------------------------------------------------------------------------


def _batched(pieces: Iterator[tuple[str, bool]], counter: ReadCounter) -> Iterator[tuple[list, tuple]]:
    """Batches of about _BATCH_CHARS characters, each with (documents it ends, input bytes read by then,
    the input files its text comes from)."""
    batch: list[tuple[str, bool]] = []
    size = first = 0
    for piece in pieces:
        if not batch:
            first = len(counter.files) - 1  # the file this piece was read from
        batch.append(piece)
        size += len(piece[0])
        if size >= _BATCH_CHARS:
            yield batch, (sum(ends for _, ends in batch), counter.bytes, counter.files[first:])
            batch, size = [], 0
    if batch:
        yield batch, (sum(ends for _, ends in batch), counter.bytes, counter.files[first:])


def _encode(tokenizer: Tokenizer, batch: list[tuple[str, bool]]) -> np.ndarray:
    """One batch of pieces as a flat id array, with end-of-text after each finished document."""
    eot = np.array([tokenizer.eot_id], dtype=np.int64)
    parts = []
    for ids, (_, ends) in zip(tokenizer.encode_batch([text for text, _ in batch]), batch, strict=True):
        parts += [ids, eot] if ends else [ids]
    return np.concatenate(parts)


_WORKER_TOKENIZER: Tokenizer | None = None  # set once in each pool worker process, never in the parent


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(batch: list[tuple[str, bool]]) -> np.ndarray:
    assert _WORKER_TOKENIZER is not None
    return _encode(_WORKER_TOKENIZER, batch)


def _named(encoded: Callable[[], np.ndarray], files: list[Path]) -> np.ndarray:
    """``encoded()``; a tokenizer's DataError (it sees only text) gets the batch's input files named."""
    try:
        return encoded()
    except DataError as exn:
        raise DataError(f"{_names(files)}: {exn}") from None


def _token_chunks(
    tokenizer: Tokenizer, batches: Iterator[tuple[list, tuple]], num_workers: int
) -> Iterator[tuple[np.ndarray, tuple]]:
    """(ids, the batch's tag) in input order; with workers, at most 2 per worker in flight."""
    if num_workers <= 1:
        yield from ((_named(partial(_encode, tokenizer, b), tag[2]), tag) for b, tag in batches)
        return
    with multiprocessing.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for batch, tag in batches:
            pending.append((pool.apply_async(_encode_in_worker, (batch,)), tag))
            if len(pending) >= 2 * num_workers:
                result, tag = pending.popleft()
                yield _named(result.get, tag[2]), tag
        while pending:
            result, tag = pending.popleft()
            yield _named(result.get, tag[2]), tag


def _pack(
    chunks: Iterator[tuple[np.ndarray, tuple]], sample_len: int, stats: dict[str, int], report: Callable
) -> Iterator[np.ndarray]:
    """Consecutive non-overlapping rows of ``sample_len`` tokens; the final partial row is dropped."""
    rest = np.zeros(0, np.int64)
    for chunk, (documents, bytes_read, _) in chunks:
        stats["tokens"] += len(chunk)
        stats["documents"] += documents
        report(bytes_read)
        buf = np.concatenate([rest, chunk])
        n = len(buf) // sample_len
        yield from buf[: n * sample_len].reshape(n, sample_len)
        rest = buf[n * sample_len :]
    stats["dropped_tokens"] = len(rest)


def _assign_splits(
    rows: Iterator[np.ndarray], val_fraction: float, seed: int
) -> Iterator[tuple[str, int, Any]]:
    """(split, stream index, row): in every block of round(1/val_fraction) rows, one seeded row is val.

    The final partial block follows the same rule, except that it gives val its only row when
    there was no full block (so val is never empty when there are at least two rows).
    """
    block = max(2, round(1 / val_fraction))
    rng = random.Random(seed)
    pending: list[tuple[int, np.ndarray]] = []
    full_blocks = 0
    for index, row in enumerate(rows):
        pending.append((index, row))
        if len(pending) == block:
            pick = rng.randrange(block)
            yield from (("val" if j == pick else "train", i, r) for j, (i, r) in enumerate(pending))
            pending, full_blocks = [], full_blocks + 1
    if pending:
        pick = rng.randrange(block)
        if full_blocks == 0 and len(pending) > 1:
            pick = min(pick, len(pending) - 1)
        yield from (("val" if j == pick else "train", i, r) for j, (i, r) in enumerate(pending))


# ---- shards and manifest -----------------------------------------------------------------------


def _names(files: list[Path]) -> str:
    """The first few of ``files``, for messages."""
    return ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _SplitWriter:
    """One split's ShardWriter, opened on the first sample (no empty shard) and recording each shard."""

    def __init__(self, directory: Path, split: str, max_samples: int, max_bytes: int):
        self.pattern = str(directory / f"{split}-%06d.tar")
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._sink: wds.ShardWriter | None = None

    def write(self, key: str, payload: bytes) -> None:
        if self._sink is None:
            self._sink = wds.ShardWriter(
                self.pattern,
                maxcount=self.max_samples,
                maxsize=self.max_bytes,
                post=self._finished,
                verbose=0,
                encoder=False,
                mtime=0,  # fixed mtime: same input, byte-identical shards
            )
        self._sink.write({"__key__": key, FIELD: payload})

    def _finished(self, fname: str) -> None:
        path = Path(fname)
        assert self._sink is not None
        entry = {"path": path.name, "samples": self._sink.count, "sha256": file_sha256(path)}
        self.shards.append({**entry, "bytes": path.stat().st_size})

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def summary(self, sample_len: int) -> dict[str, Any]:
        samples = sum(s["samples"] for s in self.shards)
        return {"shards": self.shards, "samples": samples, "tokens": samples * sample_len}


@dataclass(frozen=True)
class _Options:
    seq_len: int
    val_fraction: float
    shard_max_samples: int
    shard_max_bytes: int
    text_field: str
    vocab_size: int
    seed: int
    num_workers: int
    progress: Progress | None = None


def _write_shards(tok: Tokenizer, files: list[Path], staging: Path, opts: _Options) -> dict[str, Any]:
    """Tokenize, pack and write both splits into ``staging``; returns the splits and stream stats."""
    sample_len = opts.seq_len + 1
    dtype = "<u2" if tok.vocab_size <= 1 << 16 else "<u4"
    stats = {"documents": 0, "tokens": 0, "dropped_tokens": 0}

    counter = ReadCounter()

    def report(bytes_read: int) -> None:  # as each tokenized batch arrives (reading runs ahead)
        if opts.progress is not None:
            samples = stats["tokens"] // sample_len
            opts.progress("shards", {**stats, "samples": samples, "bytes_read": bytes_read})

    batches = _batched(iter_documents(files, opts.text_field, counter), counter)
    rows = _pack(_token_chunks(tok, batches, opts.num_workers), sample_len, stats, report)
    writers = {s: _SplitWriter(staging, s, opts.shard_max_samples, opts.shard_max_bytes) for s in SPLITS}
    try:
        for split, index, row in _assign_splits(rows, opts.val_fraction, opts.seed):
            writers[split].write(f"{index:010d}", row.astype(dtype).tobytes())
    finally:
        for writer in writers.values():
            writer.close()
    names = _names(files)
    if stats["documents"] == 0:
        raise DataError(f"{names}: no documents found (all empty?): check the inputs and text_field")
    splits = {s: w.summary(sample_len) for s, w in writers.items()}
    if not all(splits[s]["samples"] for s in SPLITS):
        raise DataError(
            f"{names}: only {stats['tokens']} tokens, fewer than two samples of seq_len+1={sample_len}: "
            "add text or lower seq_len"
        )
    return {"dtype": "uint16" if dtype == "<u2" else "uint32", "splits": splits, "stats": stats}


def _training_texts(files: list[Path], opts: _Options) -> Iterator[str]:
    """The documents' text for training a tokenizer, reporting progress about every MB read."""
    counter, reported = ReadCounter(), 0
    for text, _ in iter_documents(files, opts.text_field, counter):
        if opts.progress is not None and counter.bytes - reported >= 1 << 20:
            opts.progress("tokenizer", {"bytes_read": counter.bytes})
            reported = counter.bytes
        yield text


def _build(files: list[Path], staging: Path, tokenizer: str | Path, opts: _Options) -> dict[str, Any]:
    """Write tokenizer and shards into ``staging``; returns the manifest (not yet written)."""
    tok = build_tokenizer(tokenizer, lambda: _training_texts(files, opts), opts.vocab_size)
    tok.save(staging / TOKENIZER_DIR)
    written = _write_shards(tok, files, staging, opts)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "seq_len": opts.seq_len,
        "sample_len": opts.seq_len + 1,
        "dtype": written["dtype"],
        "field": FIELD,
        "tokenizer": {
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "identity": tok.identity(),
            "path": TOKENIZER_DIR,
        },
        "splits": written["splits"],
        "stats": written["stats"],
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "sources": [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files],
    }


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())  # the manifest is the commit marker: its content must be on disk first
    os.replace(tmp, path)


def _publish(staging: Path, out_dir: Path, manifest: dict[str, Any]) -> None:
    """Move a finished build to ``out_dir``, the manifest last, so readers see old, nothing or new."""
    try:
        os.rename(staging, out_dir)  # out_dir absent or empty: one atomic step
    except OSError:
        if not out_dir.is_dir():
            raise
        (out_dir / MANIFEST).unlink(missing_ok=True)  # from here the old dataset is invalid
        for old in [*out_dir.glob("train-*.tar"), *out_dir.glob("val-*.tar"), out_dir / TOKENIZER_DIR]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        for item in staging.iterdir():
            os.replace(item, out_dir / item.name)
    _write_json_atomic(out_dir / MANIFEST, manifest)


def _staging_dir(out_dir: Path) -> Path:
    """A fresh directory beside ``out_dir`` (same file system, so the final rename is atomic)."""
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    return staging


def prepare_dataset(
    inputs: list[str | Path],
    out_dir: Path,
    *,
    seq_len: int,
    tokenizer: str | Path = "byte",
    val_fraction: float = 0.01,
    shard_max_samples: int = 10_000,
    shard_max_bytes: int = 256 << 20,
    text_field: str = "text",
    vocab_size: int = 8192,
    seed: int = 0,
    num_workers: int = 1,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into train/val tar shards and ``manifest.json`` in ``out_dir``; returns it.

    ``tokenizer``: byte | char | bpe (trained here to ``vocab_size``) | a tokenizer.json | a saved
    tokenizer directory. The build happens in a temporary directory beside ``out_dir``; shards of
    an older dataset in ``out_dir`` are replaced and its manifest is removed before the new one lands.
    ``progress(stage, counts)`` is called as the work advances: stage ``tokenizer`` while a char/bpe
    tokenizer reads the corpus (``bytes_read``), then ``shards`` (``bytes_read``, ``documents``,
    ``tokens``, ``samples``); ``bytes_read`` counts input file bytes (compressed bytes for .gz).
    """
    if seq_len <= 0 or shard_max_samples <= 0 or num_workers <= 0:
        raise ValueError("seq_len, shard_max_samples and num_workers must be positive")
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 0.5]")
    out_dir = Path(out_dir).resolve()  # its parent holds the staging directory
    if out_dir.exists() and not out_dir.is_dir():  # else found only after all the work, when publishing
        raise DataError(f"out_dir={out_dir} is a file, not a directory: choose another out_dir")
    files = expand_inputs(inputs)
    opts = _Options(
        seq_len,
        val_fraction,
        shard_max_samples,
        shard_max_bytes,
        text_field,
        vocab_size,
        seed,
        num_workers,
        progress,
    )
    staging = _staging_dir(out_dir)
    try:
        manifest = _build(files, staging, tokenizer, opts)
        _publish(staging, out_dir, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (and nodes, where the file system supports flock)."""
    with open(path, "a") as f:
        # No flock on some network file systems: then the atomic publish alone has to do.
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _usable_builtin(out_dir: Path, seq_len: int, builtin: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest in ``out_dir`` if it is this exact built-in dataset and its shards are present."""

    if not (out_dir / MANIFEST).is_file():
        return None
    try:
        manifest = load_manifest(out_dir)
    except DataError:
        return None  # unreadable: rebuild it
    if "builtin" not in manifest:
        raise DataError(
            f"{out_dir} holds a prepared dataset that is not the built-in corpus: "
            "set data.builtin=false to train on it, or choose another data.path"
        )
    if manifest["builtin"] != builtin or manifest["seq_len"] != seq_len:
        return None
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = out_dir / shard["path"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                return None
    return manifest


def prepare_builtin(out_dir: Path, seq_len: int, seed: int = 0, n_docs: int = BUILTIN_DOCS) -> dict[str, Any]:
    """The built-in corpus, byte-tokenized into ``out_dir``; a no-op when it is already there.

    Safe when several processes call it at once: they serialize on a lock file beside ``out_dir``,
    each build happens in its own temporary directory, and a matching dataset is returned as is.
    """
    out_dir = Path(out_dir).resolve()  # its parent holds the staging directory
    builtin = {"corpus_version": CORPUS_VERSION, "seed": seed, "n_docs": n_docs}
    manifest = _usable_builtin(out_dir, seq_len, builtin)
    if manifest is not None:
        return manifest
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        manifest = _usable_builtin(out_dir, seq_len, builtin)  # built by another process meanwhile?
        if manifest is not None:
            return manifest
        staging = _staging_dir(out_dir)
        try:
            corpus = write_builtin_corpus(staging / "corpus.jsonl", n_docs=n_docs, seed=seed)
            shard_samples = max(64, (1 << 16) // (seq_len + 1))  # ~16 train shards at any seq_len
            opts = _Options(seq_len, BUILTIN_VAL_FRACTION, shard_samples, 256 << 20, "text", 0, seed, 1)
            manifest = _build([corpus], staging, "byte", opts)
            manifest["sources"] = [{"path": corpus.name, "bytes": corpus.stat().st_size}]
            manifest["builtin"] = builtin
            _publish(staging, out_dir, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return manifest
