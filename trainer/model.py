"""GPT: a decoder-only Transformer, its activation checkpointing, and analytic counts.

Reads top to bottom in execution order: rotary embeddings, the KV cache (generation only),
attention, MLP, block, model; then the parameter and FLOPs counts and the optimizer's parameter
groups. Torch only (no distributed code), so the same module runs under DeepSpeed, DDP or on one CPU.

Shapes: B batch, T time, D d_model, H query heads, K key/value heads, Q head_dim,
V padded vocab (see ``padded_vocab_size``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from trainer.config import ModelConfig


def padded_vocab_size(cfg: ModelConfig) -> int:
    """The embedding/logit width: vocab_size rounded up to a multiple of pad_vocab_to.

    The extra rows never appear as targets, so training drives their logits down; samplers
    should still mask logits[..., cfg.vocab_size:].
    """
    assert cfg.vocab_size is not None, "model.vocab_size is unset: take it from the tokenizer"
    return -(-cfg.vocab_size // cfg.pad_vocab_to) * cfg.pad_vocab_to


# ---------------------------------------------------------------------------- rotary embedding


def rope_cache(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """Tables [max_seq_len, 1, Q] of the rotation angles pos * theta^(-2i/Q) for ``apply_rope``:
    (cos, cos) and (-sin, sin), each angle once per half; the 1 broadcasts over heads."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)[:, None]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x1, x2) = (x[..., i], x[..., i + Q/2]) of x [B, T, heads, Q] by the angles of
    the tables cos/sin [T, 1, Q]: (x1 cos - x2 sin, x2 cos + x1 sin), the "rotate half" layout of
    GPT-NeoX and HF Llama. Rolling x by Q/2 swaps its halves: 4 ops where chunk-and-cat takes 8,
    which matters when decoding one token at a time, with the same result bit for bit."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# ---------------------------------------------------------------------------- KV cache (generation)


class KVCache:
    """Keys and values of every position so far, per layer: prefill once, then one token per step.

    Buffers are preallocated [B, K, max_seq_len, Q] (K: the k/v heads, cached before GQA repeats
    them). ``pos`` counts the filled slots. Rows may be left-padded: row b's first ``pad[b]``
    slots hold padding that no real token attends to, and its positions (RoPE angles or learned
    embeddings) start at 0 at its first real token, so each row computes what it would alone.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        pad: Tensor | None = None,
    ) -> None:
        shape = (batch_size, cfg.kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.pos = 0
        self.pad = pad if pad is not None and bool(pad.any()) else None  # [B] long, None: no padding
        self.mask: Tensor | None = None  # of the tokens being processed; set by `prepare`

    def prepare(self, T: int) -> slice | Tensor:
        """Positions of the next T tokens: a slice, or [B, T] for padded rows. Sets ``mask`` for attention.

        A slice indexes the RoPE tables and the position embeddings as a view: at one token per
        step, building and gathering a [T] index would cost more than the math it feeds.
        """
        if self.pad is None and T == 1:  # one new token attends to every cached one: no mask
            self.mask = None
            return slice(self.pos, self.pos + 1)
        slots = torch.arange(self.pos, self.pos + T, device=self.k[0].device)
        keys = torch.arange(self.pos + T, device=slots.device)
        if self.pad is None:
            self.mask = keys <= slots[:, None]  # [T, S]
            return slice(self.pos, self.pos + T)
        pad = self.pad[:, None, None]  # [B, 1, 1]
        # Real tokens see real earlier tokens; a pad slot sees itself only, so no row is all -inf
        # (which would give NaN, and NaN values would leak through zero attention weights).
        causal = keys <= slots[:, None]
        self.mask = ((causal & (keys >= pad)) | (keys == slots[:, None]))[:, None]  # [B, 1, T, S]
        return (slots - self.pad[:, None]).clamp(min=0)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, K, T, Q] of the new tokens; return those of every position so far [B, K, S, Q]."""
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ---------------------------------------------------------------------------- transformer block


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm over the last dim, written out for fp32 on CPU.

    There torch's rms_norm (2.13) runs these same ops, so the results are identical bit for bit
    (forward and backward), but it adds two copies and more dispatch: a few percent of a decoded
    token for the tiny model (9 norms per token). Other devices keep torch's fused kernel, and
    half types its fp32 math.

    Without autograd (generation, evaluation) the same ops run in place on temporaries, with the
    mean's divisor and eps as 0-dim tensors: an op given a Python number wraps it into a tensor on
    every call (~2 us; mean does it for its divisor), which is most of a norm's cost at one token.
    The results are the same bit for bit (sum / D is how mean computes).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # the written-out paths run in fp32 only: eps=None means fp32's epsilon there, as in torch
        self._fp32_eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
        # explicit device: a model built on the meta device still normalizes on CPU after to_empty
        self._dim = torch.tensor(float(self.normalized_shape[-1]), device="cpu")
        self._eps = torch.tensor(self._fp32_eps, device="cpu")

    def forward(self, x: Tensor) -> Tensor:
        if not (x.is_cpu and x.dtype == torch.float32 and self.weight is not None):
            return super().forward(x)
        if torch.is_grad_enabled():
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self._fp32_eps) * self.weight
        ms = x.pow(2).sum(-1, keepdim=True).div_(self._dim)
        return (x * ms.add_(self._eps).rsqrt_()).mul_(self.weight)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)  # RMSNorm has a gain but never a bias
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    # no call at all where dropout would return x: a module call costs ~2 us, 10 per decoded token
    return F.dropout(x, p) if training and p > 0 else x


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        # q, k and v in one matmul; k and v are narrower under grouped-query attention
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv_dim, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout  # of the attention weights and of the output

    def forward(
        self,
        x: Tensor,
        cos: Tensor | None = None,
        sin: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        B, T, D = x.shape
        H, K, Q = self.n_head, self.n_kv_head, self.head_dim
        # sdpa attends over the second-to-last dim: [B, heads, T, Q]. At T = 1 (every decoded
        # token) that is the memory of [B, T, heads, Q] as is: a view, not 3 transposes per layer.
        # split_with_sizes, not split: split's Python wrapper costs more than the split itself
        if T == 1:
            qk, v = self.qkv(x).view(B, H + 2 * K, 1, Q).split_with_sizes([H + K, K], dim=1)
        else:
            qk, v = self.qkv(x).view(B, T, H + 2 * K, Q).split_with_sizes([H + K, K], dim=2)
        if cos is not None:  # the angles of the new tokens [T, 1, Q] ([B, T, 1, Q]), either layout
            qk = apply_rope(qk, cos, sin)  # q and k together: half the ops of rotating each
        if T > 1:
            qk, v = qk.transpose(1, 2), v.transpose(1, 2)
        q, k = qk.split_with_sizes([H, K], dim=1)
        if cache is not None:  # generation: attend over every cached position [B, K, S, Q]
            k, v = cache.update(layer, k, v)
        if self.n_kv_head != self.n_head:
            # GQA: kv head j serves the n_head/n_kv_head consecutive query heads that follow it
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # [B, H, S, Q]
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if cache is None:
            dropout_p = self.dropout if self.training else 0.0
            y = attend(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # queries are the last T of S positions: is_causal would align them to the first T
            y = attend(q, k, v, attn_mask=cache.mask)
        y = (y if T == 1 else y.transpose(1, 2)).reshape(B, T, D)  # [B, H, T, Q] -> [B, T, D]
        return dropout(self.out_proj(y), self.dropout, self.training)


def attend(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """``scaled_dot_product_attention``, computed in fp32 on the CPU whatever the precision.

    torch's CPU attention kernels are 2-5x slower in bf16 than in fp32 (forward + backward, one
    thread: 8.0 ms against 1.6 at [12, 4, 64, 32], 23.5 against 6.7 at [16, 4, 128, 32]), while
    bf16 matmuls on a CPU with AMX are 3-8x faster than fp32: bf16 pays only with attention in
    fp32 there. On GPUs the bf16 flash kernels are the fast path, as they are.
    """
    if q.device.type != "cpu" or (q.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return y.to(q.dtype)


class MLP(nn.Module):
    """GPT-2's MLP: D -> ffn -> GELU -> D."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        return dropout(self.down(F.gelu(self.up(x))), self.dropout, self.training)


class SwiGLU(nn.Module):
    """Llama's MLP: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up and w2 the down projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        return dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)

    def forward(
        self,
        x: Tensor,
        cos: Tensor | None = None,
        sin: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------- activation checkpointing

# Selective AC (torchtitan's "op-level" policy): keep the outputs of the matmuls and of attention,
# whose recomputation costs O(D) or O(T) FLOPs per element, and recompute the elementwise ops
# (norms, activations, rope, dropout, residual adds), which are cheap but hold most activations.
_SAC_SAVE_OPS = {
    getattr(torch.ops.aten, name).default
    for name in (
        "mm",
        "addmm",
        "bmm",
        "linear",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_attention_math",
    )
    if hasattr(torch.ops.aten, name)
}


def _sac_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAC_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


# ---------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, *, init_weights: bool = True) -> None:
        """``init_weights=False``: the modules' own default init only; the caller runs
        ``init_weights`` (e.g. under ZeRO-3, whose parameters are partitioned as they are built)."""
        super().__init__()
        assert cfg.vocab_size is not None, "model.vocab_size is unset: take it from the tokenizer"
        self.cfg = cfg
        vocab = padded_vocab_size(cfg)
        self.tok_emb = nn.Embedding(vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one Parameter, read by both
        if cfg.pos_emb == "rope":
            # derived from the config, so not saved in checkpoints (persistent=False)
            cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if init_weights:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, assign: Assign | None = None, *, replay_module_init: bool = False) -> None:
        """(Re)initialize every parameter and buffer, e.g. after ``to_empty`` from the meta device.

        Values are drawn on the CPU from torch's default generator, one parameter at a time, so
        they are the same whatever device or partitioning holds the model. ``assign(p, values)``
        puts a parameter's full fp32 values where p lives (under ZeRO-3: this rank's partition of
        them); by default ``p.copy_(values)``. ``replay_module_init``: first draw what the
        modules' own constructors draw (and drop it), for a model whose constructors drew
        elsewhere: then the values equal those of ``GPT(cfg)`` built whole for the same seed.
        """
        if self.cfg.tie_embeddings:  # again: to_empty() gives the two modules separate tensors
            self.lm_head.weight = self.tok_emb.weight
        if replay_module_init:
            _replay_module_init(self)
        put = assign or _copy
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                put(module.weight, _normal(module.weight, std))
            if isinstance(module, nn.Linear) and module.bias is not None:
                put(module.bias, torch.zeros(_full_shape(module.bias)))
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):  # their reset_parameters: gain 1, bias 0
                if module.weight is not None:
                    put(module.weight, torch.ones(_full_shape(module.weight)))
                if getattr(module, "bias", None) is not None:
                    put(module.bias, torch.zeros(_full_shape(module.bias)))
        # GPT-2: each block adds two projections into the residual stream; scaling them by
        # 1/sqrt(2 * n_layer) keeps the stream's variance independent of depth at init.
        for name, p in self.named_parameters():
            if name.endswith(("attn.out_proj.weight", "mlp.down.weight", "mlp.w2.weight")):
                put(p, _normal(p, std / math.sqrt(2 * self.cfg.n_layer)))
        if self.cfg.pos_emb == "rope":
            cos, sin = rope_cache(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """idx, targets: [B, T] token ids -> (logits [B, T, V], mean cross-entropy or None).

        Targets equal to -100 are ignored (padding, or masked prompt tokens). With a ``cache``
        (generation), idx holds the tokens that follow the cached ones; the cache takes them in.
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if self.cfg.max_seq_len < start + T:
            raise ValueError(f"sequence length {start + T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_emb(idx)  # [B, T, D]
        cos = sin = None
        if cache is not None:
            x, cos, sin = self._cached_positions(x, cache)
        elif self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))  # [T, D] broadcasts over B
        else:
            cos, sin = self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype)  # [T, 1, Q]
        x = dropout(x, self.cfg.dropout, self.training)
        if cache is not None:  # generation: no activation checkpointing, no loss
            for i, block in enumerate(self.blocks):
                x = block(x, cos, sin, cache, i)
            cache.pos += T
            return self.lm_head(self.norm(x)), None
        # recomputation only pays off when a backward pass will follow
        ckpt = self.cfg.act_ckpt != "none" and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if ckpt and self._checkpoints_block(i):
                x = checkpoint(block, x, cos, sin, use_reentrant=False, context_fn=self._ckpt_context())
            else:
                x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))  # [B, T, V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def _cached_positions(self, x: Tensor, cache: KVCache) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Position information of the new tokens: learned embeddings added, or RoPE angles."""
        positions = cache.prepare(x.shape[1])  # a slice of T, or [B, T] for left-padded rows
        if self.pos_emb is not None:
            return x + self.pos_emb.weight[positions], None, None  # the lookup pos_emb() does
        # [T, 1, Q], or [B, T, 1, Q] for padded rows
        return x, self.rope_cos[positions].to(x.dtype), self.rope_sin[positions].to(x.dtype)

    def _checkpoints_block(self, i: int) -> bool:
        if self.cfg.act_ckpt == "every_n":
            return i % self.cfg.act_ckpt_every == 0
        return self.cfg.act_ckpt in ("full", "selective")

    def _ckpt_context(self):
        if self.cfg.act_ckpt == "selective":
            return partial(create_selective_checkpoint_contexts, _sac_policy)
        return noop_context_fn  # plain checkpointing: keep only the block's inputs


Assign = Callable[[nn.Parameter, Tensor], None]  # (p, its full values on the CPU): write them into p


def _full_shape(p: nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape  # a ZeRO-3 partition keeps its full shape


def _normal(p: nn.Parameter, std: float) -> Tensor:
    # a CPU fp32 tensor: the CPU generator's stream, whatever p's device, dtype or partitioning
    return torch.empty(_full_shape(p), dtype=torch.float32).normal_(0.0, std)


def _copy(p: nn.Parameter, values: Tensor) -> None:
    p.copy_(values)


def _replay_module_init(model: nn.Module) -> None:
    """Draw from the CPU generator, in construction order, what the constructors of nn.Linear and
    nn.Embedding draw (``reset_parameters``: kaiming_uniform_ and the bias's uniform_ are one
    uniform_ each, normal_ one normal_; the norms draw nothing); one parameter at a time."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            torch.empty(_full_shape(module.weight)).uniform_()
            if module.bias is not None:
                torch.empty(_full_shape(module.bias)).uniform_()
        elif isinstance(module, nn.Embedding):
            torch.empty(_full_shape(module.weight)).normal_()


# ---------------------------------------------------------------------------- counts and optimizer groups


def num_params(cfg: ModelConfig, *, exclude_position_embedding: bool = False) -> int:
    """Parameters of GPT(cfg), counted from the config alone (tied weights once)."""
    d, f, vocab = cfg.d_model, cfg.ffn_dim, padded_vocab_size(cfg)
    kv_dim = cfg.kv_heads * cfg.head_dim
    b = int(cfg.bias)
    attn = d * (d + 2 * kv_dim) + b * (d + 2 * kv_dim) + d * d + b * d  # qkv, out_proj
    # swiglu: w1, w3, w2; gelu: up, down
    mlp = 3 * d * f + b * (2 * f + d) if cfg.mlp == "swiglu" else 2 * d * f + b * (f + d)
    norm = d if cfg.norm == "rmsnorm" else d + b * d
    total = vocab * d + cfg.n_layer * (attn + mlp + 2 * norm) + norm
    if not cfg.tie_embeddings:
        total += vocab * d  # lm_head
    if cfg.pos_emb == "learned" and not exclude_position_embedding:
        total += cfg.max_seq_len * d
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward): 6*N + 12*L*H*Q*T.

    As in the PaLM paper (appendix B) and nanoGPT's estimate_mfu. 6*N counts a multiply-add
    (2 FLOPs) per parameter per token, three times (forward, and backward w.r.t. inputs and
    weights). N is every parameter except the learned position table and, when embeddings are
    untied, the input token table (both are lookups, not matmuls; an untied lm_head is a matmul
    and is counted); norm gains and biases are included, as in nanoGPT (they are <0.1%).
    12*L*H*Q*T counts the attention scores q@k^T and the weighted sum att@v over the full T x T
    square (causal masking is ignored, by convention). Recomputation for activation
    checkpointing is not counted, so MFU from this stays comparable across policies.
    """
    n = num_params(cfg, exclude_position_embedding=True)
    if not cfg.tie_embeddings:
        n -= padded_vocab_size(cfg) * cfg.d_model
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the weight matrices of Linear layers, nothing else.

    Norm gains, biases and embedding tables (including a token table tied to lm_head) get no
    decay. Each parameter appears exactly once.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a shared (tied) Parameter once
        if id(p) in matrices and id(p) not in embeddings:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
