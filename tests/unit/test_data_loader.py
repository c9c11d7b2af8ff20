"""ShardLoader: global order, world-size independence, exact resume, and damaged shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import DataError, to_device
from trainer.data import loader as loader_module
from trainer.data.loader import ShardLoader, load_manifest
from trainer.data.prepare import prepare_dataset

SEQ = 8
G = 6  # divisible by world sizes 1, 2 and 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """149 train samples in 12 shards of up to 13 (the last one shorter): 3 windows of 4 shards."""
    root = tmp_path_factory.mktemp("loader")
    docs = [f"Document {i}: " + "abcdefghij"[i % 10] * (5 + i % 17) for i in range(57)]
    (root / "docs.txt").write_text("\n\n".join(docs))
    m = prepare_dataset([root / "docs.txt"], root / "ds", seq_len=SEQ, shard_max_samples=13, val_fraction=0.1)
    assert m["splits"]["train"]["samples"] == 149 and len(m["splits"]["train"]["shards"]) == 12
    return root / "ds"


def loader(path: Path, split: str = "train", rank: int = 0, world: int = 1, **kw) -> ShardLoader:
    kw = {"seed": 0, "shuffle_window": 4, "infinite": split == "train", **kw}
    return ShardLoader(path, split, G, rank, world, **kw)


def take(it, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(it) for _ in range(n)]


def ids_of(batches) -> list[list[int]]:
    return [b["sample_ids"].tolist() for b in batches]


def global_batches(path: Path, world: int, n: int, state: dict | None = None, **kw) -> list[list[int]]:
    """Sample ids of n global batches, assembled from all ranks' slices in rank order."""
    per_rank = []
    for rank in range(world):
        ld = loader(path, rank=rank, world=world, **kw)
        if state is not None:
            ld.load_state_dict(state)
        per_rank.append(ids_of(take(iter(ld), n)))
    return [sum((per_rank[r][k] for r in range(world)), []) for k in range(n)]


def at_position(state: dict, consumed: int) -> dict:
    """A single-source loader state moved to another position."""
    return {
        **state,
        "consumed_samples": consumed,
        "sources": [{**state["sources"][0], "consumed_samples": consumed}],
    }


def stored_tokens(path: Path, split: str) -> np.ndarray:
    """All samples of a split in manifest order (the sample id order), read with plain tarfile."""
    m = load_manifest(path)
    rows = []
    for shard in m["splits"][split]["shards"]:
        with tarfile.open(path / shard["path"]) as tf:
            rows += [np.frombuffer(tf.extractfile(x).read(), "<u2") for x in tf.getmembers()]
    return np.stack(rows).astype(np.int64)


def test_batch_contents_match_the_shards(dataset):
    tokens = stored_tokens(dataset, "train")
    for batch in take(iter(loader(dataset, world=2, rank=1)), 30):
        ids, rows = batch["sample_ids"], batch["tokens"]
        assert rows.shape == (G // 2, SEQ + 1) and rows.is_contiguous()
        assert rows.dtype == torch.int32 and ids.dtype == torch.long
        assert torch.equal(rows.long(), torch.from_numpy(tokens[ids.numpy()]))
        x, y = to_device(rows, torch.device("cpu"))  # what the model gets: int64 inputs and labels
        assert x.dtype == y.dtype == torch.long and x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x, torch.from_numpy(tokens[ids.numpy(), :-1]))
        assert torch.equal(y, torch.from_numpy(tokens[ids.numpy(), 1:]))


def test_every_sample_once_per_epoch_and_epochs_differ(dataset):
    n = load_manifest(dataset)["splits"]["train"]["samples"]
    assert n % G  # so the epoch boundary falls inside a batch
    order = sum(global_batches(dataset, 1, 2 * n // G + 1), [])
    first, second = order[:n], order[n : 2 * n]
    assert sorted(first) == sorted(second) == list(range(n))  # nothing dropped at the boundary
    assert first != second and first != sorted(first)


def test_order_is_independent_of_world_size(dataset):
    one = global_batches(dataset, 1, 40)  # crosses into the second epoch
    assert global_batches(dataset, 2, 40) == one
    assert global_batches(dataset, 3, 40) == one
    with pytest.raises(ValueError, match="multiple of world_size=4"):
        loader(dataset, world=4)


def test_seed_changes_order_and_same_seed_repeats(dataset):
    a = global_batches(dataset, 1, 10, seed=0)
    assert global_batches(dataset, 1, 10, seed=0) == a
    assert global_batches(dataset, 1, 10, seed=1) != a
    assert global_batches(dataset, 1, 10, shuffle_window=1) != a


def test_shuffle_keeps_reading_within_windows(dataset):
    src = loader(dataset).sources[0]
    plan = src.epoch_plan(0)
    first_window = set(np.concatenate([np.arange(src.counts[i]) + src.first_ids[i] for i in plan.windows[0]]))
    n = int(plan.starts[1])
    assert set(sum(global_batches(dataset, 1, n // G), [])) <= first_window


def test_val_order_is_fixed_and_tail_dropped(dataset):
    n = load_manifest(dataset)["splits"]["val"]["samples"]
    val = loader(dataset, "val", world=2, rank=0)
    passes = [ids_of(val) for _ in range(2)]
    assert passes[0] == passes[1] and len(passes[0]) == n // G == len(val)
    full = global_batches(dataset, 1, n // G, infinite=False, shuffle=False)
    assert sum(full, []) == list(range(n // G * G))  # manifest order; the last n % G dropped
    partial = iter(val)
    next(partial)
    assert ids_of(val)[0] == passes[0][0]  # a fresh iter() starts from the beginning again


def test_train_iter_continues_where_it_stopped(dataset):
    ld = loader(dataset)
    first = ids_of(take(iter(ld), 3))
    again = ids_of(take(iter(ld), 2))
    assert first + again == global_batches(dataset, 1, 5)


@pytest.mark.parametrize("before,after", [(2, 1), (2, 3), (1, 2), (3, 2)])
@pytest.mark.parametrize("stop", [7, 24, 31])  # mid-epoch, batch 24 spans the epoch boundary, 2nd epoch
def test_exact_resume_on_another_world_size(dataset, before, after, stop):
    reference = global_batches(dataset, 1, stop + 8)
    states = []
    for rank in range(before):
        ld = loader(dataset, rank=rank, world=before)
        take(iter(ld), stop)
        states.append(ld.state_dict())
    assert all(s == states[0] for s in states) and states[0]["consumed_samples"] == stop * G
    assert global_batches(dataset, after, 8, state=json.loads(json.dumps(states[0]))) == reference[stop:]


def test_state_counts_batches_handed_out_not_prefetched(dataset):
    ld = loader(dataset, prefetch=4)
    it = iter(ld)
    take(it, 3)
    assert ld.state_dict()["consumed_samples"] == 3 * G
    assert ids_of(take(it, 7)) == global_batches(dataset, 1, 10, prefetch=0)[3:]
    resumed = loader(dataset, prefetch=4)
    resumed.load_state_dict(ld.state_dict())
    assert ids_of(take(iter(resumed), 5)) == global_batches(dataset, 1, 15)[10:]


def test_prefetch_and_sync_loaders_agree(dataset):
    assert global_batches(dataset, 2, 30, prefetch=0) == global_batches(dataset, 2, 30, prefetch=3)


def batch_contents(path: Path, world: int, n: int, **kw) -> list[list[tuple]]:
    """(sample id, tokens) of n global batches from every rank's slices, as handed out."""
    per_rank = []
    for rank in range(world):
        batches = take(iter(loader(path, rank=rank, world=world, **kw)), n)
        per_rank.append([list(zip(b["sample_ids"].tolist(), b["tokens"].tolist())) for b in batches])
    return [sum((per_rank[r][k] for r in range(world)), []) for k in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_chunks_hand_out_the_batches_built_one_by_one(dataset, monkeypatch, world):
    """Batches cross from the prefetch thread in chunks built at once; they are exactly the
    batches built one at a time, on every world size, for train (across windows and epochs) and val."""
    chunked = batch_contents(dataset, world, 60)
    val_chunked = batch_contents(dataset, world, 2, split="val")
    monkeypatch.setattr(loader_module, "_CHUNK_BATCHES", 1)
    assert chunked == batch_contents(dataset, world, 60)
    assert val_chunked == batch_contents(dataset, world, 2, split="val")
    n = load_manifest(dataset)["splits"]["train"]["samples"]
    assert len({i for batch in chunked for i, _ in batch}) == n  # 60 batches cross an epoch: all seen


def test_a_bad_window_stops_the_batches_where_the_first_one_needs_it(dataset, tmp_path):
    """One source: the batches wholly before the window with a truncated shard are handed out (in
    one chunk), then the error, and the bad shard was read once."""
    copy, name = tmp_path / "ds", load_manifest(dataset)["splits"]["train"]["shards"][5]["path"]
    shutil.copytree(dataset, copy)
    (copy / name).write_bytes((copy / name).read_bytes()[:3000])
    ld = loader(copy, shuffle=False, prefetch=2)
    window = int(ld.sources[0].epoch_plan(0).starts[1])  # shard 5 is in window 1
    got = []
    with pytest.raises(DataError, match=f"shard .*{name}"):
        for batch in ld:
            got += batch["sample_ids"].tolist()
    assert got == list(range(window // G * G)) and ld.state_dict()["consumed_samples"] == len(got)
    assert ld.sources[0].shard_reads[str(name)] == 1


def test_a_chunk_stops_at_a_bad_shard_after_handing_out_the_batches_before_it(dataset, tmp_path):
    """Two sources, the first one's second window truncated: every batch before the first one that
    needs that window is handed out (they share a chunk with it), then the error names the shard."""
    other = tmp_path / "intact"
    shutil.copytree(dataset, other)
    copy, name = tmp_path / "ds", load_manifest(dataset)["splits"]["train"]["shards"][5]["path"]
    shutil.copytree(dataset, copy)
    (copy / name).write_bytes((copy / name).read_bytes()[:3000])
    window = int(loader(dataset, shuffle=False).sources[0].epoch_plan(0).starts[1])  # window 1's first sample

    def mixture(path: Path) -> ShardLoader:
        return ShardLoader([(path, 0.6), (other, 0.4)], "train", G, seed=0, shuffle=False, prefetch=2)

    def pairs(batch: dict) -> list[tuple]:
        return list(zip(batch["source"].tolist(), batch["sample_ids"].tolist()))

    reference = [pairs(b) for b in take(iter(mixture(dataset)), 30)]
    needs = next(k for k, batch in enumerate(reference) if any(s == 0 and i >= window for s, i in batch))
    got = []
    with pytest.raises(DataError, match=f"shard .*{name}"):
        for batch in mixture(copy):
            got.append(pairs(batch))
    assert 0 < needs < loader_module._CHUNK_BATCHES and got == reference[:needs]


def test_resume_skips_whole_windows_without_reading_them(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    ld = loader(copy)
    src = ld.sources[0]
    plan = src.epoch_plan(0)
    skipped = [src.shards[i]["path"] for i in plan.windows[0]]
    resume = -(-int(plan.starts[1]) // G)  # the first global batch wholly after the first window
    reference = global_batches(dataset, 1, resume + 4)
    for name in skipped:
        (copy / name).rename(copy / f"{name}.moved")  # reading one of them would fail
    ld.load_state_dict(at_position(ld.state_dict(), resume * G))
    assert ids_of(take(iter(ld), 4)) == reference[resume:]
    assert src.shard_reads and not set(src.shard_reads) & set(skipped)
    assert all(count == 1 for count in src.shard_reads.values())


def test_state_from_another_dataset_or_seed_is_refused(dataset, tmp_path):
    state = loader(dataset).state_dict()
    with pytest.raises(ValueError, match="seed=0 but this loader seed=5"):
        loader(dataset, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="different 'train' split"):
        loader(dataset).load_state_dict({**state, "dataset": "0" * 64})


def _copy_with_damaged_shard(dataset: Path, tmp_path: Path, keep_bytes: int) -> tuple[Path, str]:
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    name = load_manifest(copy)["splits"]["train"]["shards"][0]["path"]
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[:keep_bytes])
    return copy, name


@pytest.mark.parametrize("keep_bytes", [700, 1024 * 5, 100])  # mid-member, at a member boundary, mid-header
def test_truncated_shard_raises_data_error_naming_it(dataset, tmp_path, keep_bytes):
    copy, name = _copy_with_damaged_shard(dataset, tmp_path, keep_bytes)
    it = iter(loader(copy, shuffle=False, prefetch=2))  # errors cross the prefetch thread
    with pytest.raises(DataError, match=f"shard .*{name}"):
        take(it, 3)


def test_manifest_sample_count_mismatch(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    shard["samples"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DataError, match=f"{shard['path']}: holds {shard['samples'] - 1} samples but the manifest"
    ):
        take(iter(loader(copy, shuffle=False)), 3)


def test_verify_detects_changed_bytes(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    name = load_manifest(copy)["splits"]["train"]["shards"][0]["path"]
    data = bytearray((copy / name).read_bytes())
    data[512 + 3] ^= 1  # one token byte of the first sample; the tar stays well-formed
    (copy / name).write_bytes(bytes(data))
    take(iter(loader(copy, shuffle=False)), 3)  # without verify the change goes unnoticed
    with pytest.raises(DataError, match=f"{name}: sha256 differs"):
        take(iter(loader(copy, shuffle=False, verify=True)), 3)


def test_pipe_urls_in_manifest(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        shard["path"] = f"pipe:cat {copy / shard['path']}"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert global_batches(copy, 1, 30, verify=True) == global_batches(dataset, 1, 30)


def test_load_manifest_errors(tmp_path):
    with pytest.raises(DataError, match=r"manifest.json: not found.*prepare"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json: not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "trainer.tokens", "version": 99}')
    with pytest.raises(DataError, match="format version 99"):
        load_manifest(tmp_path)


def test_process_exits_cleanly_with_a_live_prefetch_thread(dataset):
    code = (
        "import sys; from trainer.data.loader import ShardLoader\n"
        f"it = iter(ShardLoader({str(dataset)!r}, 'train', 6, prefetch=2))\n"
        "[next(it) for _ in range(3)]\n"
        "sys.exit(3)\n"
    )
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 3, proc.stderr  # not 134: no abort from a thread left inside torch


def test_state_saved_before_mixing_existed_still_resumes(dataset):
    """Checkpoints from before per-source states: one source, no "sources" list."""
    ld = loader(dataset)
    old = {
        k: v
        for k, v in at_position(ld.state_dict(), 7 * G).items()
        if k not in ("sources", "skipped_samples")
    }
    old["epoch"] = 0
    ld.load_state_dict(old)
    assert ids_of(take(iter(ld), 3)) == global_batches(dataset, 1, 10)[7:]
    assert ld.state_dict()["sources"][0]["consumed_samples"] == 10 * G
