"""``python -m trainer.eval`` and ``python -m trainer.generate`` on real checkpoints, and the
cross-check of our greedy decoding against transformers' ``generate`` on exported models."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tests.helpers import assert_ok, read_metrics, read_wandb_run, run_module, torchrun
from tests.inference_helpers import trained_run
from trainer.config import ConfigError, EvalConfig, GenerateConfig, ModelConfig
from trainer.data.prepare import prepare_dataset
from trainer.data.tokenizer import ByteTokenizer, CharTokenizer
from trainer.eval import evaluate_checkpoint
from trainer.export import export, write_model
from trainer.generate import generate, run
from trainer.inference import InferenceError, Source, load_model
from trainer.model import GPT

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def llama(tmp_path_factory, base_env):
    return trained_run(tmp_path_factory, base_env, "llama-zero0")


@pytest.fixture(scope="module")
def exported(llama, tmp_path_factory):
    return export(llama, tmp_path_factory.mktemp("exported") / "hf")


def _val_event(run_dir, step: int = 10) -> dict:
    (event,) = [e for e in read_metrics(run_dir, "eval") if e["step"] == step]
    return event


def _val_loss(run_dir, step: int = 10) -> float:
    return _val_event(run_dir, step)["val_loss"]


# ---------------------------------------------------------------------------- eval


def test_eval_reports_the_trainers_validation_numbers(llama, tmp_path, base_env):
    """The same batches (debug=fast: eval_batches=1) on the same world size: bitwise the same loss."""
    args = [f"checkpoint={llama}", "batches=1", f"output_dir={tmp_path}", "logger.mode=offline"]
    proc = run_module("trainer.eval", args, tmp_path, base_env | {"WANDB_MODE": "offline"})
    assert_ok(proc)
    report = json.loads((tmp_path / "val-step-10.json").read_text())
    trainer_val = _val_event(llama)
    assert report["loss"] == trainer_val["val_loss"]
    assert report["bits_per_byte"] == trainer_val["val_bpb"]  # same bytes counted: the dataset's tokenizer
    assert report["tokens"] == 8 * 64 and report["batches"] == 1 and report["step"] == 10
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    # byte tokenizer: one byte per token but end-of-text, so bpb is a little above loss / ln 2
    assert report["loss"] / math.log(2) <= report["bits_per_byte"] < 1.1 * report["loss"] / math.log(2)
    assert f"loss {report['loss']:.4f}" in proc.stdout
    (row,) = read_wandb_run(tmp_path)["history"]
    assert row["eval/loss"] == report["loss"] and row["eval/bits_per_byte"] == report["bits_per_byte"]


def test_eval_on_two_ranks_of_a_two_rank_zero3_run(tmp_path_factory, base_env, tmp_path):
    run_dir = trained_run(tmp_path_factory, base_env, "llama-gqa-zero3-2ranks")
    args = ["-m", "trainer.eval", f"checkpoint={run_dir}", "batches=1", f"output_dir={tmp_path}"]
    proc = torchrun(2, args, tmp_path, base_env)
    assert_ok(proc)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]
    assert json.loads((tmp_path / "val-step-10.json").read_text())["loss"] == _val_loss(run_dir)


def test_eval_of_the_exported_model_equals_the_checkpoints(llama, exported, tmp_path):
    data = str(load_model(llama).source.run_config["data"]["path"])
    ours = evaluate_checkpoint(EvalConfig(checkpoint=str(llama), batches=2, output_dir=str(tmp_path)))
    again = evaluate_checkpoint(EvalConfig(checkpoint=str(exported), data=data, output_dir=str(tmp_path)))
    assert again["batches"] > ours["batches"] == 2  # 0: the whole split
    first2 = evaluate_checkpoint(
        EvalConfig(checkpoint=str(exported), data=data, batches=2, output_dir=str(tmp_path))
    )
    assert first2["loss"] == ours["loss"] and first2["bits_per_byte"] == ours["bits_per_byte"]


def test_eval_bad_input(llama, exported, tmp_path, base_env):
    with pytest.raises(InferenceError, match="does not exist"):
        evaluate_checkpoint(EvalConfig(checkpoint=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="data is not set"):
        evaluate_checkpoint(EvalConfig(checkpoint=str(exported)))
    other = CharTokenizer("abcdefgh .").save(tmp_path / "char-tokenizer")
    with pytest.raises(InferenceError, match="embedding rows"):
        evaluate_checkpoint(EvalConfig(checkpoint=str(llama), tokenizer=str(other)))
    (tmp_path / "docs.txt").write_text("abc def gh.\n\n" * 400)
    prepare_dataset([tmp_path / "docs.txt"], tmp_path / "chars", seq_len=16, tokenizer="char", num_workers=1)
    with pytest.raises(InferenceError, match="another tokenizer"):
        evaluate_checkpoint(EvalConfig(checkpoint=str(llama), data=str(tmp_path / "chars")))
    proc = run_module("trainer.eval", [f"checkpoint={tmp_path / 'nope'}"], tmp_path, base_env)
    assert (
        proc.returncode == 2 and proc.stderr.startswith("error: checkpoint=") and proc.stderr.count("\n") == 1
    )
    proc = run_module("trainer.eval", ["batches=1"], tmp_path, base_env)
    assert proc.returncode == 2 and "checkpoint is not set" in proc.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    (damaged / "trainer_config.json").write_text((exported / "trainer_config.json").read_text()[:100])
    with pytest.raises(InferenceError, match="trainer_config.json: damaged"):
        load_model(damaged)


def test_a_relative_step_directory_finds_its_run(llama, base_env):
    """`checkpoint=step-10` from checkpoints/, or `.` from inside it: the run dir is two levels up."""
    step_dir = llama / "checkpoints" / "step-10"
    for cwd, path in ((step_dir.parent, "step-10"), (step_dir, ".")):
        args = [f"checkpoint={path}", "prompt=Once", "greedy=true", "max_new_tokens=4"]
        assert_ok(run_module("trainer.generate", args, cwd, base_env))


# ---------------------------------------------------------------------------- generate


def test_generate_streams_and_the_cache_changes_nothing(llama, tmp_path, base_env):
    outs = []
    for cache in ("true", "false"):
        args = [f"checkpoint={llama}", "prompt=Once upon a time", "greedy=true", "max_new_tokens=80"]
        proc = run_module("trainer.generate", [*args, f"use_cache={cache}"], tmp_path, base_env)
        assert_ok(proc)
        outs.append(proc.stdout)
    assert outs[0] == outs[1] and outs[0].startswith("Once upon a time")
    assert len(outs[0]) > len("Once upon a time") + 40  # 80 new bytes (unless end-of-text came)


def test_generate_from_a_file_in_batches(exported, tmp_path, capsys):
    prompts = ["The horse", "Count with me: one, two,", "12 + 30 ="]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    cfg = dict(checkpoint=str(exported), prompt_file=str(tmp_path / "prompts.txt"), max_new_tokens=12)
    records = run(
        GenerateConfig(**cfg, batch_size=2, temperature=1.0, seed=3, output=str(tmp_path / "out.jsonl"))
    )
    assert [r["prompt"] for r in records] == prompts
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == records
    assert run(GenerateConfig(**cfg, batch_size=2, temperature=1.0, seed=3)) == records  # seeded
    alone = [run(GenerateConfig(**cfg | {"prompt_file": None, "prompt": p}, greedy=True))[0] for p in prompts]
    assert run(GenerateConfig(**cfg, batch_size=3, greedy=True)) == alone  # padding changes nothing
    stopped = run(GenerateConfig(**cfg | {"prompt_file": None, "prompt": "A"}, greedy=True, stop=["e"]))[0]
    assert "e" not in stopped["completion"]
    capsys.readouterr()
    bf16 = run(
        GenerateConfig(**cfg | {"prompt_file": None, "prompt": "A", "max_new_tokens": 4}, dtype="bf16")
    )
    assert bf16[0]["tokens"] > 0 or bf16[0]["finish_reason"] == "eot"


def test_generate_bad_input(llama, tmp_path, base_env, caplog):
    proc = run_module("trainer.generate", [f"checkpoint={llama}", "prompt="], tmp_path, base_env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: prompt is empty")
    (tmp_path / "p.txt").write_text("first\n\nthird\n")
    with pytest.raises(ConfigError, match="line 2 is an empty prompt"):
        run(GenerateConfig(checkpoint=str(llama), prompt_file=str(tmp_path / "p.txt")))
    with pytest.raises(InferenceError, match="does not exist"):
        run(GenerateConfig(checkpoint=str(tmp_path / "nope"), prompt="hi"))
    partial = tmp_path / "run" / "checkpoints" / "step-10.partial"  # a save that never finished
    shutil.copytree(llama / "checkpoints" / "step-10", partial, ignore=shutil.ignore_patterns("COMPLETE"))
    with pytest.raises(InferenceError, match="incomplete checkpoint"):
        run(GenerateConfig(checkpoint=str(partial), prompt="hi"))
    with pytest.raises(InferenceError, match="embedding rows"):
        other = CharTokenizer("abcdefgh .").save(tmp_path / "char-tokenizer")
        run(GenerateConfig(checkpoint=str(llama), prompt="abc", tokenizer=str(other)))
    long = "x" * 100  # the nano model's window is 64
    with pytest.raises(ConfigError, match="prompt_overflow=truncate"):
        run(GenerateConfig(checkpoint=str(llama), prompt=long, prompt_overflow="error"))
    (record,) = run(GenerateConfig(checkpoint=str(llama), prompt=long, max_new_tokens=3, greedy=True))
    assert "keeping its last 64" in caplog.text and record["prompt"] == long


# ---------------------------------------------------------------------------- transformers cross-check


def _random_export(tmp_path, arch: dict) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, max_seq_len=64, vocab_size=257, init_std=0.3, **arch)
    model = GPT(cfg).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    write_model(Source(tmp_path, "export", cfg, sd, ByteTokenizer(), None, None), tmp_path)
    return model


@pytest.mark.parametrize(
    "arch", [{}, {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"}], ids=["llama", "gpt2"]
)
def test_greedy_tokens_equal_transformers_generate(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    _random_export(tmp_path, arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = load_model(tmp_path)
    prompts = [list(b"Once upon a time"), list(b"12 + 3"), list(b"A")]
    width = max(map(len, prompts))
    x = torch.tensor([[256] * (width - len(p)) + p for p in prompts])  # left-padded with end-of-text
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = hf.generate(x, attention_mask=mask, max_new_tokens=40, do_sample=False)[:, width:].tolist()
    mine = generate(ours.model, prompts, 40, vocab_size=257, eot_id=256, greedy=True)
    for t, m in zip(theirs, mine):
        t = t[: t.index(256)] if 256 in t else t  # transformers pads finished rows with eos
        assert t == m.ids
    assert sum(len(set(m.ids)) for m in mine) > 15  # varied text, not one token repeated


def test_greedy_tokens_equal_transformers_on_a_trained_export(exported):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    ours = load_model(exported)
    ids = [ours.tokenizer.eot_id, *tok("Once upon a time")["input_ids"]]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids) :].tolist()
    (mine,) = generate(ours.model, [ids], 40, vocab_size=257, eot_id=256, greedy=True)
    assert (theirs[: theirs.index(256)] if 256 in theirs else theirs) == mine.ids
