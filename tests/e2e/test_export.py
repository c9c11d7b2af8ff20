"""``python -m trainer.export``: every ZeRO stage, both architecture mappings, checked with transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from tests.helpers import assert_ok, run_module
from tests.inference_helpers import RUNS, trained_run
from trainer.config import ModelConfig
from trainer.data.tokenizer import EOT_TEXT, ByteTokenizer, CharTokenizer, train_bpe
from trainer.export import (
    export,
    from_hf_state_dict,
    hf_tokenizer,
    main,
    to_hf_state_dict,
    write_model,
    write_tokenizer,
)
from trainer.inference import InferenceError, Source, load_model
from trainer.model import GPT

transformers = pytest.importorskip("transformers")

TEXT = "Once upon a time, Mia saw a red fox. 12 + 30 = 42."


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything loads from local directories


def _logits_diff(ours, hf_dir, ids: list[int]) -> float:
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert hf.dtype == torch.float32
    x = torch.tensor([ids])
    with torch.no_grad():
        return (ours(x)[0] - hf(x).logits).abs().max().item()


# ---------------------------------------------------------------------------- from real checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_export_loads_in_transformers_with_our_logits(tmp_path_factory, base_env, tmp_path, name):
    run_dir = trained_run(tmp_path_factory, base_env, name)
    out = tmp_path / "hf"
    proc = run_module(
        "trainer.export", [str(run_dir), str(out)], tmp_path, base_env | {"HF_HUB_OFFLINE": "1"}
    )
    assert_ok(proc)
    assert "from_pretrained" in proc.stdout
    # ours: the run's config.yaml + the consolidated weights of its newest checkpoint
    ours = load_model(run_dir / "checkpoints" / "step-10")
    assert ours.source.kind == "checkpoint" and ours.source.step == 10
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(TEXT)["input_ids"]
    assert ids == ours.tokenizer.encode(TEXT)
    assert tok.decode(ids) == TEXT and tok.eos_token_id == ours.tokenizer.eot_id
    assert _logits_diff(ours.model, out, ids) < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == name.split("-")[0]
    assert config["vocab_size"] == 320  # the padded embedding, exported whole
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 256 and generation["suppress_tokens"] == list(range(257, 320))
    # and the exported directory loads back into our model unchanged
    again = load_model(out)
    for (k, a), b in zip(ours.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------- the mapping, without training


def _random(arch: dict) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=64, vocab_size=257, init_std=0.2, **arch)
    return GPT(cfg).eval()


@pytest.mark.parametrize(
    "arch",
    [
        {"n_kv_head": 2, "bias": True, "tie_embeddings": False, "d_ff": 48, "rope_theta": 500.0},
        {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu", "bias": False, "norm_eps": 1e-6},
    ],
    ids=["llama-gqa-bias-untied", "gpt2-no-bias"],
)
def test_mapping_round_trips_and_matches_transformers(tmp_path, arch):
    model = _random(arch)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    back = from_hf_state_dict(model.cfg, to_hf_state_dict(model.cfg, sd))
    assert sd.keys() == back.keys() and all(torch.equal(sd[k], back[k]) for k in sd)
    write_model(Source(tmp_path, "export", model.cfg, sd, ByteTokenizer(), None, None), tmp_path)
    assert _logits_diff(model, tmp_path, list(TEXT.encode())) < 1e-4


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_tokenizer_export_gives_our_ids(tmp_path, kind):
    corpus = [TEXT, "Grüße aus 世界", "more text"] * 10
    tok = {"byte": ByteTokenizer, "char": lambda: CharTokenizer("".join(corpus))}.get(kind, lambda: None)()
    tok = tok or train_bpe(corpus, 300)
    hf = hf_tokenizer(tok)
    for text in corpus[:3]:
        assert hf.encode(text).ids == tok.encode(text)
        assert hf.decode(tok.encode(text) + [tok.eot_id], skip_special_tokens=False) == tok.decode(
            tok.encode(text) + [tok.eot_id]
        )


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_transformers_encodes_a_literal_end_of_text_as_text_as_we_do(tmp_path, kind):
    """Our tokenizers read "<|endoftext|>" in text as characters (end-of-text ids come only from
    prepare, between documents); the export loaded by AutoTokenizer must give the same ids."""
    text = f"{TEXT}{EOT_TEXT}more text"
    tok = {"byte": ByteTokenizer, "char": lambda: CharTokenizer(text)}.get(kind, lambda: None)()
    tok = tok or train_bpe([text] * 10, 300)
    write_tokenizer(tok, tmp_path, 64)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.eot_id not in tok.encode(text)
    assert hf(text)["input_ids"] == hf.encode(text) == tok.encode(text)
    assert hf.eos_token_id == hf.pad_token_id == tok.eot_id  # generation still stops at the real one
    assert hf.decode(tok.encode(text) + [tok.eot_id]) == tok.decode(tok.encode(text) + [tok.eot_id])


# ---------------------------------------------------------------------------- bad input


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    return err


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tmp_path_factory, base_env, tmp_path, capsys):
    run_dir = trained_run(tmp_path_factory, base_env, "llama-zero0")
    assert "does not exist" in _error(capsys, [str(tmp_path / "nope"), str(tmp_path / "out")])
    assert "usage" in _error(capsys, [str(run_dir)])  # out_dir missing

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    step = broken / "checkpoints" / "step-10"
    (step / "COMPLETE").unlink()  # as if the save had died
    assert "incomplete" in _error(capsys, [str(step), str(tmp_path / "out")])
    assert "no complete checkpoint" in _error(capsys, [str(broken), str(tmp_path / "out")])

    (step / "COMPLETE").write_text("{}")
    (step / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert "damaged" in _error(capsys, [str(step), str(tmp_path / "out")])

    odd = tmp_path / "odd"
    shutil.copytree(run_dir, odd)
    config = yaml.safe_load((odd / "config.yaml").read_text())
    config["model"]["mlp"] = "gelu"  # rope + rmsnorm + gelu: no transformers architecture
    (odd / "config.yaml").write_text(yaml.safe_dump(config))
    err = _error(capsys, [str(odd), str(tmp_path / "out")])
    assert "model.pos_emb=rope, model.norm=rmsnorm, model.mlp=gelu" in err
    assert not (tmp_path / "out").exists()

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "--overwrite" in _error(capsys, [str(run_dir), str(tmp_path / "full")])


def test_gpt2_with_grouped_query_attention_is_refused():
    cfg = ModelConfig(pos_emb="learned", norm="layernorm", mlp="gelu", n_kv_head=2, vocab_size=257)
    with pytest.raises(InferenceError, match="model.n_kv_head=2"):
        to_hf_state_dict(cfg, {})


@pytest.mark.slow
def test_export_into_the_current_directory(tmp_path_factory, base_env, tmp_path, monkeypatch):
    run_dir = trained_run(tmp_path_factory, base_env, "llama-zero0")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert export(run_dir, ".") == tmp_path / "here"
    assert load_model(tmp_path / "here").source.kind == "export"


def test_export_refuses_a_file_as_out_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InferenceError, match="not an empty directory"):
        export(tmp_path / "nope", tmp_path / "file")
