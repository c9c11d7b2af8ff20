"""Build the train and validation loaders from the data section of the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from trainer.config import ConfigError, DataConfig
from trainer.data.loader import ShardLoader, load_manifest
from trainer.data.prepare import prepare_builtin


@dataclass
class Data:
    train: ShardLoader
    val: ShardLoader
    vocab_size: int


def build_data(
    cfg: DataConfig,
    global_batch_size: int,
    rank: int,
    world_size: int,
    local_rank: int,
    barrier: Callable[[], None],
) -> Data:
    """Open the dataset (preparing the built-in corpus first if asked) and its two loaders."""
    path = Path(cfg.path)
    if cfg.builtin:
        if local_rank == 0:  # one writer per node; idempotent, and locked against other nodes
            prepare_builtin(path, seq_len=cfg.seq_len)
        barrier()
    manifest = load_manifest(path)
    if manifest["seq_len"] != cfg.seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.seq_len} but {path}/manifest.json was prepared with seq_len="
            f"{manifest['seq_len']}: set data.seq_len={manifest['seq_len']} or prepare the data again"
        )

    def loader(split: str, infinite: bool) -> ShardLoader:
        return ShardLoader(
            path,
            split,
            global_batch_size,
            rank,
            world_size,
            seed=cfg.seed,
            shuffle_window=cfg.shuffle_window,
            infinite=infinite,
            verify=cfg.verify_shards,
        )

    return Data(loader("train", True), loader("val", False), manifest["tokenizer"]["vocab_size"])
