"""Every config group option composes into the typed schema; bad values fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from trainer.config import ConfigError, TrainConfig, register_configs
from trainer.train import absolute_data_paths, config_dir, to_typed

CONFIGS = Path(config_dir())


@pytest.fixture(scope="module")
def composer():
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield lambda *overrides: compose(config_name="train", overrides=list(overrides))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_default_config_is_valid(composer):
    cfg = to_typed(composer())
    assert isinstance(cfg, TrainConfig)
    assert cfg.run_dir == "runs/default"
    assert cfg.data.seq_len == cfg.model.max_seq_len
    assert cfg.data.builtin


@pytest.mark.parametrize(
    "group", ["model", "data", "optim", "engine", "logger", "checkpoint", "experiment", "debug"]
)
def test_every_option_of_every_group_composes(composer, group):
    options = _options(group)
    assert options, f"configs/{group} has no options"
    for option in options:
        overrides = [f"{group}={option}", "data.path=/tmp/x"]
        typed = to_typed(composer(*overrides))
        assert isinstance(typed, TrainConfig), option


def test_unknown_key_is_rejected_naming_it(composer):
    with pytest.raises(ConfigCompositionException, match="optim.lrr"):
        composer("optim.lrr=0.1")


def test_missing_group_option_is_rejected(composer):
    with pytest.raises(Exception, match="model/huge"):
        composer("model=huge")


def test_wrong_type_is_rejected(composer):
    with pytest.raises((ConfigCompositionException, ValidationError), match="lr"):
        to_typed(composer("optim.lr=fast"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.n_head=3", "model.n_head"),
        ("model.n_kv_head=3", "model.n_kv_head"),
        ("engine.zero_stage=4", "engine.zero_stage"),
        ("engine.precision=fp8", "engine.precision"),
        ("engine.offload_params=true", "engine.offload_params"),
        ("model.pos_emb=alibi", "model.pos_emb"),
        ("model.act_ckpt=some", "model.act_ckpt"),
        ("data.seq_len=4096", "data.seq_len"),
        ("micro_batch_size=5", "global_batch_size"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("max_steps=0", "max_steps"),
        ("model.init_std=-0.02", "model.init_std"),  # else a traceback from the model's init
        ("model.norm_eps=-1", "model.norm_eps"),  # else NaN at step 1, blamed on optim.lr
        ("model.rope_theta=0", "model.rope_theta"),
        ("engine.loss_scale=-1", "engine.loss_scale"),  # else DeepSpeed's error names fp16.loss_scale
    ],
)
def test_impossible_values_name_the_key(composer, override, key):
    with pytest.raises(ConfigError) as err:
        to_typed(composer(override))
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_world_size_must_fit_the_batch(composer, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"global_batch_size=16 .* world size 3"):
        to_typed(composer())
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = to_typed(composer("micro_batch_size=4"))
    assert cfg.grad_accum_steps(2) == 2
    with pytest.raises(ConfigError, match=r"micro_batch_size=16 x world size 2"):  # explicit: checked
        to_typed(composer("micro_batch_size=16"))


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_the_default_micro_batch_follows_the_world_size(composer, monkeypatch, world):
    """micro_batch_size=auto (the default): the whole per-rank share of the global batch, so that
    changing the number of processes alone never breaks the batch arithmetic."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = to_typed(composer())
    assert cfg.micro_batch_size == "auto"
    assert cfg.micro_batch(world) == 16 // world and cfg.grad_accum_steps(world) == 1
    big = to_typed(composer("global_batch_size=48"))
    assert big.micro_batch(world) * big.grad_accum_steps(world) * world == 48


@pytest.mark.parametrize("value", ["big", "0", "-2", "2.5", "true"])
def test_a_micro_batch_that_is_neither_auto_nor_a_positive_whole_number_is_refused(composer, value):
    with pytest.raises(ConfigError, match=f"(?i)^micro_batch_size={value}.* auto"):
        to_typed(composer(f"micro_batch_size={value}"))


def test_max_tokens_ends_the_run_early(composer):
    cfg = to_typed(composer("max_steps=1000", "max_tokens=100000"))
    per_step = cfg.global_batch_size * cfg.data.seq_len
    assert cfg.total_steps() == -(-100000 // per_step)
    assert to_typed(composer("max_steps=3", "max_tokens=100000000")).total_steps() == 3


def test_data_paths_are_made_absolute_for_the_runs_config(composer, tmp_path, monkeypatch):
    """config.yaml is how eval, generate and export find the tokenizer, from any directory."""
    monkeypatch.chdir(tmp_path)
    cfg = composer("data=prepared", "data.path=data/web")
    absolute_data_paths(cfg)
    assert cfg.data.path == str(tmp_path / "data" / "web")
    cfg = composer("data=mixture", "data.sources=[{path: a, weight: 1}, {path: /abs/b, weight: 2}]")
    absolute_data_paths(cfg)
    assert [s.path for s in cfg.data.sources] == [str(tmp_path / "a"), "/abs/b"]


def test_eval_takes_an_auto_micro_batch_of_the_run_as_the_per_rank_share():
    from trainer.config import EvalConfig
    from trainer.eval import batch_sizes

    run = {"global_batch_size": 16, "micro_batch_size": "auto"}
    assert batch_sizes(EvalConfig(checkpoint="runs/x"), run, 2) == (16, 8)
    assert batch_sizes(EvalConfig(checkpoint="runs/x"), run | {"micro_batch_size": 4}, 2) == (16, 4)
    assert batch_sizes(EvalConfig(checkpoint="runs/x", micro_batch_size=2), run, 1) == (16, 2)
