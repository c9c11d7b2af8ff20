"""The model's tensors from its config alone, for the planner: parameter tensors (ZeRO-3's largest
layer and persistent parameters), activations kept for backward under each ``model.act_ckpt``
policy, and logits. ``tests/unit/test_plan.py`` checks them against the model and autograd."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model import padded_vocab_size


def param_tensors(cfg: ModelConfig) -> list[tuple[str, int]]:
    """(module, elements) of every parameter tensor of GPT(cfg), from the config alone (a tied table
    appears under both of its modules; tests/unit/test_plan.py checks this against the model)."""
    d, f, v, b = cfg.d_model, cfg.ffn_dim, padded_vocab_size(cfg), cfg.bias
    qkv = d + 2 * cfg.kv_heads * cfg.head_dim
    norm = [("norm", d)] + ([("norm", d)] if cfg.norm == "layernorm" and b else [])
    mlp = (
        [("w1", d * f), ("w3", d * f), ("w2", f * d)]
        if cfg.mlp == "swiglu"
        else [("up", d * f), ("down", f * d)]
    )
    if b:
        mlp += [("w1", f), ("w3", f), ("w2", d)] if cfg.mlp == "swiglu" else [("up", f), ("down", d)]
    block = [*norm, ("qkv", d * qkv), ("out_proj", d * d), *norm, *mlp]
    block += [("qkv", qkv), ("out_proj", d)] if b else []
    out = [("tok_emb", v * d), ("lm_head", v * d)] + [
        (f"blocks.{i}.{m}", n) for i in range(cfg.n_layer) for m, n in block
    ]
    out += norm + ([("pos_emb", cfg.max_seq_len * d)] if cfg.pos_emb == "learned" else [])
    return out


def _shapes(cfg: ModelConfig, persist_below: int) -> tuple[int, int]:
    """The parameters of the largest unit ZeRO-3 gathers at once (what DeepSpeed's estimator calls
    the largest layer): a whole Transformer block, which trainer.engine makes a ZeRO-3 leaf module,
    or the embedding table (a tied one counts once per module); and the parameters ZeRO-3 keeps
    whole (tensors of fewer than ``persist_below`` elements)."""
    tensors = param_tensors(cfg)
    block = sum(n for module, n in tensors if module.startswith("blocks.0."))
    largest = max([n for module, n in tensors if not module.startswith("blocks.")] + [block])
    shared = 1 if cfg.tie_embeddings else 0  # the tied table: one tensor
    persistent = sum(n for _, n in tensors[shared:] if n < persist_below)
    return largest, persistent


def largest_module(cfg: ModelConfig) -> int:
    """The largest module's own parameters (a tied table counts in both modules): what
    ``deepspeed.zero.Init`` holds whole while it builds, before partitioning it."""
    per_module: dict[str, int] = {}
    for module, n in param_tensors(cfg):
        if not module.endswith("norm"):  # each norm is its own module, of d or 2d elements
            per_module[module] = per_module.get(module, 0) + n
    return max([*per_module.values(), 2 * cfg.d_model])


def activation_bytes(mcfg: ModelConfig, micro_batch: int, seq_len: int, precision: str, cpu: bool) -> float:
    """Tensors the forward keeps for backward, per micro-batch, under ``mcfg.act_ckpt``.

    Per block and token (D d_model, K k/v width, F ffn): the input (D), each norm's output (D; and
    its pre-gain product on CPU fp32, where RMSNorm is written out), qkv (D + 2K), the rotated q,k
    (D + K), attention's output (D; laid out [B, T, H, Q], so out_proj reads a view of it), the
    residual (D), the MLP's matmul and activation outputs (SwiGLU 4F, GELU 2F). ``full`` keeps the
    block inputs only, plus one block recomputed in backward; ``selective`` keeps the matmul and
    attention outputs.
    """
    a = 4 if precision == "fp32" else 2
    d, k, f, t = mcfg.d_model, mcfg.kv_heads * mcfg.head_dim, mcfg.ffn_dim, micro_batch * seq_len
    norm = 2 if (cpu and precision == "fp32" and mcfg.norm == "rmsnorm") else 1
    mlp = 4 * f if mcfg.mlp == "swiglu" else 2 * f
    block = (d + 2 * norm * d + (d + 2 * k) + (d + k) + d + d + mlp) * t * a
    lse = mcfg.n_head * t * 4  # attention's log-sum-exp, fp32
    full = block + lse
    saved_input = d * t * a
    selective = (d + (d + 2 * k) + d + d + (2 * f if mcfg.mlp == "swiglu" else f) + d) * t * a + lse
    layers = mcfg.n_layer
    if mcfg.act_ckpt == "none":
        return layers * full
    if mcfg.act_ckpt == "full":
        return layers * saved_input + full
    if mcfg.act_ckpt == "selective":
        return layers * selective + full
    ckpt = -(-layers // mcfg.act_ckpt_every)  # every_n: blocks 0, n, 2n, ...
    return ckpt * saved_input + (layers - ckpt) * full + full


def logits_bytes(mcfg: ModelConfig, micro_batch: int, seq_len: int, precision: str) -> float:
    """Logits, their log-softmax (kept for backward) and the two gradients of that size in backward."""
    a = 4 if precision == "fp32" else 2
    return 4 * micro_batch * seq_len * padded_vocab_size(mcfg) * a
