"""Export a checkpoint as a Hugging Face ``transformers`` model directory.

    python -m trainer.export <checkpoint> <out_dir> [--tokenizer DIR] [--dtype fp32] [--overwrite]

``<checkpoint>`` is a run directory (its newest complete checkpoint), a ``checkpoints/step-<N>``
directory of any ZeRO stage, or an exported directory. ``<out_dir>`` receives:

    model.safetensors        consolidated weights, under transformers' parameter names
    config.json              LlamaForCausalLM (rope + rmsnorm + swiglu) or GPT2LMHeadModel
                             (learned positions + layernorm + gelu); other combinations are refused
    generation_config.json   eos/pad = our end-of-text id; suppress_tokens = the padding ids
    tokenizer.json, tokenizer_config.json   a PreTrainedTokenizerFast equivalent to ours
    trainer_config.json, trainer_tokenizer/ our model config and tokenizer (reloadable by
                                            trainer.eval / trainer.generate)

Vocabulary: our embedding has ``pad_vocab_to``-rounded rows; they are exported as they are
(config vocab_size = the padded size, as GPT-NeoX/Pythia exports do), so the export is lossless
and logits match ours on every id. The tokenizer has only the real ids; generation_config's
``suppress_tokens`` keeps ``generate`` from emitting a padding id, as our sampler does.

Mapping notes: our fused ``qkv`` [D + 2*kv_dim, D] splits into q/k/v (Llama) or is transposed
whole into GPT-2's ``Conv1D`` c_attn ([in, out]). Our RoPE uses the rotate-half layout, which is
HF Llama's, so q/k need no permutation. GPT-2 always has biases: a bias-free model exports zeros
(exact). GPT-2 needs ``activation_function="gelu"`` (exact erf; its default gelu_new is the tanh
approximation) and has no grouped-query attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, ModelConfig
from trainer.data import DataError
from trainer.data.tokenizer import EOT_TEXT, Tokenizer
from trainer.hf_weights import from_hf_state_dict, hf_architecture, to_hf_state_dict  # noqa: F401 (also from here)
from trainer.inference import (
    DTYPES,
    EXPORT_CONFIG,
    EXPORT_TOKENIZER,
    WEIGHTS,
    InferenceError,
    Source,
    read_source,
)
from trainer.model import padded_vocab_size

FORMAT = "trainer-export"
VERSION = 1


# ---------------------------------------------------------------------------- architecture


def hf_config(cfg: ModelConfig, tok: Tokenizer, dtype: str = "fp32") -> dict[str, Any]:
    """config.json for transformers (written by hand: exporting does not need transformers)."""
    common = {
        "vocab_size": padded_vocab_size(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "eos_token_id": tok.eot_id,
        "pad_token_id": tok.eot_id,
        "use_cache": True,
        "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],
    }
    if hf_architecture(cfg) == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ffn_dim,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,  # transformers < 5 reads this key, 5.x rope_parameters
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": cfg.bias,
            "mlp_bias": cfg.bias,
            "attention_dropout": cfg.dropout,
            "bos_token_id": None,  # Llama's default (1) is a real token of ours
            **common,
        }
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.ffn_dim,
        "activation_function": "gelu",  # ours is exact GELU; GPT-2's default gelu_new is tanh-approximate
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "bos_token_id": tok.eot_id,
        **common,
    }


# ---------------------------------------------------------------------------- tokenizer


def hf_tokenizer(tok: Tokenizer) -> Any:
    """A ``tokenizers.Tokenizer`` giving the same ids as ``tok`` (byte, char, bpe and hf kinds)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    if tok.kind in ("bpe", "hf"):
        return HFTok.from_str(tok.tok.to_str())  # type: ignore[attr-defined]
    if tok.kind == "byte":
        # Byte-level BPE without merges: each byte is one token, with GPT-2's byte -> char map.
        alphabet = _bytes_to_unicode()
        hf = HFTok(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
    elif tok.kind == "char":
        hf = HFTok(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))  # type: ignore[attr-defined]
        hf.decoder = decoders.Fuse()  # join the characters without spaces
    else:
        raise InferenceError(f"tokenizer kind {tok.kind!r} cannot be exported: use byte, char, bpe or hf")
    hf.add_special_tokens([AddedToken(EOT_TEXT, special=True)])
    assert hf.token_to_id(EOT_TEXT) == tok.eot_id, "end-of-text must keep its id"
    return hf


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (tokenizers' ByteLevel)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0  # printable bytes map to themselves, the others to 256, 257, ...
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_tokenizer(tok: Tokenizer, out_dir: Path, max_len: int) -> None:
    """tokenizer.json + tokenizer_config.json for AutoTokenizer, and our own files beside them."""
    hf = hf_tokenizer(tok)
    hf.save(str(out_dir / "tokenizer.json"))
    eot = hf.id_to_token(tok.eot_id)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eot,
        "pad_token": eot,
        "bos_token": None,
        "unk_token": None,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        # A literal "<|endoftext|>" in text is text, as in our tokenizers (transformers would
        # otherwise give the special id); eos/pad stay the real end-of-text id.
        "split_special_tokens": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(out_dir / EXPORT_TOKENIZER)


# ---------------------------------------------------------------------------- export


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Write ``checkpoint`` (any ZeRO stage, or an exported dir) as a transformers model directory."""
    out_dir = Path(out_dir).resolve()  # "." has no name to put ".partial" after
    if dtype not in DTYPES:
        raise InferenceError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise InferenceError(f"{out_dir} exists and is not an empty directory: remove it or pass --overwrite")
    src = read_source(checkpoint, tokenizer=tokenizer)
    hf_architecture(src.cfg)  # refuse before writing anything
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_model(src, staging, dtype)
    if out_dir.exists():
        _replace_contents(staging, out_dir)
    else:
        os.replace(staging, out_dir)  # a reader never sees a half-written export
    return out_dir


# what makes a directory an export, for transformers and for us: out first, in last
_MARKERS = ("config.json", EXPORT_CONFIG)


def _replace_contents(staging: Path, out_dir: Path) -> None:
    """Move the staged export into an existing ``out_dir``, keeping the directory itself (it may be
    a shell's current directory, as with ``export run .``); readers see its markers only when
    every other file is in place."""
    for name in _MARKERS:
        (out_dir / name).unlink(missing_ok=True)
    for old in out_dir.iterdir():
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    for new in sorted(staging.iterdir(), key=lambda p: p.name in _MARKERS):
        os.replace(new, out_dir / new.name)
    staging.rmdir()


def write_model(src: Source, out_dir: Path, dtype: str = "fp32") -> None:
    from safetensors.torch import save_file

    cfg, tok = src.cfg, src.tokenizer
    tensors = {k: v.to(DTYPES[dtype]) for k, v in to_hf_state_dict(cfg, src.state_dict).items()}
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", hf_config(cfg, tok, dtype))
    padded = padded_vocab_size(cfg)
    generation: dict[str, Any] = {"eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id}
    if padded > tok.vocab_size:  # never generate an id the tokenizer cannot decode
        generation["suppress_tokens"] = list(range(tok.vocab_size, padded))
    _write_json(out_dir / "generation_config.json", generation)
    write_tokenizer(tok, out_dir, cfg.max_seq_len)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": hf_architecture(cfg),
        "model": dataclasses.asdict(cfg),
        "tokenizer": {
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "identity": tok.identity(),
        },
        "source": {"path": str(src.path.resolve()), "kind": src.kind, "step": src.step},
    }
    _write_json(out_dir / EXPORT_CONFIG, meta)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other bad input
        print(f"error: {message} (usage: python -m trainer.export <checkpoint> <out_dir>)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(
        prog="python -m trainer.export",
        description="\n\n".join(__doc__.split("\n\n")[:4]),  # what it reads and what it writes
        epilog="e.g. python -m trainer.export runs/default hf/; then from_pretrained('hf/')",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="run dir, checkpoints/step-<N> dir, or exported dir")
    parser.add_argument("out_dir", help="directory to write (must not exist, or be empty)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the run's dataset tokenizer)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights dtype (default fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    args = parser.parse_args(argv)
    try:
        out = export(
            args.checkpoint,
            args.out_dir,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (InferenceError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
