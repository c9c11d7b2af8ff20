"""Entry point: ``python -m trainer.prepare inputs=[...] out_dir=...`` (or ``trainer-prepare``).

Compose ``configs/prepare.yaml``, validate it into a ``PrepareConfig``, then tokenize the inputs
into webdataset shards with ``trainer.data.prepare.prepare_dataset``, showing a progress bar.
Bad input ends with one line ``error: ...`` naming the file (and line) or key, and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.cli import one_line_errors
from trainer.config import PrepareConfig, register_configs
from trainer.train import config_dir


def to_typed(cfg: DictConfig) -> PrepareConfig:
    """DictConfig -> PrepareConfig; every check in ``__post_init__`` runs here."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # drop Hydra's own node
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrepareConfig), cfg))
    assert isinstance(typed, PrepareConfig)
    return typed


class ProgressBars:
    """tqdm bars fed by prepare_dataset's progress callback: one per stage, in input bytes read."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.total, self.enabled = total_bytes, enabled
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, counts: dict[str, int]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage not in self.bars:
            for bar in self.bars.values():
                bar.close()
            desc = {"tokenizer": "train tokenizer", "shards": "tokenize+write"}.get(stage, stage)
            self.bars[stage] = tqdm(
                total=self.total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr
            )
        bar = self.bars[stage]
        bar.update(counts["bytes_read"] - bar.n)
        if stage == "shards":
            docs, tokens, samples = counts["documents"], counts["tokens"], counts["samples"]
            bar.set_postfix_str(f"{docs:,} docs, {tokens:,} tokens, {samples:,} samples", refresh=False)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run prepare_dataset for ``cfg`` with a progress bar; returns the manifest."""
    from trainer.data.prepare import prepare_dataset
    from trainer.data.readers import expand_inputs

    files = expand_inputs(cfg.inputs)  # fails early, before a bar appears, on a missing input
    bars = ProgressBars(sum(f.stat().st_size for f in files), cfg.progress)
    try:
        return prepare_dataset(
            files,
            Path(cfg.out_dir),
            seq_len=cfg.seq_len,
            tokenizer=cfg.tokenizer,
            val_fraction=cfg.val_fraction,
            shard_max_samples=cfg.shard_max_samples,
            shard_max_bytes=int(cfg.shard_max_mb * (1 << 20)),
            text_field=cfg.text_field,
            vocab_size=cfg.vocab_size,
            seed=cfg.seed,
            num_workers=cfg.workers(),
            progress=bars,
        )
    finally:
        bars.close()


def summary(cfg: PrepareConfig, m: dict[str, Any]) -> str:
    train, val, tok = m["splits"]["train"], m["splits"]["val"], m["tokenizer"]
    return (
        f"wrote {cfg.out_dir}: {train['samples']:,} train samples in {len(train['shards'])} shards, "
        f"{val['samples']:,} val samples in {len(val['shards'])}; {m['stats']['documents']:,} documents, "
        f"{m['stats']['tokens']:,} tokens; {tok['kind']} tokenizer, vocab {tok['vocab_size']:,}, "
        f"seq_len {m['seq_len']}\n"
        f"train on it: python -m trainer.train data=prepared data.path={cfg.out_dir} "
        f"model.max_seq_len={m['seq_len']}"
    )


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="prepare")
def _hydra_main(cfg: DictConfig) -> None:

    with one_line_errors():
        typed = to_typed(cfg)
        print(summary(typed, prepare(typed)))


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
