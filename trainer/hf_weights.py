"""Our GPT in transformers' terms: which architecture computes exactly what it does, and the
mapping of parameter names and layouts between the two (used by the export and by loading an
exported directory back).

Our fused ``qkv`` [D + 2*kv_dim, D] splits into q/k/v (Llama) or is transposed whole into GPT-2's
``Conv1D`` c_attn ([in, out]). Our RoPE uses the rotate-half layout, which is HF Llama's, so q/k need
no permutation. GPT-2 always has biases: a bias-free model exports zeros (exact).
"""

from __future__ import annotations

import torch

from trainer.config import ModelConfig
from trainer.errors import InferenceError
from trainer.model import GPT


def hf_architecture(cfg: ModelConfig) -> str:
    """``llama`` or ``gpt2``: the transformers architecture that computes exactly what GPT(cfg) does."""
    combo = (cfg.pos_emb, cfg.norm, cfg.mlp)
    if combo == ("rope", "rmsnorm", "swiglu"):
        return "llama"
    if combo == ("learned", "layernorm", "gelu"):
        if cfg.kv_heads != cfg.n_head:
            raise InferenceError(
                f"model.n_kv_head={cfg.n_kv_head}: GPT-2 (learned + layernorm + gelu) has no grouped-query "
                "attention, so this model cannot be exported: train with model.n_kv_head=null"
            )
        return "gpt2"
    raise InferenceError(
        f"model.pos_emb={cfg.pos_emb}, model.norm={cfg.norm}, model.mlp={cfg.mlp}: no transformers "
        "architecture matches this combination; export supports pos_emb=rope norm=rmsnorm mlp=swiglu "
        "(Llama) and pos_emb=learned norm=layernorm mlp=gelu (GPT-2)"
    )


# ---------------------------------------------------------------------------- weights


def _name_pairs(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our name, transformers name, transpose) for every tensor but Llama's split qkv."""
    arch = hf_architecture(cfg)
    if arch == "llama":
        layer = "model.layers.{i}."
        pairs = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
        per_layer = [
            ("attn_norm", "input_layernorm"),
            ("mlp_norm", "post_attention_layernorm"),
            ("attn.out_proj", "self_attn.o_proj"),
            ("mlp.w1", "mlp.gate_proj"),
            ("mlp.w3", "mlp.up_proj"),
            ("mlp.w2", "mlp.down_proj"),
        ]
        transposed: set[str] = set()
    else:
        layer = "transformer.h.{i}."
        pairs = [
            ("tok_emb.weight", "transformer.wte.weight"),
            ("pos_emb.weight", "transformer.wpe.weight"),
            ("norm.weight", "transformer.ln_f.weight"),
            ("norm.bias", "transformer.ln_f.bias"),
        ]
        per_layer = [
            ("attn_norm", "ln_1"),
            ("mlp_norm", "ln_2"),
            ("attn.qkv", "attn.c_attn"),
            ("attn.out_proj", "attn.c_proj"),
            ("mlp.up", "mlp.c_fc"),
            ("mlp.down", "mlp.c_proj"),
        ]
        transposed = {"attn.qkv", "attn.out_proj", "mlp.up", "mlp.down"}  # Conv1D stores [in, out]
    out = [(ours, theirs, False) for ours, theirs in pairs]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", "lm_head.weight", False))
    # Norm biases exist for GPT-2 only (RMSNorm has none); Llama's linear biases follow model.bias.
    kinds = ("weight", "bias") if arch == "gpt2" or cfg.bias else ("weight",)
    for i in range(cfg.n_layer):
        prefix = layer.format(i=i)
        for ours, theirs in per_layer:
            norm = ours.endswith("_norm")
            for kind in kinds:
                if arch == "llama" and norm and kind == "bias":
                    continue
                t = ours in transposed and kind == "weight"
                out.append((f"blocks.{i}.{ours}.{kind}", f"{prefix}{theirs}.{kind}", t))
    return out


def _qkv_split(cfg: ModelConfig) -> list[int]:
    kv_dim = cfg.kv_heads * cfg.head_dim
    return [cfg.d_model, kv_dim, kv_dim]


def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names and layouts -> transformers'; tied weights appear once (as the embedding)."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, transpose in _name_pairs(cfg):
        if ours in sd:
            t = sd[ours].t() if transpose else sd[ours]
        else:  # a bias GPT-2 has and a bias-free model lacks: zeros compute the same thing
            t = torch.zeros(sd[ours.replace(".bias", ".weight")].shape[0])
        out[theirs] = t
    if hf_architecture(cfg) == "llama":
        kinds = ("weight", "bias") if cfg.bias else ("weight",)
        for i in range(cfg.n_layer):
            for kind in kinds:
                q, k, v = sd[f"blocks.{i}.attn.qkv.{kind}"].split(_qkv_split(cfg), dim=0)
                for name, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                    out[f"model.layers.{i}.self_attn.{name}.{kind}"] = t
    return {k: v.contiguous().clone() for k, v in out.items()}  # safetensors wants unshared storage


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_hf_state_dict` (for loading an exported directory back)."""
    with torch.device("meta"):
        expected = set(GPT(cfg).state_dict())
    sd: dict[str, torch.Tensor] = {}
    try:
        for ours, theirs, transpose in _name_pairs(cfg):
            if ours in expected:  # zero biases written for GPT-2's sake are dropped again
                sd[ours] = hf[theirs].t().contiguous() if transpose else hf[theirs]
        if hf_architecture(cfg) == "llama":
            kinds = ("weight", "bias") if cfg.bias else ("weight",)
            for i, kind in ((i, k) for i in range(cfg.n_layer) for k in kinds):
                parts = [hf[f"model.layers.{i}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
                sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    except KeyError as e:
        raise InferenceError(f"the exported weights lack {e.args[0]}: export the checkpoint again") from None
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return sd
