"""KV cache, sampling and the decoding loop, on small random models (no checkpoints, no subprocesses)."""

from __future__ import annotations

import pytest
import torch

from trainer.config import ConfigError, GenerateConfig, ModelConfig
from trainer.data.tokenizer import EOT_TEXT, ByteTokenizer, CharTokenizer, HFTokenizer, train_bpe
from trainer.evaluate import evaluate, token_byte_lengths
from trainer.generate import StopStrings, generate, sample_next
from trainer.model import GPT, KVCache

VOCAB = 100
ARCHS = {
    "llama": {},
    "llama-gqa-bias": {"n_kv_head": 1, "bias": True},
    "gpt2": {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True},
}


def model(arch: str = "llama", max_seq_len: int = 32, **kw) -> GPT:
    """A random nano model whose logits are far apart (init_std 0.3), so argmax has no near-ties."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layer=2,
        n_head=2,
        d_model=32,
        max_seq_len=max_seq_len,
        vocab_size=VOCAB,
        init_std=0.3,
        **ARCHS[arch],
        **kw,
    )
    return GPT(cfg).eval()


def prompts(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------- the cache in the model


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_cached_forward_in_pieces_equals_one_forward(arch):
    m = model(arch)
    x = torch.tensor(prompts(20, 20, 20))
    full, _ = m(x)
    cache = KVCache(m.cfg, 3)
    pieces = [m(x[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 9), (9, 20))]  # prefill, steps
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-4)
    assert cache.pos == 20


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_left_padded_rows_compute_what_they_would_alone(arch):
    m = model(arch)
    rows = prompts(12, 5, 9)
    width = 12
    x = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    cache = KVCache(m.cfg, 3, pad=torch.tensor([width - len(r) for r in rows]))
    padded = torch.cat([m(x[:, :6], cache=cache)[0], m(x[:, 6:], cache=cache)[0]], dim=1)
    for b, r in enumerate(rows):
        alone, _ = m(torch.tensor([r]))
        torch.testing.assert_close(padded[b, width - len(r) :], alone[0], rtol=0, atol=1e-4)
    assert torch.isfinite(padded).all()  # pad slots attend to themselves: no NaN anywhere


def test_cache_overflow_is_refused():
    m = model(max_seq_len=8)
    cache = KVCache(m.cfg, 1)
    m(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        m(torch.zeros(1, 1, dtype=torch.long), cache=cache)


# ---------------------------------------------------------------------------- greedy: cache == no cache


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_cache_equals_without_token_for_token(arch):
    """A left-padded batch with the cache against each prompt alone through the plain forward,
    past the context window (32) so the window slides several times."""
    m = model(arch)
    ps = prompts(3, 17, 32)
    cached = generate(m, ps, 60, vocab_size=VOCAB, greedy=True)
    for p, c in zip(ps, cached):
        (ref,) = generate(m, [p], 60, vocab_size=VOCAB, greedy=True, use_cache=False)
        assert c.ids == ref.ids and len(c.ids) == 60
        assert len(set(c.ids)) > 5  # a real sequence, not one token repeated


def test_padding_rows_never_emit_padding_ids():
    m = model()
    (c,) = generate(m, prompts(4), 50, vocab_size=10, greedy=False, temperature=5.0)
    assert all(0 <= t < 10 for t in c.ids)


# ---------------------------------------------------------------------------- sampling


def test_sampling_is_deterministic_under_a_seed():
    m = model()
    ps = prompts(5, 9)

    def run(seed):
        return [c.ids for c in generate(m, ps, 30, vocab_size=VOCAB, temperature=1.5, top_k=50, seed=seed)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_greedy_sampling_settings_agree():
    logits = torch.randn(4, VOCAB)
    best = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, greedy=True), best)
    assert torch.equal(sample_next(logits, temperature=0.0), best)
    assert torch.equal(sample_next(logits, top_k=1, generator=g), best)
    assert torch.equal(sample_next(logits, top_p=1e-6, generator=g), best)


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-45, 5e-324])
def test_a_tiny_temperature_is_greedy_not_a_crash(temperature):
    # logits / temperature overflows to inf below ~1e-37 (inf - inf = nan in the softmax)
    logits = torch.randn(4, VOCAB) * 10
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=temperature, generator=g), logits.argmax(-1))
    capped = sample_next(logits, temperature=temperature, top_k=3, top_p=0.5, generator=g)
    assert torch.equal(capped, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -1.0])
def test_a_temperature_that_is_not_a_finite_non_negative_number_is_refused(temperature):
    with pytest.raises(ConfigError, match="^temperature="):
        GenerateConfig(checkpoint="runs/x", prompt="A", temperature=temperature)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=3, generator=g).tolist()) == {0, 1, 2}
    probs = logits[0].softmax(-1)  # 0.64, 0.23, 0.09, ...: top_p=0.8 keeps the first two
    assert probs[:1].sum() < 0.8 < probs[:2].sum()
    assert set(sample_next(logits, top_p=0.8, generator=g).tolist()) == {0, 1}


# ---------------------------------------------------------------------------- stopping


def test_end_of_text_and_stop_conditions_end_a_row():
    m = model()
    ps = prompts(6, 6)
    free = generate(m, ps, 20, vocab_size=VOCAB, greedy=True)
    i = next(i for i, t in enumerate(free[0].ids) if i and t not in free[0].ids[:i])
    ended = generate(m, ps, 20, vocab_size=VOCAB, greedy=True, eot_id=free[0].ids[i])  # now end-of-text
    assert ended[0].ids == free[0].ids[:i] and ended[0].finish_reason == "eot"
    seen: list[tuple[int, int]] = []
    stopped = generate(
        m,
        ps,
        20,
        vocab_size=VOCAB,
        greedy=True,
        should_stop=lambda b, ids: b == 1 and len(ids) == 5,
        on_token=lambda b, t: seen.append((b, t)),
    )
    assert stopped[1].finish_reason == "stop" and stopped[1].ids == free[1].ids[:5]
    assert stopped[0].finish_reason == "length" and len(stopped[0].ids) == 20
    assert [t for b, t in seen if b == 1] == free[1].ids[:4]  # the stopping token is not streamed


def test_stop_strings_detect_and_cut():
    stops = StopStrings(ByteTokenizer(), ["\n\n", "END"])
    ids = list(b"hello\nworld EN")
    assert not stops(0, ids)
    assert stops(0, ids + [ord("D")])
    assert stops.cut("a\n\nb END c") == "a"
    assert stops.cut("no stop here") == "no stop here"
    wide = ["日本語です", "😀😀😀"]  # more UTF-8 bytes (ids, for a byte tokenizer) than characters + 8
    for stop in wide:
        ids = list(f"Once upon a time {stop}".encode())
        assert StopStrings(ByteTokenizer(), wide)(0, ids) and not StopStrings(ByteTokenizer(), wide)(
            0, ids[:-1]
        )


# ---------------------------------------------------------------------------- evaluation


def test_byte_lengths_count_the_utf8_bytes_of_the_text():
    text = "Grüße, 世界! plain ascii"
    corpus = [text, "more words here"] * 20
    for tok in (ByteTokenizer(), CharTokenizer("".join(corpus)), train_bpe(corpus, 300)):
        lengths = token_byte_lengths(tok)
        ids = tok.encode(text)
        assert int(lengths[ids].sum()) == len(text.encode("utf-8")), tok.kind
        assert lengths[tok.eot_id] == 0


def test_byte_lengths_cover_every_id_of_a_tokenizer_with_id_gaps():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models

    hf = HFTok(models.WordLevel({"[UNK]": 0, "a": 1, "bb": 2, EOT_TEXT: 70000}, unk_token="[UNK]"))
    hf.add_special_tokens([EOT_TEXT])
    tok = HFTokenizer(hf)
    lengths = token_byte_lengths(tok)
    assert len(lengths) == tok.vocab_size == 70001
    assert lengths[1] == 1 and lengths[2] == 2 and lengths[70000] == 0


@torch.no_grad()
def test_evaluate_is_the_mean_of_micro_batch_losses():
    m = model()
    g = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, 60, (4, 17), generator=g, dtype=torch.int32)} for _ in range(3)]
    lengths = torch.ones(VOCAB, dtype=torch.int64)
    lengths[0] = 0  # say id 0 is end-of-text
    result = evaluate(m, batches, 2, 2, torch.device("cpu"), lengths)
    micro = [b["tokens"][i : i + 2].long() for b in batches[:2] for i in (0, 2)]
    expected = [m(t[:, :-1], t[:, 1:])[1] for t in micro]
    assert result.loss == torch.stack(expected).mean().item()
    assert (result.tokens, result.batches) == (2 * 4 * 16, 2)
    labels = torch.cat([b["tokens"][:, 1:] for b in batches[:2]])
    assert result.bytes == int((labels != 0).sum())
    assert result.bits_per_byte == pytest.approx(
        result.loss * result.tokens / (0.6931471805599453 * result.bytes)
    )
    assert not m.training
    m.train()
    evaluate(m, batches, 4, 0, torch.device("cpu"))
    assert m.training  # the caller's mode is restored
