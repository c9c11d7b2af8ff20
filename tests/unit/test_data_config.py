"""The data and prepare config keys, and build_data's checks against the prepared datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from trainer.config import ConfigError, DataConfig, PrepareConfig, SourceConfig, register_configs
from trainer.data import DataError
from trainer.data.build import RecordingLoader, build_data
from trainer.data.prepare import prepare_dataset
from trainer.prepare import to_typed as to_prepare_config
from trainer.train import config_dir, to_typed

SEQ = 8


@pytest.fixture(scope="module")
def compose_cfg():
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield lambda name, *overrides: compose(config_name=name, overrides=list(overrides))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cfg")
    (root / "a.txt").write_text("\n\n".join(f"document {i} " + "ab" * (i % 9) for i in range(60)))
    out = {}
    for name, kw in {"a": {}, "b": {}, "seq16": {"seq_len": 16}, "char": {"tokenizer": "char"}}.items():
        out[name] = root / name
        prepare_dataset([root / "a.txt"], out[name], **{"seq_len": SEQ, "val_fraction": 0.2, **kw})
    return out


def test_mixture_composes_from_the_command_line(compose_cfg):
    cfg = to_typed(
        compose_cfg("train", "data=mixture", "data.sources=[{path: /d/a, weight: 0.7}, {path: /d/b}]")
    )
    assert cfg.data.path is None and cfg.data.sources == [
        SourceConfig("/d/a", 0.7),
        SourceConfig("/d/b", 1.0),
    ]
    assert cfg.data.weighted_paths() == [("/d/a", 0.7), ("/d/b", 1.0)]
    assert to_typed(compose_cfg("train")).data.weighted_paths()[0][1] == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.sources=[{path: /d/a}]"], "data.sources and data.path=.* are both set: use data=mixture"),
        (["data=mixture"], "data.path is not set"),
        (["data=prepared"], "data.path is not set"),
        (["data=mixture", "data.sources=[{path: /d/a, weight: 0}]"], r"data.sources\[0\].weight=0.0 must be"),
        (["data=mixture", "data.sources=[{path: /d/a}]", "data.builtin=true"], "data.builtin=true"),
        (["data.on_corrupt=ignore"], "data.on_corrupt='ignore' is not one of error, skip"),
    ],
)
def test_bad_data_keys_name_the_key(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_typed(compose_cfg("train", *overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["out_dir=x"], "inputs is empty"),
        (["inputs=[a.txt]"], "out_dir is not set"),
        (["inputs=[a.txt]", "out_dir=x", "val_fraction=0.9"], r"val_fraction=0.9 must be in \(0, 0.5\]"),
        (
            ["inputs=[a.txt]", "out_dir=x", "tokenizer=bpe", "vocab_size=200"],
            "vocab_size=200 leaves no merges",
        ),
        (["inputs=[a.txt]", "out_dir=x", "seq_len=0"], "seq_len=0 must be > 0"),
    ],
)
def test_bad_prepare_keys_name_the_key(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_prepare_config(compose_cfg("prepare", *overrides))


def test_prepare_config_defaults(compose_cfg):
    cfg = to_prepare_config(compose_cfg("prepare", "inputs=[corpus/*.txt,b.jsonl]", "out_dir=data/x"))
    assert isinstance(cfg, PrepareConfig) and cfg.inputs == ["corpus/*.txt", "b.jsonl"]
    assert cfg.tokenizer == "byte" and cfg.workers() >= 1 and cfg.seq_len == 128


def build(cfg: DataConfig, rank: int = 0, world: int = 1, record_dir: Path | None = None):
    return build_data(cfg, 6, rank, world, 0, lambda: None, record_dir)


def test_seq_len_mismatch_names_the_key_and_the_file(datasets):
    with pytest.raises(
        ConfigError, match=rf"data.seq_len=8 but {datasets['seq16']}/manifest.json .*seq_len=16"
    ):
        build(DataConfig(path=str(datasets["seq16"]), seq_len=SEQ))
    sources = [SourceConfig(str(datasets["a"])), SourceConfig(str(datasets["seq16"]))]
    with pytest.raises(ConfigError, match=r"data.seq_len=8 but data.sources\[1\] .*seq16/manifest.json"):
        build(DataConfig(path=None, sources=sources, seq_len=SEQ))


def test_sources_with_another_tokenizer_name_both_files(datasets):
    sources = [SourceConfig(str(datasets["a"])), SourceConfig(str(datasets["char"]))]
    with pytest.raises(DataError, match=r"char/manifest.json: its tokenizer differs .*a/manifest.json"):
        build(DataConfig(path=None, sources=sources, seq_len=SEQ))


def test_mixture_build_and_record_ids(datasets, tmp_path):
    sources = [SourceConfig(str(datasets["a"]), 3.0), SourceConfig(str(datasets["b"]), 1.0)]
    cfg = DataConfig(path=None, sources=sources, seq_len=SEQ, on_corrupt="skip", record_ids=True)
    data = build(cfg, rank=1, world=2, record_dir=tmp_path / "ids")
    assert data.vocab_size == 257 and data.tokenizer_source.endswith("a/manifest.json")
    assert data.tokenizer.vocab_size == 257  # the dataset's own, for validation's bits per byte
    assert isinstance(data.train, RecordingLoader) and len(data.train.loader.sources) == 2
    it = iter(data.train)
    batches = [next(it) for _ in range(4)]
    lines = [json.loads(x) for x in (tmp_path / "ids" / "rank1.jsonl").read_text().splitlines()]
    assert [x["sample_ids"] for x in lines] == [b["sample_ids"].tolist() for b in batches]
    assert [x["consumed_samples"] for x in lines] == [6, 12, 18, 24]
    assert data.train.stats()["data_skipped"] == 0 and data.train.stats()["data_mix_0"] == 0.75
    assert set(torch.cat([b["source"] for b in data.val]).tolist()) == {0, 1}


def test_vocab_smaller_than_the_tokenizer_names_the_key(datasets):
    from trainer.config import ModelConfig
    from trainer.loop import resolve_vocab

    data = build(DataConfig(path=str(datasets["a"]), seq_len=SEQ))
    assert resolve_vocab(ModelConfig(), data.vocab_size).vocab_size == 257
    with pytest.raises(ConfigError, match="model.vocab_size=100 is smaller than the tokenizer's 257 ids"):
        resolve_vocab(ModelConfig(vocab_size=100), data.vocab_size)


def test_a_dataset_without_its_tokenizer_still_trains_without_bits_per_byte(datasets, tmp_path, caplog):
    import shutil

    copy = tmp_path / "notok"
    shutil.copytree(datasets["a"], copy)
    shutil.rmtree(copy / "tokenizer")
    data = build(DataConfig(path=str(copy), seq_len=SEQ), rank=0, world=1)
    assert data.tokenizer is None and data.vocab_size == 257  # the manifest still says
    assert "validation reports no bits per byte" in caplog.text
    assert next(iter(data.train))["tokens"].shape == (6, SEQ + 1)  # global batch 6 on one rank
