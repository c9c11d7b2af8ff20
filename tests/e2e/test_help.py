"""Every entry point's ``--help`` shows what a user of it needs (its usage, our config groups, the
keys users change most, an example), not Hydra's generic text; for Hydra ones the keys show the
composed values, so a key renamed in the schema without its help fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import assert_ok, run_module

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# entry point -> what its help must show
EXPECTED = {
    "trainer.train": ["python -m trainer.train [group=option ...]", "max_steps=200", "global_batch_size=16",
                      "optim.lr=0.003", "engine.zero_stage=1", "checkpoint.resume=auto", "gc_every=50",
                      "torchrun --nproc_per_node 2 -m trainer.train", "-m name=lr-sweep"],
    "trainer.prepare": ["'inputs=[...]' out_dir=DIR", "tokenizer=byte", "seq_len=128", "vocab_size=8192"],
    "trainer.eval": ["checkpoint=PATH", "split=val", "batches=0",
                     "torchrun --nproc-per-node 2 -m trainer.eval"],
    "trainer.generate": ["checkpoint=PATH prompt=", "max_new_tokens=128", "temperature=0.8", "top_p=1.0"],
    "trainer.export": ["<checkpoint> <out_dir>", "model.safetensors", "--dtype", "from_pretrained"],
    "trainer.report": ["python -m trainer.report runs/sweeps/lr-sweep", "loss.png", "--out"],
    "trainer.sweep": ["runs/sweeps/<name>", "summary.csv", "exit.json", "--csv"],
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_help_shows_our_usage_and_keys(module, tmp_path, cli_env):
    proc = run_module(module, ["--help"], tmp_path, cli_env, timeout=120)
    assert_ok(proc)
    text = proc.stdout
    missing = [s for s in EXPECTED[module] if s not in text]
    assert not missing, f"{module} --help lacks {missing}:\n{text}"
    assert "powered by Hydra" not in text and "foo.bar=value" not in text


def test_train_help_lists_every_option_of_every_training_group(tmp_path, cli_env):
    proc = run_module("trainer.train", ["--help", "model=nano"], tmp_path, cli_env, timeout=120)
    assert_ok(proc)
    groups = [p for p in CONFIGS.iterdir() if p.is_dir() and p.name not in ("hydra", "inference", "local")]
    for group in groups:
        options = ", ".join(sorted(f.stem for f in group.glob("*.yaml")))
        assert f"{group.name}: {options}" in proc.stdout, proc.stdout
    assert "model.act_ckpt=none" in proc.stdout and "max_steps=200" in proc.stdout  # composed values
