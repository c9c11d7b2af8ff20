"""Language-model evaluation over a stream of batches: mean loss, perplexity, bits per byte, tokens.

One function, :func:`evaluate`, serves the trainer's in-training validation (with the DeepSpeed
engine) and ``python -m trainer.eval`` (with a plain GPT loaded from a checkpoint), so the two
report the same numbers on the same batches.

``loss`` is the mean of the per-micro-batch mean losses, averaged over ranks: exactly what the
trainer has always logged as ``val_loss``. With packed fixed-length samples every micro-batch
holds the same number of target tokens, so this is also the mean loss per token, and
``bits_per_byte = loss * tokens / (ln 2 * bytes)`` where ``bytes`` counts the UTF-8 bytes the
target tokens decode to (end-of-text and other special tokens count 0). Bits per byte compares
models across tokenizers; perplexity (``exp(loss)``) does not.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from trainer.config import ConfigError
from trainer.data.batch import to_device
from trainer.data.tokenizer import Tokenizer
from trainer.distributed import all_reduce_mean


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per token (nats)
    tokens: int  # target tokens evaluated, over all ranks
    bytes: int  # UTF-8 bytes those tokens decode to (0 when unknown)
    batches: int  # global batches evaluated

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows a double past ~709

    @property
    def bits_per_byte(self) -> float | None:
        if not self.bytes:
            return None
        return self.loss * self.tokens / (math.log(2) * self.bytes)

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self) | {"perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


@torch.no_grad()
def evaluate(
    model,
    batches: Iterable[dict[str, torch.Tensor]],
    micro_batch_size: int,
    max_batches: int,
    device: torch.device,
    byte_lengths: torch.Tensor | None = None,
) -> EvalResult:
    """Evaluate ``model`` (a DeepSpeed engine or a GPT: ``model(x, y) -> (logits, loss)``).

    ``batches`` yields this rank's slice of each global batch (``tokens`` [G/W, T + 1], as the
    loader gives them); the first ``max_batches`` are used (0: all). ``byte_lengths`` [vocab]
    gives the UTF-8 bytes of each id (see :func:`token_byte_lengths`); without it ``bytes`` is 0.
    Every rank must call this (the totals are all-reduced). The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    losses: list[torch.Tensor] = []
    tokens = nbytes = n = 0
    try:
        for n, batch in enumerate(batches, start=1):
            rows = batch["tokens"]  # [G/W, T + 1] on the host
            for i in range(0, rows.shape[0], micro_batch_size):
                rm = rows[i : i + micro_batch_size]
                # the same transfers and forward as the trainer's step: the same numbers
                _, loss = model(*to_device(rm, device))
                losses.append(loss)
                ym = rm[:, 1:]  # the labels, counted on the host: no device sync per micro-batch
                targets = ym[ym != -100]
                tokens += targets.numel()
                if byte_lengths is not None:
                    nbytes += int(byte_lengths[targets.long()].sum())
            if n == max_batches:
                break
    finally:
        model.train(was_training)
    if not losses:
        raise ConfigError("the validation split holds less than one global batch: lower global_batch_size")
    mean = torch.stack(losses).mean().item()
    # One collective; token and byte counts are exact integers in float64, so mean * W is the sum.
    loss, mean_tokens, mean_bytes = all_reduce_mean([mean, float(tokens), float(nbytes)])
    w = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return EvalResult(loss, round(mean_tokens * w), round(mean_bytes * w), n)


def token_byte_lengths(tok: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes of each id's text [vocab_size] (int64); special tokens such as end-of-text are 0.

    Exact for byte, char and byte-level BPE tokenizers; for other tokenizer.json tokenizers each
    id is decoded on its own, which can miscount ids that hold part of a character.
    """
    if tok.kind == "byte":
        lengths = torch.ones(tok.vocab_size, dtype=torch.int64)
    elif tok.kind == "char":
        chars = tok.chars  # type: ignore[attr-defined]
        lengths = torch.tensor([len(c.encode("utf-8")) for c in chars] + [0], dtype=torch.int64)
    else:
        lengths = _hf_byte_lengths(tok.tok, tok.vocab_size)  # type: ignore[attr-defined]
    lengths[tok.eot_id] = 0
    return lengths


def _hf_byte_lengths(hf, vocab_size: int) -> torch.Tensor:
    from tokenizers import pre_tokenizers

    lengths = torch.zeros(vocab_size, dtype=torch.int64)  # the largest id + 1: ids may have gaps
    special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    decoder = json.loads(hf.to_str()).get("decoder") or {}
    # Byte-level BPE (GPT-2 style) spells every byte as one character of a 256-character alphabet.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet()) if decoder.get("type") == "ByteLevel" else set()
    for token, i in hf.get_vocab(with_added_tokens=True).items():
        if i in special or i >= len(lengths):
            continue
        if alphabet and all(c in alphabet for c in token):
            lengths[i] = len(token)
        else:
            lengths[i] = len(hf.decode([i], skip_special_tokens=False).encode("utf-8"))
    return lengths
