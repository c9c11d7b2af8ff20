"""Exact, elastic data resume through the trainer: the global sample ids trained on, step by step.

A 2-rank run records the sample ids of every batch each rank trains on (``data.record_ids``) and
saves a checkpoint halfway. Resuming that checkpoint on 1 and on 3 ranks must train on exactly the
global batches the uninterrupted run trained on after it: none repeated, none skipped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import assert_ok, read_metrics, torchrun
from trainer.data.loader import ShardLoader, load_manifest
from trainer.data.prepare import prepare_dataset

pytestmark = pytest.mark.distributed

STEPS, HALF = 12, 6
# Global batch 6 divides over 1, 2 and 3 ranks (micro batch 1); seq 16 keeps the nano model's steps short.
BASE = ["debug=fast", f"max_steps={STEPS}", "log_every=1", "eval_every=0", "global_batch_size=6",
        "micro_batch_size=1", f"checkpoint.every_steps={HALF}", "checkpoint.keep_last=5", "engine=zero0",
        "model.max_seq_len=16", "data.record_ids=true"]  # fmt: skip


def _prepare(root: Path, name: str, n_docs: int, **kw) -> Path:
    docs = [f"{name} {i}: the quick brown fox jumps over the lazy dog " * (1 + i % 3) for i in range(n_docs)]
    (root / f"{name}.txt").write_text("\n\n".join(docs))
    prepare_dataset([root / f"{name}.txt"], root / name, seq_len=16, shard_max_samples=10, **kw)
    return root / name


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, list[str]]:
    """Data overrides per case: one dataset smaller than the run (it crosses an epoch); and a 2:1 mixture
    whose second source lost a shard, streamed with on_corrupt=skip."""
    root = tmp_path_factory.mktemp("data")
    single = _prepare(root, "single", 6)
    assert load_manifest(single)["splits"]["train"]["samples"] < STEPS * 6
    web, code = _prepare(root, "web", 30), _prepare(root, "code", 20, tokenizer=str(single / "tokenizer"))
    first = ShardLoader(code, "train", 6, seed=0, shuffle_window=8).sources[0].epoch_plan(0).windows[0][0]
    (code / load_manifest(code)["splits"]["train"]["shards"][first]["path"]).unlink()  # met early on
    mixture = f"data.sources=[{{path: {web}, weight: 2}}, {{path: {code}, weight: 1}}]"
    return {
        "single": ["data=prepared", f"data.path={single}"],
        "mixture-skip": ["data=mixture", mixture, "data.on_corrupt=skip"],
    }


def global_batches(run_dir: Path, world: int) -> list[list[int]]:
    """Each step's global batch: the ranks' recorded slices, concatenated in rank order."""
    ranks = []
    for r in range(world):
        lines = (run_dir / "sample_ids" / f"rank{r}.jsonl").read_text().splitlines()
        ranks.append([json.loads(line) for line in lines])
    assert len({len(r) for r in ranks}) == 1, "every rank trains on the same number of batches"
    for step in zip(*ranks):  # the ranks agree on the position after each batch
        assert len({line["consumed_samples"] for line in step}) == 1
    return [sum((line["sample_ids"] for line in step), []) for step in zip(*ranks)]


@pytest.mark.parametrize("case", ["single", "mixture-skip"])
def test_resume_on_another_world_size_continues_the_exact_sample_sequence(tmp_path, cli_env, datasets, case):
    data = datasets[case]
    assert_ok(torchrun(2, ["-m", "trainer.train", *BASE, *data, "run_dir=ref"], tmp_path, cli_env))
    reference = global_batches(tmp_path / "ref", 2)
    assert len(reference) == STEPS and all(len(b) == 6 for b in reference)
    checkpoint = tmp_path / "ref" / "checkpoints" / f"step-{HALF}"
    assert checkpoint.is_dir()
    if case == "single":
        seen = sum(reference, [])
        assert len(set(seen)) < len(seen), "the run should cross an epoch boundary"
    else:
        last = read_metrics(tmp_path / "ref")[-1]
        assert last["data_skipped"] > 0 and last["data_mix_0"] == pytest.approx(2 / 3, abs=0.05)

    for world in (1, 3):
        run_dir = tmp_path / f"resumed{world}"
        args = [
            "-m",
            "trainer.train",
            *BASE,
            *data,
            f"checkpoint.resume={checkpoint}",
            f"run_dir={run_dir.name}",
        ]
        assert_ok(torchrun(world, args, tmp_path, cli_env))
        assert [e["step"] for e in read_metrics(run_dir)] == list(range(HALF + 1, STEPS + 1))
        resumed = global_batches(run_dir, world)
        assert reference[:HALF] + resumed == reference, f"{case}: resumed on {world} ranks"
        shutil.rmtree(run_dir / "checkpoints")  # keep the tmp dir small
