"""Unit tests for trainer.model: shapes, causality, counts, optimizer groups, checkpointing."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import trainer.model as model_mod
from trainer.config import ModelConfig
from trainer.model import GPT, RMSNorm, flops_per_token, num_params, optimizer_groups, padded_vocab_size

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "model"


def small_cfg(**overrides) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, d_model=32, vocab_size=100, max_seq_len=32)
    return ModelConfig(**{**base, **overrides})


def build(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def tokens(cfg: ModelConfig, batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)


def load_preset(name: str) -> ModelConfig:
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(PRESETS / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


# ---------------------------------------------------------------------------- forward


def test_forward_shapes_and_initial_loss_near_uniform():
    cfg = small_cfg(vocab_size=250, pad_vocab_to=64)  # padded to 256
    model = build(cfg)
    idx = tokens(cfg, batch=3, seq=20)
    # targets independent of the inputs: with tied embeddings the input token itself gets a
    # head start at init (its embedding survives the residual stream), so idx != targets here
    logits, loss = model(idx, tokens(cfg, batch=3, seq=20, seed=2))
    assert padded_vocab_size(cfg) == 256
    assert logits.shape == (3, 20, 256)
    assert torch.isfinite(loss)
    # small init -> near-uniform predictions over the padded vocabulary
    assert abs(loss.item() - math.log(256)) < 0.1
    logits_only, no_loss = model(idx)
    assert no_loss is None
    torch.testing.assert_close(logits_only, logits)


def test_ignore_index_is_honoured():
    cfg = small_cfg()
    model = build(cfg).eval()
    idx = tokens(cfg, seq=16)
    targets = tokens(cfg, seq=16, seed=2)
    targets[0, :10] = -100
    targets[1, 5:] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    # the ignored positions' (arbitrary) true tokens must not matter
    assert not torch.isclose(
        loss, F.cross_entropy(logits.flatten(0, 1), tokens(cfg, seq=16, seed=2).flatten())
    )


def test_vocab_size_must_be_set():
    with pytest.raises(AssertionError, match="vocab_size"):
        GPT(small_cfg(vocab_size=None))


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_causal_future_tokens_do_not_change_past_logits(pos_emb):
    cfg = small_cfg(pos_emb=pos_emb)
    model = build(cfg).eval()
    idx = tokens(cfg, batch=1, seq=16)
    t = 9
    changed = idx.clone()
    changed[0, t] = (idx[0, t] + 1) % cfg.vocab_size
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=0)
    assert not torch.allclose(after[:, t:], before[:, t:])  # and the change is visible from t on


@pytest.mark.parametrize(
    "pos_emb,norm,mlp",
    list(itertools.product(["rope", "learned"], ["rmsnorm", "layernorm"], ["swiglu", "gelu"])),
)
def test_every_architecture_combination_trains(pos_emb, norm, mlp):
    cfg = small_cfg(pos_emb=pos_emb, norm=norm, mlp=mlp, bias=norm == "layernorm")
    model = build(cfg)
    idx = tokens(cfg)
    logits, loss = model(idx, idx)
    loss.backward()
    assert logits.shape == (2, 16, padded_vocab_size(cfg))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())


def test_rope_and_learned_positions_differ_in_modules():
    rope, learned = build(small_cfg(pos_emb="rope")), build(small_cfg(pos_emb="learned"))
    assert rope.pos_emb is None and "rope_cos" not in rope.state_dict()  # buffers are non-persistent
    assert learned.pos_emb.weight.shape == (32, 32) and not hasattr(learned, "rope_cos")


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    gqa_cfg = small_cfg(n_head=4, n_kv_head=2)
    mha_cfg = dataclasses.replace(gqa_cfg, n_kv_head=None)
    gqa, mha = build(gqa_cfg).eval(), build(mha_cfg).eval()
    d, q_dim = gqa_cfg.d_model, gqa_cfg.head_dim
    state = gqa.state_dict()
    for i in range(gqa_cfg.n_layer):
        w = state[f"blocks.{i}.attn.qkv.weight"]  # [D + 2*K*Q, D]
        assert w.shape == (d + 2 * 2 * q_dim, d)
        q, k, v = w.split([d, 2 * q_dim, 2 * q_dim])
        # kv head j serves query heads 2j and 2j+1
        rep = lambda t: t.view(2, q_dim, d).repeat_interleave(2, dim=0).reshape(4 * q_dim, d)  # noqa: E731
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    idx = tokens(gqa_cfg)
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0])
    assert num_params(gqa_cfg) < num_params(mha_cfg)


def test_weight_tying_shares_storage_only_when_tied():
    tied = build(small_cfg(tie_embeddings=True))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = build(small_cfg(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.tok_emb.weight)


def test_init_scales_residual_projections_and_zeroes_biases():
    cfg = small_cfg(n_layer=8, d_model=128, bias=True, mlp="gelu", norm="layernorm")
    model = build(cfg)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    for block in model.blocks:
        assert block.attn.out_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp.down.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.attn.qkv.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
        assert torch.count_nonzero(block.attn.qkv.bias) == 0
        assert torch.count_nonzero(block.mlp.up.bias) == 0
    assert model.tok_emb.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)


def test_meta_device_build_then_init_weights():
    cfg = small_cfg()
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.tok_emb.weight  # tying survives to_empty
    torch.testing.assert_close(model.rope_cos, build(cfg).rope_cos)
    idx = tokens(cfg)
    _, loss = model(idx, tokens(cfg, seed=2))
    assert abs(loss.item() - math.log(padded_vocab_size(cfg))) < 0.1


def test_same_seed_gives_identical_models_and_outputs():
    cfg = small_cfg()
    idx = tokens(cfg)
    a, b, c = build(cfg, seed=3).eval(), build(cfg, seed=3).eval(), build(cfg, seed=4).eval()
    with torch.no_grad():
        assert torch.equal(a(idx)[0], b(idx)[0])
        assert not torch.equal(a(idx)[0], c(idx)[0])


# ---------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bias": True, "norm": "layernorm"},
        {"tie_embeddings": False},
        {"pos_emb": "learned", "mlp": "gelu", "bias": True},
        {"n_head": 8, "n_kv_head": 2},
        {"n_kv_head": 1, "d_ff": 80, "bias": True, "tie_embeddings": False, "pos_emb": "learned"},
    ],
)
def test_num_params_equals_real_count(overrides):
    cfg = small_cfg(**overrides)
    model = build(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    pos = model.pos_emb.weight.numel() if model.pos_emb is not None else 0
    assert num_params(cfg, exclude_position_embedding=True) == num_params(cfg) - pos


def test_preset_param_counts_match_published_figures():
    # analytic: nothing is allocated for these
    assert num_params(load_preset("gpt2-small")) == 124_439_808  # nanoGPT's GPT-2 124M
    assert num_params(load_preset("llama-7b")) == 6_738_415_616  # Llama-2-7B


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_loads_and_counts_like_the_model(path):
    cfg = load_preset(path.stem)
    assert isinstance(cfg, ModelConfig)
    if cfg.vocab_size is None:  # taken from the tokenizer at run time
        cfg.vocab_size = 256
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())


def test_small_presets_fit_their_purpose():
    nano, tiny = load_preset("nano"), load_preset("tiny")
    assert num_params(dataclasses.replace(nano, vocab_size=1, pad_vocab_to=1)) < 100_000
    assert 500_000 <= num_params(dataclasses.replace(tiny, vocab_size=256)) <= 1_000_000


def test_flops_per_token_hand_computed():
    # L=2, H=4, Q=8, D=32, ffn=64, V=100 (pad 1), rope, rmsnorm, swiglu, no bias
    cfg = small_cfg(d_ff=64, pad_vocab_to=1)
    per_layer = 32 * 96 + 32 * 32 + 3 * 32 * 64 + 2 * 32  # qkv, out_proj, w1/w3/w2, two norms
    n_tied = 100 * 32 + 2 * per_layer + 32  # shared embedding/lm_head + final norm
    attention = 12 * 2 * 4 * 8 * 16
    assert flops_per_token(cfg, 16) == 6 * n_tied + attention
    # untied: the input lookup is not a matmul, the separate lm_head is: same N
    assert flops_per_token(dataclasses.replace(cfg, tie_embeddings=False), 16) == 6 * n_tied + attention
    # learned positions: the table is a lookup and does not count
    learned = dataclasses.replace(cfg, pos_emb="learned")
    assert flops_per_token(learned, 16) == 6 * n_tied + attention


# ---------------------------------------------------------------------------- optimizer groups


@pytest.mark.parametrize("tied", [True, False])
def test_optimizer_groups_split_decay_from_no_decay(tied):
    cfg = small_cfg(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=tied)
    model = build(cfg)
    decay_group, no_decay_group = optimizer_groups(model, weight_decay=0.1)
    assert decay_group["weight_decay"] == 0.1 and no_decay_group["weight_decay"] == 0.0
    decay = {id(p) for p in decay_group["params"]}
    no_decay = {id(p) for p in no_decay_group["params"]}
    listed = [id(p) for g in (decay_group, no_decay_group) for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert all(p.dim() == 2 for p in decay_group["params"])
    assert id(model.tok_emb.weight) in no_decay and id(model.pos_emb.weight) in no_decay
    assert (id(model.lm_head.weight) in decay) == (not tied)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith(".bias"):
            assert id(p) in no_decay, name
    assert id(model.blocks[0].attn.qkv.weight) in decay and id(model.blocks[1].mlp.down.weight) in decay
    torch.optim.AdamW(optimizer_groups(model, 0.1), lr=1e-3)  # accepted as-is


# ---------------------------------------------------------------------------- activation checkpointing


def loss_and_grads(cfg: ModelConfig, idx: torch.Tensor):
    model = build(cfg, seed=0).train()
    torch.manual_seed(123)  # same dropout masks for every policy
    _, loss = model(idx, idx)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("policy", ["full", "every_n", "selective"])
def test_activation_checkpointing_matches_no_checkpointing(policy, dropout):
    cfg = small_cfg(n_layer=4, d_model=64, act_ckpt_every=2, dropout=dropout)
    idx = tokens(cfg, seq=32)
    ref_loss, ref_grads = loss_and_grads(dataclasses.replace(cfg, act_ckpt="none"), idx)
    loss, grads = loss_and_grads(dataclasses.replace(cfg, act_ckpt=policy), idx)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("policy,calls", [("full", 4), ("every_n", 2), ("selective", 4), ("none", 0)])
def test_checkpointing_applies_only_when_training_with_grad(policy, calls, monkeypatch):
    seen = []
    real = model_mod.checkpoint
    monkeypatch.setattr(model_mod, "checkpoint", lambda fn, *a, **kw: seen.append(fn) or real(fn, *a, **kw))
    cfg = small_cfg(n_layer=4, act_ckpt=policy, act_ckpt_every=2)
    model = build(cfg)
    idx = tokens(cfg)
    model.train()(idx)
    assert len(seen) == calls
    if policy == "every_n":
        assert seen == [model.blocks[0], model.blocks[2]]
    with torch.no_grad():
        model(idx)
    model.eval()(idx)
    assert len(seen) == calls


def test_selective_policy_saves_matmuls_and_attention_only(monkeypatch):
    decisions, real = {}, model_mod._sac_policy

    def spy(ctx, op, *args, **kwargs):
        decisions[op] = real(ctx, op, *args, **kwargs)
        return decisions[op]

    monkeypatch.setattr(model_mod, "_sac_policy", spy)
    cfg = small_cfg(act_ckpt="selective")
    _, loss = build(cfg).train()(tokens(cfg), tokens(cfg, seed=2))
    loss.backward()
    aten, must_save = torch.ops.aten, torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
    saved = {op for op, policy in decisions.items() if policy == must_save}
    assert aten.mm.default in saved
    assert any("scaled_dot_product" in str(op) for op in saved)
    assert aten.mul.Tensor in decisions and aten.mul.Tensor not in saved  # rope, norms, swiglu gate
    assert aten.silu.default in decisions and aten.silu.default not in saved


def peak_forward_bytes(policy: str) -> int:
    """Peak of CPU bytes allocated (and not yet freed) during one training forward pass."""
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=64, vocab_size=64, max_seq_len=128, act_ckpt=policy)
    model = build(cfg).train()
    idx = tokens(cfg, batch=8, seq=128)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        model(idx, idx)
    # "[memory]" events carry signed byte counts (+alloc, -free); their running sum is live memory
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_activation_checkpointing_lowers_peak_memory():
    none, full, selective = (peak_forward_bytes(p) for p in ("none", "full", "selective"))
    assert none > 4 * 2**20  # the measurement sees the activations at all
    assert full < 0.6 * none
    assert full < selective <= none  # selective still keeps the matmul and attention outputs


@pytest.mark.parametrize("dim, eps", [(128, 1e-5), (100, None)])
def test_rmsnorm_is_torchs_bit_for_bit(dim, eps):
    """The written-out CPU paths (autograd on, and the in-place one without it) must stay exactly
    nn.RMSNorm: training and generation results depend on it."""
    ours, ref = RMSNorm(dim, eps=eps), torch.nn.RMSNorm(dim, eps=eps)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 7, dim) * 3
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert torch.equal(ya, yb)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(xa.grad, xb.grad) and torch.equal(ours.weight.grad, ref.weight.grad)


def test_rmsnorm_edge_cases_match_torch():
    x = torch.randn(2, 16, dtype=torch.float64) * 1e-3
    assert torch.equal(RMSNorm(16).double()(x), torch.nn.RMSNorm(16).double()(x))  # eps=None: fp64 epsilon
    x = torch.randn(2, 16)
    plain = RMSNorm(16, eps=1e-5, elementwise_affine=False)
    assert torch.equal(plain(x), torch.nn.RMSNorm(16, eps=1e-5, elementwise_affine=False)(x))


@pytest.mark.parametrize("autocast", [False, True])
def test_attention_runs_in_fp32_on_the_cpu_in_bf16(autocast):
    """bf16 queries (DeepSpeed's bf16 weights, or autocast) attend in fp32 on the CPU: the result
    is fp32 attention of the same inputs, in the inputs' dtype, and gradients flow back in bf16."""
    q, k, v = (torch.randn(2, 4, 16, 8).to(torch.bfloat16).requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model_mod.attend(q, k, v, is_causal=True)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want.to(torch.bfloat16))
    assert not torch.equal(y, F.scaled_dot_product_attention(q, k, v, is_causal=True))  # not the bf16 kernel
    y.sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_attention_under_autocast_with_fp32_inputs_stays_fp32():
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model_mod.attend(q, k, v, is_causal=True)
    assert y.dtype == torch.float32
    assert torch.equal(y, F.scaled_dot_product_attention(q, k, v, is_causal=True))
