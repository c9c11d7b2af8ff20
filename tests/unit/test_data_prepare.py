"""prepare_dataset and the tokenizers: round trips, manifest integrity, input formats, errors."""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from trainer.data import DataError
from trainer.data.prepare import prepare_dataset
from trainer.data.readers import expand_inputs
from trainer.data.tokenizer import EOT_TEXT, build_tokenizer, load_tokenizer, train_bpe

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "A second document\nspans two lines: naïve café, 日本語, emoji 🙂.",
    "Numbers: 12 + 30 = 42. 7 * 6 = 42.",
    "  Leading spaces and a\ttab stay as they are.",
] * 6


def write_text(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")  # several blank lines also separate
    return path


def read_split(out: Path, manifest: dict, split: str) -> dict[int, np.ndarray]:
    """Stream index -> tokens, read with plain tarfile (independent of the loader)."""
    dtype = {"uint16": "<u2", "uint32": "<u4"}[manifest["dtype"]]
    rows = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["path"]) as tf:
            members = tf.getmembers()
            assert len(members) == shard["samples"]
            for m in members:
                key, field = m.name.split(".", 1)
                assert field == "tokens.bin"
                rows[int(key)] = np.frombuffer(tf.extractfile(m).read(), dtype)
    return rows


def all_rows(out: Path, manifest: dict) -> np.ndarray:
    rows = read_split(out, manifest, "train") | read_split(out, manifest, "val")
    assert sorted(rows) == list(range(len(rows)))  # train + val are exactly the packed stream
    return np.concatenate([rows[i] for i in range(len(rows))])


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_round_trip_text_to_shards_to_text(tmp_path, kind):
    src = write_text(tmp_path / "docs.txt", DOCS)
    out = tmp_path / "ds"
    m = prepare_dataset([src], out, seq_len=16, tokenizer=kind, val_fraction=0.2, shard_max_samples=7,
                        vocab_size=300)  # fmt: skip
    tok = load_tokenizer(out / "tokenizer")
    expected = np.concatenate([tok.encode(d) + [tok.eot_id] for d in DOCS])
    assert tok.decode(expected.tolist()) == "".join(d + EOT_TEXT for d in DOCS)  # tokenizer is lossless

    stored = all_rows(out, m)
    n = len(stored)
    assert n % 17 == 0 and 0 <= len(expected) - n < 17  # only the final partial sample is dropped
    assert np.array_equal(stored, expected[:n])
    assert tok.decode(stored.tolist() + expected[n:].tolist()) == "".join(d + EOT_TEXT for d in DOCS)
    assert m["stats"] == {
        "documents": len(DOCS),
        "tokens": len(expected),
        "dropped_tokens": len(expected) - n,
    }
    assert m["tokenizer"]["kind"] == kind and m["tokenizer"]["eot_id"] == tok.eot_id
    assert m["tokenizer"]["vocab_size"] == tok.vocab_size and int(stored.max()) < tok.vocab_size


def test_manifest_matches_files(tmp_path):
    out = tmp_path / "ds"
    m = prepare_dataset([write_text(tmp_path / "a.txt", DOCS)], out, seq_len=16, shard_max_samples=5,
                        val_fraction=0.25)  # fmt: skip
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["seq_len"] == 16 and m["dtype"] == "uint16" and m["version"] == 1
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["samples"] == sum(s["samples"] for s in info["shards"]) > 0
        assert info["tokens"] == info["samples"] * 17
        assert all(s["samples"] <= 5 for s in info["shards"])
        for shard in info["shards"]:
            data = (out / shard["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
        assert len(read_split(out, m, split)) == info["samples"]
    total = m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"]
    assert m["splits"]["val"]["samples"] in (total // 4, -(-total // 4))  # one of every block of 4
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == sorted(
        s["path"] for split in m["splits"].values() for s in split["shards"]
    )


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_tokenizer_saved_and_reloaded(tmp_path, kind):
    text = "héllo wörld\n\nsecond doc"
    out = tmp_path / "ds"
    m = prepare_dataset(
        [write_text(tmp_path / "a.txt", DOCS)], out, seq_len=8, tokenizer=kind, vocab_size=300
    )
    tok = load_tokenizer(out / "tokenizer")
    again = load_tokenizer(out / "tokenizer")
    probe = "Numbers: 12 + 30 = 42. The lazy fox."
    assert tok.encode(probe) == again.encode(probe) and tok.decode(tok.encode(probe)) == probe
    assert tok.identity() == again.identity() == m["tokenizer"]["identity"]
    if kind != "char":  # char only knows the corpus' characters
        assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_rejects_unknown_character(tmp_path):
    prepare_dataset([write_text(tmp_path / "a.txt", DOCS)], tmp_path / "ds", seq_len=8, tokenizer="char")
    with pytest.raises(DataError, match="not in the char tokenizer"):
        load_tokenizer(tmp_path / "ds" / "tokenizer").encode("Ω")


def test_existing_tokenizer_json_is_used_as_is(tmp_path):
    src = write_text(tmp_path / "a.txt", DOCS)
    first = prepare_dataset([src], tmp_path / "a", seq_len=8, tokenizer="bpe", vocab_size=300)
    second = prepare_dataset(
        [src], tmp_path / "b", seq_len=8, tokenizer=tmp_path / "a/tokenizer/tokenizer.json"
    )
    assert second["tokenizer"]["kind"] == "hf"
    assert second["splits"]["train"]["shards"] == first["splits"]["train"]["shards"]  # identical ids
    with pytest.raises(DataError, match="not byte, char, bpe"):
        prepare_dataset([src], tmp_path / "c", seq_len=8, tokenizer="gpt2")


def test_identity_differs_between_tokenizers(tmp_path):
    src = write_text(tmp_path / "a.txt", DOCS)
    manifests = [
        prepare_dataset([src], tmp_path / k, seq_len=8, tokenizer=k, vocab_size=300)
        for k in ["byte", "char", "bpe"]
    ]
    assert len({m["tokenizer"]["identity"] for m in manifests}) == 3


def test_jsonl_with_text_field_and_directory_input(tmp_path):
    tmp_path = tmp_path / ".cache"  # a hidden directory above the input does not hide its files
    (tmp_path / "in" / ".git").mkdir(parents=True)
    (tmp_path / "in" / ".git" / "notes.txt").write_text("hidden files are skipped")
    with open(tmp_path / "in" / "b.jsonl", "w") as f:
        for i, doc in enumerate(DOCS[:4]):
            f.write(json.dumps({"id": i, "body": doc}) + "\n\n")  # blank lines are skipped
    with gzip.open(tmp_path / "in" / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "zipped document"}) + "\n")
    (tmp_path / "in" / "ignored.bin").write_bytes(b"\x00\xff")
    write_text(tmp_path / "in" / "a.txt", ["plain text first"])
    m = prepare_dataset([tmp_path / "in"], tmp_path / "ds", seq_len=4, text_field="body")
    tok = load_tokenizer(tmp_path / "ds" / "tokenizer")
    docs = ["plain text first", *DOCS[:4], "zipped document"]  # files in sorted order: a, b, c
    expected = np.concatenate([tok.encode(d) + [tok.eot_id] for d in docs])
    stored = all_rows(tmp_path / "ds", m)
    assert np.array_equal(stored, expected[: len(stored)]) and m["stats"]["documents"] == 6
    assert [Path(s["path"]).name for s in m["sources"]] == ["a.txt", "b.jsonl", "c.jsonl.gz"]


def test_glob_input(tmp_path):
    for i in range(3):
        write_text(tmp_path / f"part{i}.txt", [f"document number {i} " * 3])
    m = prepare_dataset([str(tmp_path / "part*.txt")], tmp_path / "ds", seq_len=8)
    assert [Path(s["path"]).name for s in m["sources"]] == ["part0.txt", "part1.txt", "part2.txt"]


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        prepare_dataset([src], tmp_path / "ds", seq_len=4)
    src.write_text('{"text": "fine"}\n{"content": "wrong key"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no string field 'text'.*text_field"):
        prepare_dataset([src], tmp_path / "ds", seq_len=4)
    assert not (tmp_path / "ds").exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]  # no staging directory left behind


def test_empty_and_too_small_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(DataError, match="empty.txt: no documents"):
        prepare_dataset([empty], tmp_path / "ds", seq_len=4)
    tiny = write_text(tmp_path / "tiny.txt", ["abc"])
    with pytest.raises(DataError, match="fewer than two samples.*lower seq_len"):
        prepare_dataset([tiny], tmp_path / "ds", seq_len=4)
    assert not (tmp_path / "ds").exists()


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nope.txt: no such file"):
        prepare_dataset([tmp_path / "nope.txt"], tmp_path / "ds", seq_len=4)
    with pytest.raises(DataError, match=r"nothing\*.txt: the pattern matches no file"):
        prepare_dataset([str(tmp_path / "nothing*.txt")], tmp_path / "ds", seq_len=4)


def test_not_utf8_names_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(
        DataError, match=r"latin1\.txt:1: not UTF-8 text \(invalid continuation byte at byte 3\)"
    ):
        prepare_dataset([bad], tmp_path / "ds", seq_len=4)


@pytest.mark.parametrize("name", ["big.txt", "big.txt.gz"])
def test_not_utf8_reports_the_line_and_byte_in_the_file(tmp_path, name):
    data = b"a" * 20_000 + b"\n\nxx\xffyy\n"  # past the decoder's first chunk
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(DataError, match=rf"{name}:3: not UTF-8 text \(invalid start byte at byte 20004\)"):
        prepare_dataset([tmp_path / name], tmp_path / "ds", seq_len=4)


def test_corrupt_gz_names_file(tmp_path):
    bad = tmp_path / "c.txt.gz"
    bad.write_bytes(gzip.compress(b"some text\n" * 100)[:10] + b"garbage, not deflate data" * 10)
    with pytest.raises(DataError, match=r"c\.txt\.gz: cannot read .*check the file"):
        prepare_dataset([bad], tmp_path / "ds", seq_len=4)


def test_jsonl_lone_surrogate_and_deep_nesting_name_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "\\ud800abc"}\n')  # a \u escape of half a surrogate pair
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'text' holds a lone surrogate"):
        prepare_dataset([src], tmp_path / "ds", seq_len=4)
    src.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        prepare_dataset([src], tmp_path / "ds", seq_len=4)


def test_out_dir_that_is_a_file_fails_before_any_work(tmp_path):
    src = write_text(tmp_path / "a.txt", DOCS)
    (tmp_path / "ds").write_text("a file")
    with pytest.raises(DataError, match=r"out_dir=.*ds is a file, not a directory"):
        prepare_dataset([src], tmp_path / "ds", seq_len=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "ds"]  # no staging directory


def test_glob_matching_a_broken_symlink_names_it(tmp_path):
    write_text(tmp_path / "part0.txt", ["a document"])
    (tmp_path / "part1.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(DataError, match=r"part1\.txt: matched by .*part\*\.txt but not a readable file"):
        expand_inputs([str(tmp_path / "part*.txt")])


def wordlevel_json(path: Path, vocab: dict[str, int]) -> Path:
    """A whitespace-split WordLevel tokenizer.json with end-of-text as a special token."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    hf = HFTok(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens([EOT_TEXT])
    hf.save(str(path))
    return path


def test_tokenizer_json_with_id_gaps_gets_every_id(tmp_path):
    tok_json = wordlevel_json(tmp_path / "tok.json", {"[UNK]": 0, "a": 1, "b": 2, EOT_TEXT: 70000})
    src = write_text(tmp_path / "a.txt", ["a b a", "b b a a"] * 5)
    m = prepare_dataset([src], tmp_path / "ds", seq_len=4, tokenizer=tok_json, val_fraction=0.5)
    assert m["tokenizer"]["vocab_size"] == 70001 and m["tokenizer"]["eot_id"] == 70000
    assert m["dtype"] == "uint32"
    stored = all_rows(tmp_path / "ds", m)
    assert set(stored.tolist()) == {1, 2, 70000}  # end-of-text did not wrap around in uint16
    assert load_tokenizer(tmp_path / "ds" / "tokenizer").vocab_size == 70001


def test_tokenizer_json_truncation_and_padding_are_ignored(tmp_path):
    hf = train_bpe(DOCS, 300).tok
    eot = hf.token_to_id(EOT_TEXT)
    expected = np.concatenate([hf.encode(d, add_special_tokens=False).ids + [eot] for d in DOCS])
    hf.enable_truncation(max_length=8)  # as some published tokenizer.json files come
    hf.enable_padding(length=12)
    hf.save(str(tmp_path / "tok.json"))
    src = write_text(tmp_path / "a.txt", DOCS)
    m = prepare_dataset([src], tmp_path / "ds", seq_len=16, tokenizer=tmp_path / "tok.json", val_fraction=0.2)
    stored = all_rows(tmp_path / "ds", m)
    assert m["stats"]["tokens"] == len(expected) and np.array_equal(stored, expected[: len(stored)])
    tok = load_tokenizer(tmp_path / "ds" / "tokenizer")
    full = stored.tolist() + expected[len(stored) :].tolist()
    assert tok.decode(full) == "".join(d + EOT_TEXT for d in DOCS)


def test_literal_end_of_text_in_a_document_is_plain_text(tmp_path):
    text = f"first part {EOT_TEXT} second part"
    bpe = train_bpe(DOCS, 300)
    saved = bpe.save(tmp_path / "bpe")
    loaded = [bpe, load_tokenizer(saved), build_tokenizer(saved / "tokenizer.json", lambda: [])]
    for tok in [*loaded, pickle.loads(pickle.dumps(bpe))]:  # pickled: as in prepare's worker processes
        ids = tok.encode(text)
        assert tok.eot_id not in ids and tok.decode(ids) == text
        assert tok.eot_id not in tok.encode_batch([text])[0]
    # Through prepare's workers: end-of-text only where a document ends, as with byte and char.
    docs = [text, *DOCS[:3]] * 4
    m = prepare_dataset([write_text(tmp_path / "a.txt", docs)], tmp_path / "ds", seq_len=8,
                        tokenizer=saved, num_workers=2)  # fmt: skip
    expected = np.concatenate([bpe.encode(d) + [bpe.eot_id] for d in docs])
    stored = all_rows(tmp_path / "ds", m)
    assert np.count_nonzero(expected == bpe.eot_id) == len(docs)
    assert np.array_equal(stored, expected[: len(stored)])


@pytest.mark.parametrize(
    "config", ['{"kind": "char"}', '["char"]', '{"kind": "char", "chars": 3}', '{"kind": "bpe", "file": 1}']
)
def test_malformed_tokenizer_config_names_the_file(tmp_path, config):
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(DataError, match=r"tokenizer_config\.json: .*prepare the data again"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_char_tokenizer_unknown_character_names_the_input_file(tmp_path, num_workers):
    prepare_dataset([write_text(tmp_path / "a.txt", DOCS)], tmp_path / "ds", seq_len=8, tokenizer="char")
    new = write_text(tmp_path / "new.txt", ["only known letters here", "but an Ω here"])
    with pytest.raises(DataError, match=r"new\.txt: character 'Ω' is not in the char tokenizer"):
        prepare_dataset([new], tmp_path / "ds2", seq_len=8, tokenizer=tmp_path / "ds" / "tokenizer",
                        num_workers=num_workers)  # fmt: skip


def test_smallest_dataset_has_train_and_val(tmp_path):
    m = prepare_dataset([write_text(tmp_path / "a.txt", ["abcdefghi"])], tmp_path / "ds", seq_len=4)
    assert m["splits"]["train"]["samples"] == 1 and m["splits"]["val"]["samples"] == 1


def test_deterministic_and_workers_agree(tmp_path):
    src = write_text(tmp_path / "a.txt", DOCS * 3)
    one = prepare_dataset([src], tmp_path / "one", seq_len=8, shard_max_samples=20, seed=3)
    two = prepare_dataset([src], tmp_path / "two", seq_len=8, shard_max_samples=20, seed=3, num_workers=2)
    assert one == two  # same ids, same split, byte-identical shards (same sha256)
    other = prepare_dataset([src], tmp_path / "other", seq_len=8, shard_max_samples=20, seed=4)
    assert other["splits"]["val"]["shards"] != one["splits"]["val"]["shards"]


def test_reprepare_replaces_old_dataset(tmp_path):
    src = write_text(tmp_path / "a.txt", DOCS * 3)
    prepare_dataset([src], tmp_path / "ds", seq_len=4, shard_max_samples=10)
    m = prepare_dataset([src], tmp_path / "ds", seq_len=32, shard_max_samples=10)
    listed = {s["path"] for split in m["splits"].values() for s in split["shards"]}
    assert {p.name for p in (tmp_path / "ds").glob("*.tar")} == listed  # no stale shards
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["seq_len"] == 32


def test_long_document_is_streamed_in_pieces(tmp_path, monkeypatch):
    import trainer.data.prepare as prep
    import trainer.data.readers as readers

    monkeypatch.setattr(readers, "_MAX_PIECE_CHARS", 50)
    monkeypatch.setattr(prep, "_BATCH_CHARS", 30)
    docs = ["\n".join(f"line {i} of a long document" for i in range(40)), "short one"]
    m = prepare_dataset([write_text(tmp_path / "a.txt", docs)], tmp_path / "ds", seq_len=8)
    tok = load_tokenizer(tmp_path / "ds" / "tokenizer")
    expected = np.concatenate([tok.encode(d) + [tok.eot_id] for d in docs])
    stored = all_rows(tmp_path / "ds", m)
    assert np.array_equal(stored, expected[: len(stored)]) and m["stats"]["documents"] == 2


def test_progress_reports_growing_counts_up_to_the_totals(tmp_path, monkeypatch):
    import trainer.data.prepare as prep

    monkeypatch.setattr(prep, "_BATCH_CHARS", 200)  # many batches, so many reports
    src = write_text(tmp_path / "a.txt", DOCS * 4)
    events: list[tuple[str, dict]] = []
    m = prepare_dataset([src], tmp_path / "ds", seq_len=8, num_workers=2,
                        progress=lambda stage, counts: events.append((stage, dict(counts))))  # fmt: skip
    shards = [counts for stage, counts in events if stage == "shards"]
    assert len(shards) > 3 and {stage for stage, _ in events} == {"shards"}
    for key in ("bytes_read", "documents", "tokens", "samples"):
        assert [c[key] for c in shards] == sorted(c[key] for c in shards), key
    last = shards[-1]
    assert last["bytes_read"] == src.stat().st_size and last["documents"] == m["stats"]["documents"]
    assert last["tokens"] == m["stats"]["tokens"] and last["samples"] == last["tokens"] // 9
