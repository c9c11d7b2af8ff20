"""Weighted mixing of several prepared datasets: ratios, world-size independence, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.data import DataError
from trainer.data.loader import ShardLoader
from trainer.data.mixture import Mixture
from trainer.data.prepare import prepare_dataset

SEQ = 8
G = 6  # divisible by world sizes 1, 2 and 3
WEIGHTS = [0.5, 0.3, 0.2]


def _prepare(root: Path, name: str, n_docs: int, **kw) -> Path:
    docs = [f"{name} document {i}: " + "xyzuvw"[i % 6] * (3 + i % 11) for i in range(n_docs)]
    (root / f"{name}.txt").write_text("\n\n".join(docs))
    prepare_dataset([root / f"{name}.txt"], root / name, seq_len=kw.pop("seq_len", SEQ), shard_max_samples=9,
                    val_fraction=0.2, **kw)  # fmt: skip
    return root / name


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    """Three byte-level datasets of very different sizes (the small one repeats most often)."""
    root = tmp_path_factory.mktemp("mix")
    return [_prepare(root, "big", 60), _prepare(root, "small", 12), _prepare(root, "mid", 30)]


def mixed(sources: list[Path], rank: int = 0, world: int = 1, weights=WEIGHTS, **kw) -> ShardLoader:
    kw = {"seed": 0, "shuffle_window": 2, "infinite": kw.get("split", "train") == "train", **kw}
    split = kw.pop("split", "train")
    return ShardLoader(list(zip(sources, weights)), split, G, rank, world, **kw)


def global_batches(sources, world: int, n: int, state: dict | None = None, **kw) -> list[list[tuple]]:
    """(source, sample id) of n global batches, assembled from every rank's slice in rank order."""
    per_rank = []
    for rank in range(world):
        ld = mixed(sources, rank, world, **kw)
        if state is not None:
            ld.load_state_dict(state)
        it = iter(ld)
        batches = [next(it) for _ in range(n)]
        per_rank.append([list(zip(b["source"].tolist(), b["sample_ids"].tolist())) for b in batches])
    return [sum((per_rank[r][k] for r in range(world)), []) for k in range(n)]


def test_schedule_tracks_the_weights_within_one_sample():
    for weights in ([0.7, 0.3], [5, 3, 2], [0.5, 0.3, 0.15, 0.05], [1e-3, 1.0], [1 / 3] * 3):
        mix = Mixture(weights)
        picks = mix.picks([0] * len(weights), 20_000)
        counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[picks], axis=0)  # [t, sources]
        target = np.arange(1, len(picks) + 1)[:, None] * np.array(mix.fractions)
        assert np.abs(counts - target).max() < 1.0, weights  # every prefix, every source


def test_schedule_continues_from_counts_alone():
    mix = Mixture([0.5, 0.3, 0.2])
    whole = mix.picks([0, 0, 0], 1000)
    for cut in (1, 7, 500):
        counts = np.bincount(whole[:cut], minlength=3)
        assert np.array_equal(mix.picks(counts, 1000 - cut), whole[cut:])
    with pytest.raises(ValueError, match="positive"):
        Mixture([0.5, 0.0])


def test_realised_mixture_over_a_long_run_matches_the_weights(sources):
    """2000 global batches (12,000 samples): every source passes many epochs; within 1% of weights."""
    ld = mixed(sources)
    it = iter(ld)
    seen = np.concatenate([next(it)["source"].numpy() for _ in range(2000)])
    share = np.bincount(seen, minlength=3) / len(seen)
    assert np.abs(share - WEIGHTS).max() < 0.01, share
    state = ld.state_dict()
    assert [s["consumed_samples"] for s in state["sources"]] == np.bincount(seen, minlength=3).tolist()
    assert state["sources"][1]["epoch"] > state["sources"][0]["epoch"] > 1  # the small source repeats most
    stats = ld.stats()
    assert [stats[f"data_mix_{i}"] for i in range(3)] == pytest.approx(WEIGHTS, abs=0.001)


def test_every_global_batch_has_the_mixture_composition(sources):
    for batch in global_batches(sources, 1, 50):
        counts = np.bincount([s for s, _ in batch], minlength=3)
        assert (np.abs(counts - np.array(WEIGHTS) * G) < 2).all(), counts


def test_samples_are_the_sources_own_samples_in_their_own_order(sources):
    """Source i's samples, in order of appearance, are exactly that dataset loaded alone."""
    order = sum(global_batches(sources, 1, 200), [])
    offsets = np.cumsum([0] + [ShardLoader(p, "train", G).num_samples for p in sources[:-1]])
    for i, path in enumerate(sources):
        ids = [sid - offsets[i] for s, sid in order if s == i]
        alone = ShardLoader(path, "train", 1, seed=0, shuffle_window=2, prefetch=0)
        it = iter(alone)
        assert ids == [int(next(it)["sample_ids"][0]) for _ in range(len(ids))]


def test_mixture_is_independent_of_world_size(sources):
    one = global_batches(sources, 1, 60)
    assert global_batches(sources, 2, 60) == one
    assert global_batches(sources, 3, 60) == one


@pytest.mark.parametrize("before,after", [(2, 1), (2, 3), (3, 2)])
def test_exact_resume_of_a_mixture_on_another_world_size(sources, before, after):
    stop = 37  # past several epochs of the small source
    reference = global_batches(sources, 1, stop + 10)
    states = []
    for rank in range(before):
        ld = mixed(sources, rank, before)
        it = iter(ld)
        for _ in range(stop):
            next(it)
        states.append(ld.state_dict())
    assert all(s == states[0] for s in states) and states[0]["consumed_samples"] == stop * G
    state = json.loads(json.dumps(states[0]))  # as it travels through a checkpoint
    assert global_batches(sources, after, 10, state=state) == reference[stop:]


def test_resume_refuses_other_weights_or_sources(sources):
    ld = mixed(sources)
    next(iter(ld))
    state = ld.state_dict()
    with pytest.raises(ValueError, match="weight 0.3 for source 1.*exact resume needs the same weights"):
        mixed(sources, weights=[0.5, 0.4, 0.1]).load_state_dict(state)
    with pytest.raises(DataError, match="mixes 3 sources, this loader 2"):
        mixed(sources[:2], weights=[0.5, 0.5]).load_state_dict(state)
    swapped = [sources[0], sources[2], sources[1]]
    with pytest.raises(DataError, match=r"different 'train' split than .*mid \(source 1\)"):
        mixed(swapped).load_state_dict(state)


def test_val_mixes_every_sources_val_split_the_same_way_each_time(sources):
    val = mixed(sources, split="val")
    passes = [[b["sample_ids"].tolist() for b in val] for _ in range(2)]
    sizes = [ShardLoader(p, "val", G, infinite=False).num_samples for p in sources]
    assert passes[0] == passes[1] and len(passes[0]) == len(val) == sum(sizes) // G
    seen = np.bincount([s for b in mixed(sources, split="val") for s in b["source"].tolist()], minlength=3)
    assert (np.abs(seen - np.array(WEIGHTS) * len(val) * G) < 1).all()  # the mixture, a fixed sample


def test_sources_must_share_tokenizer_and_seq_len(sources, tmp_path):
    other_seq = _prepare(tmp_path, "longer", 20, seq_len=12)
    with pytest.raises(
        DataError, match=r"longer/manifest.json: seq_len=12 but .*big/manifest.json has seq_len=8"
    ):
        mixed([sources[0], other_seq], weights=[1, 1])
    other_tok = _prepare(tmp_path, "chars", 20, tokenizer="char")
    with pytest.raises(
        DataError, match=r"chars/manifest.json: its tokenizer differs .*tokenizer=.*big/tokenizer"
    ):
        mixed([sources[0], other_tok], weights=[1, 1])
    # The advice works: the same tokenizer directory gives the same tokenizer identity.
    same_tok = _prepare(tmp_path, "same", 20, tokenizer=str(sources[0] / "tokenizer"))
    assert len(mixed([sources[0], same_tok], weights=[1, 1]).sources) == 2
