"""Build the train and validation loaders from the data section of the config."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from trainer.config import ConfigError, DataConfig
from trainer.data import DataError
from trainer.data.loader import ShardLoader, load_manifest
from trainer.data.prepare import MANIFEST, TOKENIZER_DIR, prepare_builtin
from trainer.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("trainer")


class RecordingLoader:
    """A train loader that appends every batch it hands out to ``path`` as one JSON line:
    ``{"consumed_samples": <position after it>, "sample_ids": [...], "source": [...]}``.

    For tests and audits of the exact data order (``data.record_ids=true``); otherwise it is the
    loader it wraps.
    """

    def __init__(self, loader: ShardLoader, path: Path):
        self.loader, self.path = loader, path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            line = {
                "consumed_samples": self.loader.state_dict()["consumed_samples"],
                "sample_ids": batch["sample_ids"].tolist(),
                "source": batch["source"].tolist(),
            }
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def stats(self) -> dict[str, float]:
        return self.loader.stats()


@dataclass
class Data:
    train: ShardLoader | RecordingLoader
    val: ShardLoader
    vocab_size: int
    tokenizer: Tokenizer | None  # the dataset's, saved beside its shards (None: missing there)
    tokenizer_source: str = ""  # the manifest whose tokenizer sets vocab_size (for error messages)


def _check_seq_len(cfg: DataConfig) -> None:
    for i, (path, _) in enumerate(cfg.weighted_paths()):
        prepared = load_manifest(path)["seq_len"]
        if prepared != cfg.seq_len:
            which = f"data.sources[{i}] " if cfg.sources else ""
            raise ConfigError(
                f"data.seq_len={cfg.seq_len} but {which}{Path(path) / MANIFEST} was prepared with seq_len="
                f"{prepared}: set data.seq_len={prepared} (model.max_seq_len >= {prepared}) or prepare "
                f"the data again with seq_len={cfg.seq_len}"
            )


def build_data(
    cfg: DataConfig,
    global_batch_size: int,
    rank: int,
    world_size: int,
    local_rank: int,
    barrier: Callable[[], None],
    record_dir: Path | None = None,
) -> Data:
    """Open the dataset(s) (preparing the built-in corpus first if asked) and the two loaders.

    ``record_dir``: each rank appends the sample ids of its train batches to ``record_dir/rank<r>.jsonl``.
    """
    if cfg.builtin:
        assert cfg.path is not None  # DataConfig refuses builtin with sources
        if local_rank == 0:  # one writer per node; idempotent, and locked against other nodes
            prepare_builtin(Path(cfg.path), seq_len=cfg.seq_len)
        barrier()
    _check_seq_len(cfg)
    sources = cfg.weighted_paths()
    dataset = sources[0][0] if len(sources) == 1 else sources

    def loader(split: str, infinite: bool) -> ShardLoader:
        return ShardLoader(
            dataset,
            split,
            global_batch_size,
            rank,
            world_size,
            seed=cfg.seed,
            shuffle_window=cfg.shuffle_window,
            infinite=infinite,
            verify=cfg.verify_shards,
            on_corrupt=cfg.on_corrupt,
        )

    train = loader("train", True)
    first = train.sources[0]  # every source has the same tokenizer (the loader checks)
    recorded = RecordingLoader(train, record_dir / f"rank{rank}.jsonl") if record_dir is not None else None
    return Data(
        recorded or train,
        loader("val", False),
        first.manifest["tokenizer"]["vocab_size"],
        _dataset_tokenizer(first.dir),
        str(first.dir / MANIFEST),
    )


def _dataset_tokenizer(dataset_dir: Path) -> Tokenizer | None:
    """For validation's bits per byte only: training reads token ids, so it goes on without it."""
    try:
        return load_tokenizer(dataset_dir / TOKENIZER_DIR)
    except DataError as e:
        log.warning("%s; validation reports no bits per byte", e)
        return None
