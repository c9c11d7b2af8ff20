"""The built-in corpus and prepare_builtin: deterministic, idempotent, safe under concurrent callers."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from trainer.data import DataError
from trainer.data.corpus import builtin_documents, write_builtin_corpus
from trainer.data.loader import ShardLoader
from trainer.data.prepare import prepare_builtin, prepare_dataset


def test_corpus_is_deterministic_and_structured(tmp_path):
    a = write_builtin_corpus(tmp_path / "a.jsonl", n_docs=400, seed=0).read_bytes()
    assert write_builtin_corpus(tmp_path / "b.jsonl", n_docs=400, seed=0).read_bytes() == a
    assert write_builtin_corpus(tmp_path / "c.jsonl", n_docs=400, seed=1).read_bytes() != a
    docs = [json.loads(line)["text"] for line in a.decode().splitlines()]
    assert len(docs) == 400 and docs == builtin_documents(400, seed=0)
    text = " ".join(docs)
    assert " = " in text and "The end." in text and "Count with me:" in text
    words = text.split()
    assert len(set(words)) < 600 < len(words) // 10  # a small vocabulary, used over and over


def test_full_corpus_is_fast_and_small(tmp_path):
    start = time.perf_counter()
    path = write_builtin_corpus(tmp_path / "corpus.jsonl")
    assert time.perf_counter() - start < 2.0
    assert 0.5e6 < path.stat().st_size < 4e6


def test_prepare_builtin_is_idempotent(tmp_path):
    out = tmp_path / "builtin"
    start = time.perf_counter()
    first = prepare_builtin(out, seq_len=128)
    assert time.perf_counter() - start < 10
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare_builtin(out, seq_len=128) == first
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # returned as is, not rebuilt
    assert first["tokenizer"]["kind"] == "byte" and first["builtin"]["seed"] == 0
    assert len(first["splits"]["train"]["shards"]) >= 8  # enough shards for window shuffling
    assert first["splits"]["val"]["samples"] >= 64  # eval_batches=4 of global batch 16
    batch = next(iter(ShardLoader(out, "train", 16, seed=0, shuffle_window=4)))
    assert batch["tokens"].shape == (16, 129)


def test_prepare_builtin_rebuilds_for_another_seq_len(tmp_path):
    out = tmp_path / "builtin"
    prepare_builtin(out, seq_len=16, n_docs=200)
    m = prepare_builtin(out, seq_len=32, n_docs=200)
    assert m["seq_len"] == 32 and json.loads((out / "manifest.json").read_text()) == m
    listed = {s["path"] for split in m["splits"].values() for s in split["shards"]}
    assert {p.name for p in out.glob("*.tar")} == listed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".builtin.tmp")] == []


def test_prepare_builtin_refuses_to_overwrite_other_data(tmp_path):
    (tmp_path / "a.txt").write_text("some text of a user's own dataset\n\nand another document")
    prepare_dataset([tmp_path / "a.txt"], tmp_path / "mine", seq_len=4)
    with pytest.raises(DataError, match="not the built-in corpus.*data.builtin=false"):
        prepare_builtin(tmp_path / "mine", seq_len=4)


def _call_prepare_builtin(out: str, queue) -> None:
    queue.put(json.dumps(prepare_builtin(Path(out), seq_len=16, n_docs=300)))


def test_concurrent_prepare_builtin(tmp_path):
    out = tmp_path / "shared" / "builtin"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_call_prepare_builtin, args=(str(out), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [json.loads(queue.get(timeout=60)) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] == results[2] == json.loads((out / "manifest.json").read_text())
    leftovers = [p.name for p in out.parent.iterdir() if p.name not in ("builtin", ".builtin.lock")]
    assert leftovers == []
    assert len(list(ShardLoader(out, "val", 4, infinite=False))) > 0
