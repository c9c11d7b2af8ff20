"""read_shard: the fast slicing path and tarfile's member-by-member path give the same samples."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from trainer.data import shards
from trainer.data.loader import load_manifest
from trainer.data.prepare import prepare_dataset
from trainer.data.shards import ReadBuffer, _read_members, _slice_regular, read_shard

SEQ = 8
SAMPLE_BYTES = (SEQ + 1) * 2


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[Path, int, str]:
    root = tmp_path_factory.mktemp("shards")
    (root / "a.txt").write_text("\n\n".join(f"doc {i} " + "xy" * (i % 13) for i in range(80)))
    m = prepare_dataset([root / "a.txt"], root / "ds", seq_len=SEQ, shard_max_samples=50)
    entry = m["splits"]["train"]["shards"][0]
    return root / "ds" / entry["path"], entry["samples"], entry["sha256"]


def members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]


def write_tar(items: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, payload in items:
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def expected(path: Path) -> np.ndarray:
    return np.stack([np.frombuffer(p, np.uint8) for _, p in members(path)])


def test_fast_path_equals_tarfile_on_prepared_shards(shard):
    path, n, sha = shard
    data = path.read_bytes()
    fast = _slice_regular(data, n, SAMPLE_BYTES)
    assert fast is not None and np.array_equal(fast, expected(path))
    out = np.empty((n, SAMPLE_BYTES), np.uint8)
    valid, problem = _read_members(data, out)
    assert problem is None and valid.all() and np.array_equal(out, fast)
    valid, problem = read_shard(str(path), out, sha256=sha)
    assert problem is None and valid.all() and np.array_equal(out, fast)


def test_other_writers_layouts_go_the_slow_way_with_the_same_result(shard, tmp_path):
    path, n, _ = shard
    items = members(path)
    long_names = [(tarfile.TarInfo(f"{'k' * 120}{i:04d}.tokens.bin"), p) for i, (_, p) in enumerate(items)]
    for name, data in [
        ("gnu", write_tar(items, tarfile.GNU_FORMAT)),
        ("pax-long-names", write_tar(long_names)),  # pax extended headers between the members
    ]:
        out = np.empty((n, SAMPLE_BYTES), np.uint8)
        (tmp_path / name).write_bytes(data)
        valid, problem = read_shard(str(tmp_path / name), out)
        assert problem is None and valid.all() and np.array_equal(out, expected(path)), name
    assert _slice_regular(write_tar(long_names), n, SAMPLE_BYTES) is None


def test_a_renamed_member_keeps_its_place(shard, tmp_path):
    """A member that is not a tokens.bin is a bad sample at its position, not a shift of the rest."""
    path, n, _ = shard
    items = members(path)
    items[3][0].name = items[3][0].name.replace("tokens.bin", "other")
    (tmp_path / "t.tar").write_bytes(write_tar(items, tarfile.GNU_FORMAT))
    out = np.empty((n, SAMPLE_BYTES), np.uint8)
    valid, problem = read_shard(str(tmp_path / "t.tar"), out)
    assert problem == f"sample 3's tokens.bin is missing or not {SAMPLE_BYTES} bytes"
    assert valid.tolist() == [i != 3 for i in range(n)]
    keep = np.arange(n) != 3
    assert np.array_equal(out[keep], expected(path)[keep]) and not out[3].any()


def test_extra_member_or_corrupt_header(shard, tmp_path):
    path, n, _ = shard
    out = np.empty((n, SAMPLE_BYTES), np.uint8)
    items = members(path)
    (tmp_path / "more.tar").write_bytes(write_tar([*items, items[0]], tarfile.GNU_FORMAT))
    valid, problem = read_shard(str(tmp_path / "more.tar"), out)
    assert not valid.any() and problem == f"holds more than the {n} samples the manifest says"
    data = bytearray(path.read_bytes())
    data[1024 * 7 + 130] ^= 0x01  # the size field of member 7's header: its checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    valid, problem = read_shard(str(tmp_path / "bad.tar"), out)
    assert (
        problem == f"holds 7 samples but the manifest says {n} (truncated or replaced)"
    )  # tarfile stops there
    assert valid.tolist() == [i < 7 for i in range(n)]
    assert np.array_equal(out[:7], expected(path)[:7])


def test_pipe_command_failure_is_a_read_problem(shard):
    path, n, _ = shard
    out = np.empty((n, SAMPLE_BYTES), np.uint8)
    valid, problem = read_shard(f"pipe:cat {path}.missing 2>/dev/null", out)
    assert not valid.any() and problem.startswith("cannot read it")
    valid, problem = read_shard(f"pipe:cat {path}", out)
    assert valid.all() and problem is None
    assert load_manifest(path.parent)["splits"]["train"]["shards"][0]["samples"] == n


@pytest.mark.parametrize("piece", [1, 3 * 1024, 1 << 20])  # bytes per read: rounded up to whole samples
def test_local_reads_in_pieces_agree_with_whole_reads(shard, tmp_path, monkeypatch, piece):
    """A local file is checked piece by piece; a pipe: command goes the whole-data way. Same results."""
    monkeypatch.setattr(shards, "_PIECE", piece)
    path, n, sha = shard
    data = path.read_bytes()
    end = n * 1024  # prepare's layout at this sample size: 1024 bytes per sample
    variants = {
        "intact": data,
        "appended": data + b"x" * 10,
        "extra member": data[:end] + data[:1024] + data[end:],
    }
    for cut in (100, 3 * 1024, 3 * 1024 + 600, end, end + 512, end + 1023, end + 1024, len(data) - 1):
        variants[f"cut at {cut}"] = data[:cut]
    for at in (5 * 1024 + 20, 5 * 1024 + 130, 5 * 1024 + 156, 5 * 1024 + 520, end + 700):
        changed = bytearray(data)  # a name, size or type byte, a payload byte, an end-of-archive byte
        changed[at] ^= 1
        variants[f"byte {at}"] = bytes(changed)
    for name, content in variants.items():
        (tmp_path / "v.tar").write_bytes(content)
        for digest in (None, sha):
            local, whole = np.full((n, SAMPLE_BYTES), 7, np.uint8), np.full((n, SAMPLE_BYTES), 9, np.uint8)
            got = read_shard(str(tmp_path / "v.tar"), local, digest, ReadBuffer())
            want = read_shard(f"pipe:cat {tmp_path / 'v.tar'}", whole, digest)
            assert got[1] == want[1] and np.array_equal(got[0], want[0]), (name, digest)
            assert np.array_equal(local, whole), (name, digest)


def test_read_buffer_is_page_aligned():
    """Reads into a buffer that is not 32-byte aligned ran 3.5-4x slower on the project's machines."""
    buffer = ReadBuffer()
    for size in (1000, 600_000, 5000):
        view = np.frombuffer(buffer.view(size), np.uint8)
        assert len(view) == size and view.ctypes.data % 4096 == 0
