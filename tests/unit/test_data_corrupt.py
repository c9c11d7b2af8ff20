"""Damaged shards: ``on_corrupt=error`` names the file; ``on_corrupt=skip`` passes over exactly the bad
samples, identically on every world size, counts them, and resumes exactly."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from trainer.data import DataError
from trainer.data.loader import ShardLoader, load_manifest
from trainer.data.prepare import prepare_dataset

SEQ = 8
G = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """149 train samples in 12 shards of up to 13."""
    root = tmp_path_factory.mktemp("corrupt")
    docs = [f"Document {i}: " + "abcdefghij"[i % 10] * (5 + i % 17) for i in range(57)]
    (root / "docs.txt").write_text("\n\n".join(docs))
    prepare_dataset([root / "docs.txt"], root / "ds", seq_len=SEQ, shard_max_samples=13, val_fraction=0.1)
    return root / "ds"


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    shutil.copytree(dataset, tmp_path / "ds")
    return tmp_path / "ds"


def loader(path: Path, rank: int = 0, world: int = 1, **kw) -> ShardLoader:
    kw = {"seed": 0, "shuffle_window": 4, "on_corrupt": "skip", **kw}
    return ShardLoader(path, kw.pop("split", "train"), G, rank, world, **kw)


def global_batches(path: Path, world: int, n: int, state: dict | None = None, **kw) -> list[list[int]]:
    per_rank = []
    for rank in range(world):
        ld = loader(path, rank, world, **kw)
        if state is not None:
            ld.load_state_dict(state)
        it = iter(ld)
        per_rank.append([next(it)["sample_ids"].tolist() for _ in range(n)])
    return [sum((per_rank[r][k] for r in range(world)), []) for k in range(n)]


def expected(clean: Path, bad: set[int], n: int) -> list[list[int]]:
    """The documented semantics: the clean order with the bad samples taken out, cut into batches of G."""
    order = [i for i in sum(global_batches(clean, 1, n + 20, on_corrupt="error"), []) if i not in bad]
    return [order[k * G : (k + 1) * G] for k in range(n)]


def shard_ids(path: Path, index: int) -> list[int]:
    shards = load_manifest(path)["splits"]["train"]["shards"]
    first = sum(s["samples"] for s in shards[:index])
    return list(range(first, first + shards[index]["samples"]))


def shard_file(path: Path, index: int) -> Path:
    return path / load_manifest(path)["splits"]["train"]["shards"][index]["path"]


def test_missing_shard_is_skipped_identically_on_every_world_size(dataset, copy):
    shard_file(copy, 3).unlink()
    bad = set(shard_ids(copy, 3))
    one = global_batches(copy, 1, 40)  # 240 positions: more than an epoch of 149
    assert one == expected(dataset, bad, 40)
    assert global_batches(copy, 2, 40) == one and global_batches(copy, 3, 40) == one
    ld = loader(copy)
    it = iter(ld)
    for _ in range(40):
        next(it)
    state = ld.state_dict()
    assert ld.stats()["data_skipped"] == state["skipped_samples"] == state["consumed_samples"] - 40 * G
    assert state["skipped_samples"] in (len(bad), 2 * len(bad))  # once per epoch it was met


def test_truncated_shard_keeps_the_samples_before_the_damage(dataset, copy):
    path = shard_file(copy, 0)
    path.write_bytes(path.read_bytes()[: 1024 * 5 + 300])  # 5 whole members, then half a header
    bad = set(shard_ids(copy, 0)[5:])
    assert global_batches(copy, 1, 30) == expected(dataset, bad, 30)
    assert global_batches(copy, 3, 30) == global_batches(copy, 1, 30)


def test_changed_bytes_fail_verification_and_skip_the_whole_shard(dataset, copy):
    path = shard_file(copy, 5)
    data = bytearray(path.read_bytes())
    data[512 + 3] ^= 1  # one token of the first sample; the tar stays well-formed
    path.write_bytes(bytes(data))
    bad = set(shard_ids(copy, 5))
    assert global_batches(copy, 1, 30, verify=True) == expected(dataset, bad, 30)
    with pytest.raises(DataError, match=f"{path.name}: sha256 differs.*data.on_corrupt=skip"):
        global_batches(copy, 1, 30, verify=True, on_corrupt="error")


def _rewrite_with_one_short_sample(path: Path, index: int) -> None:
    """The same shard written again by tarfile, with sample ``index`` two bytes short."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as out:
        for i, (m, payload) in enumerate(members):
            payload = payload[:-2] if i == index else payload
            m.size = len(payload)
            out.addfile(m, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())


def test_a_sample_of_the_wrong_size_is_skipped_alone(dataset, copy):
    _rewrite_with_one_short_sample(shard_file(copy, 2), 4)
    bad = {shard_ids(copy, 2)[4]}
    assert global_batches(copy, 2, 30) == expected(dataset, bad, 30)
    with pytest.raises(DataError, match=r"000002.tar: sample 4's tokens.bin is missing or not 18 bytes"):
        global_batches(copy, 1, 30, on_corrupt="error")


@pytest.mark.parametrize("before,after", [(2, 1), (2, 3)])
def test_resume_with_skipping_is_exact(copy, before, after):
    shard_file(copy, 7).unlink()
    reference = global_batches(copy, 1, 45)
    states = []
    for rank in range(before):
        ld = loader(copy, rank, before)
        it = iter(ld)
        for _ in range(21):
            next(it)
        states.append(ld.state_dict())
    assert all(s == states[0] for s in states)
    state = json.loads(json.dumps(states[0]))
    assert global_batches(copy, after, 24, state=state) == reference[21:]
    resumed = loader(copy)
    resumed.load_state_dict(state)
    assert resumed.stats()["data_skipped"] == state["skipped_samples"]  # counted over the whole run


def test_every_shard_bad_is_an_error_not_a_hang(copy):
    for tar in copy.glob("train-*.tar"):
        tar.write_bytes(b"garbage")
    with pytest.raises(DataError, match="no intact sample in a whole epoch of 'train'"):
        global_batches(copy, 1, 1)


def test_skipped_shard_is_logged_once_on_rank_0(copy, caplog):
    shard_file(copy, 3).unlink()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        global_batches(copy, 2, 60)  # two epochs: the shard is met twice, by two ranks
    lines = [r.getMessage() for r in caplog.records if "train-000003.tar" in r.getMessage()]
    assert len(lines) == 1 and "No such file" in lines[0] and "skipping its 13 bad samples" in lines[0]


def test_val_with_skipping_is_the_same_every_pass(copy):
    m = load_manifest(copy)
    (copy / m["splits"]["val"]["shards"][0]["path"]).write_bytes(b"")
    val = loader(copy, split="val", infinite=False)
    assert [b["sample_ids"].tolist() for b in val] == [b["sample_ids"].tolist() for b in val]


def test_error_mode_names_the_missing_shard(copy):
    path = shard_file(copy, 0)
    path.unlink()
    with pytest.raises(DataError, match=f"shard {path}: cannot read it \\(No such file or directory\\)"):
        global_batches(copy, 1, 30, on_corrupt="error")
    with pytest.raises(ValueError, match="on_corrupt"):
        loader(copy, on_corrupt="ignore")


def test_skip_mode_on_intact_data_is_the_normal_order(dataset):
    assert global_batches(dataset, 1, 30) == global_batches(dataset, 1, 30, on_corrupt="error")
    assert loader(dataset).stats() == {"data_skipped": 0}
    assert np.all(np.diff([len(b) for b in global_batches(dataset, 3, 5)]) == 0)


def test_a_shard_is_hashed_once_per_file_identity_and_again_once_changed(copy):
    """data.verify_shards: sha256 once per shard file (size, mtime, inode, device) per loader, not on
    every read of every epoch; a shard rewritten in place gets a new identity, so it is hashed again
    and its damage is caught."""
    ld = loader(copy, on_corrupt="error", verify=True)
    it = iter(ld)
    per_epoch = ld.num_samples // G
    for _ in range(2 * per_epoch + 1):  # into a third epoch
        next(it)
    paths = [s["path"] for s in load_manifest(copy)["splits"]["train"]["shards"]]
    source = ld.sources[0]
    assert all(source.shard_reads[p] >= 2 for p in paths)  # every shard read in two epochs at least
    assert source.shard_hashes == {p: 1 for p in paths}  # but hashed once
    # Same size, one byte of a sample changed, a new mtime: as an editor or a bad copy would leave it.
    path = shard_file(copy, 5)
    data = bytearray(path.read_bytes())
    data[512 + 3] ^= 0xFF  # the first sample's payload
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(DataError, match=f"{path.name}: sha256 differs from the manifest"):
        for _ in range(2 * per_epoch):
            next(it)
    assert source.shard_hashes[path.name] == 2
