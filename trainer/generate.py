"""Generate text: ``python -m trainer.generate checkpoint=<dir> prompt="..."`` (or ``prompt_file=``).

The library half is :func:`generate`: batched decoding of token-id prompts (left-padded) with a
KV cache (prefill once, then one token per step) or, with ``use_cache=False``, by running the
whole context through the model each step (the reference the cache must match token for token).
Sampling: greedy, temperature, top-k, top-p, with a seeded generator. A completion ends at
end-of-text, at a stop condition, or after ``max_new_tokens``.

Context window: when a row outgrows ``model.max_seq_len`` the model keeps seeing its last 3/4
window (the cache is rebuilt, positions restart at 0). Each row's window depends on its own
tokens only, so a prompt gets the same greedy completion alone or in a batch, with the cache
or without it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from trainer.cli import one_line_errors
from trainer.config import ConfigError, GenerateConfig, register_configs
from trainer.data.tokenizer import Tokenizer
from trainer.eval import config_dir, typed
from trainer.model import GPT, KVCache

log = logging.getLogger("trainer")


# ---------------------------------------------------------------------------- sampling


def sample_next(
    logits: Tensor,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids [B] from logits [B, V]: argmax when greedy (or temperature 0), else a sample."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    # Shift first: softmax ignores it, and then no temperature, however small, overflows to
    # +inf (inf - inf = nan below ~1e-37); the most likely tokens stay at 0 (0/0 when it rounds to 0).
    logits = logits.float()
    logits = ((logits - logits.amax(dim=-1, keepdim=True)) / temperature).nan_to_num(0.0, 0.0, float("-inf"))
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ranked, order = torch.sort(logits, dim=-1, descending=True)
        probs = ranked.softmax(dim=-1)
        # keep the most likely tokens until they hold top_p; the first one always stays
        ranked = ranked.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ranked)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------- the decoding loop


@dataclass
class Completion:
    ids: list[int]  # generated ids, without the end-of-text that ended them
    finish_reason: str  # eot | stop | length


class _Context:
    """What the model sees of each row, seq[b, starts[b]:length], and the logits of its last position.

    Rows are left-padded to one width; a row's visible window depends on its own tokens only, so
    a prompt gets the same completion alone or in any batch.
    """

    def __init__(
        self, model: GPT, prompts: list[list[int]], max_new_tokens: int, pad_id: int, use_cache: bool
    ):
        self.model, self.use_cache = model, use_cache
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        width = max(len(x) for x in prompts)
        self.seq = torch.full(
            (len(prompts), width + max_new_tokens), pad_id, dtype=torch.long, device=self.device
        )
        for b, ids in enumerate(prompts):
            self.seq[b, width - len(ids) : width] = torch.tensor(ids, device=self.device)
        self.starts = [width - len(x) for x in prompts]  # the first visible slot of each row
        self.length = width
        window = model.cfg.max_seq_len
        self.window, self.keep = window, window - window // 4
        self.cache: KVCache | None = None

    def logits(self) -> Tensor:
        """[B, V] logits of the last position, computing only what the cache does not hold."""
        if not self.use_cache:
            return self._recompute()
        if self.cache is None:  # (re)fill the cache with every row's visible tokens
            first = min(self.starts)
            pad = torch.tensor([s - first for s in self.starts], device=self.device)
            self.cache = KVCache(self.model.cfg, len(self.seq), device=self.device, dtype=self.dtype, pad=pad)
            return self.model(self.seq[:, first : self.length], cache=self.cache)[0][:, -1]
        return self.model(self.seq[:, self.length - 1 : self.length], cache=self.cache)[0][:, -1]

    def _recompute(self) -> Tensor:
        """The plain training forward over each row's visible tokens (each row alone: no padding)."""
        rows = [self.model(self.seq[b : b + 1, s : self.length])[0][0, -1] for b, s in enumerate(self.starts)]
        return torch.stack(rows)

    def append(self, ids: Tensor) -> None:
        self.seq[:, self.length] = ids
        self.length += 1
        for b, start in enumerate(self.starts):
            if self.length - start > self.window:  # this row outgrew the window: keep its last 3/4
                self.starts[b], self.cache = self.length - self.keep, None


@torch.inference_mode()
def _on_whole_weights(fn: Callable[..., list[Completion]]) -> Callable[..., list[Completion]]:
    """Decoding reads weights directly (``pos_emb.weight[positions]``), but a ZeRO-3 model holds a
    partition of each (and its DeepSpeed hooks gather per module): decode a whole copy, gathered
    once (every rank of the group must make the call)."""

    @functools.wraps(fn)
    def on_whole(model: GPT, *args, **kwargs) -> list[Completion]:
        params = list(model.parameters())
        if not any(hasattr(p, "ds_id") for p in params):
            return fn(model, *args, **kwargs)
        import deepspeed

        with torch.random.fork_rng(devices=[]):  # its init draws must not move the caller's generator
            whole = GPT(model.cfg)
        with deepspeed.zero.GatheredParameters(params):
            whole.load_state_dict(model.state_dict())
        whole.to(device=params[0].device, dtype=params[0].dtype).train(model.training)
        return fn(whole, *args, **kwargs)

    return on_whole


@_on_whole_weights
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    vocab_size: int,
    eot_id: int | None = None,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[Completion]:
    """Continue each prompt (token ids, 1..max_seq_len long) by up to ``max_new_tokens`` ids.

    Ids >= ``vocab_size`` (the embedding's padding rows) are never produced. A row ends at
    ``eot_id`` (not included; None: never) or when ``should_stop(row, ids)`` says so.
    ``on_token(row, id)`` sees each id as it comes (but the one completing a stop). Finished
    rows ride along until all are done. The same prompts, settings and ``seed`` give the same completions.
    A ZeRO-3 model (e.g. ``engine.module``) is decoded from a whole copy, gathered on every rank.
    """
    if not prompts or any(not 0 < len(p) <= model.cfg.max_seq_len for p in prompts):
        raise ValueError(f"every prompt needs 1 to model.max_seq_len={model.cfg.max_seq_len} tokens")
    ctx = _Context(model, prompts, max_new_tokens, eot_id if eot_id is not None else 0, use_cache)
    generator = torch.Generator(ctx.device).manual_seed(seed)
    out: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    for step in range(max_new_tokens):
        ids = sample_next(
            ctx.logits()[:, :vocab_size],
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
        for b, token in enumerate(ids.tolist()):
            if reasons[b] is not None:
                continue
            if token == eot_id:
                reasons[b] = "eot"
                continue
            out[b].append(token)
            if should_stop is not None and should_stop(b, out[b]):
                reasons[b] = "stop"  # the caller trims the stop text; on_token never sees it
                continue
            if on_token is not None:
                on_token(b, token)
        if all(r is not None for r in reasons) or step == max_new_tokens - 1:
            break
        ctx.append(ids)
    return [Completion(ids, reason or "length") for ids, reason in zip(out, reasons)]


# ---------------------------------------------------------------------------- prompts and text


def read_prompts(cfg: GenerateConfig) -> list[str]:
    if cfg.prompt is not None:
        return [cfg.prompt]
    path = Path(cfg.prompt_file)  # type: ignore[arg-type]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"prompt_file={path}: cannot read it ({e}): give a UTF-8 text file") from None
    if not lines:
        raise ConfigError(f"prompt_file={path} is empty: write one prompt per line")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            raise ConfigError(f"prompt_file={path}: line {i} is an empty prompt: remove it or give it text")
    return lines


def encode_prompt(tok: Tokenizer, text: str, cfg: GenerateConfig, max_len: int, index: int) -> list[int]:
    """Prompt ids (after an end-of-text, as every training document starts), fitted to the window."""
    ids = ([tok.eot_id] if cfg.prepend_eot else []) + tok.encode(text)
    if len(ids) > max_len:
        where = "prompt" if cfg.prompt is not None else f"prompt_file line {index + 1}"
        if cfg.prompt_overflow == "error":
            raise ConfigError(
                f"{where} has {len(ids)} tokens, more than model.max_seq_len={max_len}: shorten it, or set "
                "prompt_overflow=truncate to keep its end"
            )
        log.warning(
            "%s has %d tokens, more than model.max_seq_len=%d: keeping its last %d",
            where,
            len(ids),
            max_len,
            max_len,
        )
        ids = ids[-max_len:]
    return ids


class StopStrings:
    """Row ``b`` stops once its text contains one of ``stops``; ``cut`` trims a text before it."""

    def __init__(self, tok: Tokenizer, stops: list[str]):
        self.tok, self.stops = tok, stops
        # ids to decode: every id is at least one byte of text, so a stop's UTF-8 bytes (+ 8 for a
        # character cut at the start) bound how many ids it can span
        self.tail = max((len(s.encode("utf-8")) for s in stops), default=0) + 8

    def __call__(self, row: int, ids: list[int]) -> bool:
        text = self.tok.decode(ids[-self.tail :])
        return any(s in text for s in self.stops)

    def cut(self, text: str) -> str:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[: min(found)] if found else text


class Streamer:
    """Prints a single completion as it grows, holding back what may be part of a stop string or
    of a multi-byte character."""

    def __init__(self, tok: Tokenizer, holdback: int):
        self.tok, self.holdback, self.ids, self.printed = tok, holdback, [], 0

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        safe = len(text) - self.holdback - int(text.endswith("\ufffd"))
        if safe > self.printed:
            sys.stdout.write(text[self.printed : safe])
            sys.stdout.flush()
            self.printed = safe

    def finish(self, text: str) -> None:
        sys.stdout.write(text[self.printed :] + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------- the command


def run(cfg: GenerateConfig) -> list[dict]:
    """Generate for every prompt of ``cfg``; prints the texts and returns one record per prompt."""
    from trainer.inference import DTYPES, load_model

    device = _device(cfg.device)
    loaded = load_model(cfg.checkpoint, tokenizer=cfg.tokenizer, device=device, dtype=DTYPES[cfg.dtype])
    tok, max_len = loaded.tokenizer, loaded.cfg.max_seq_len
    texts = read_prompts(cfg)
    prompts = [encode_prompt(tok, t, cfg, max_len, i) for i, t in enumerate(texts)]
    stops = StopStrings(tok, list(cfg.stop)) if cfg.stop else None
    holdback = max((len(s) for s in cfg.stop), default=1) - 1  # a stop string may be coming
    streamer = Streamer(tok, holdback) if cfg.stream and len(texts) == 1 else None
    records, t0, new_tokens = [], time.perf_counter(), 0
    for first in range(0, len(prompts), cfg.batch_size):
        batch = prompts[first : first + cfg.batch_size]
        if streamer is not None:
            sys.stdout.write(texts[0])
        completions = generate(
            loaded.model,
            batch,
            cfg.max_new_tokens,
            vocab_size=tok.vocab_size,
            eot_id=tok.eot_id if cfg.stop_at_eot else None,
            greedy=cfg.greedy,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=cfg.seed + first,  # each batch its own stream, the same on every run
            use_cache=cfg.use_cache,
            should_stop=stops,
            on_token=streamer,
        )
        for i, c in enumerate(completions):
            text = tok.decode(c.ids)
            text = stops.cut(text) if stops is not None and c.finish_reason == "stop" else text
            record = {"prompt": texts[first + i], "completion": text, "tokens": len(c.ids)}
            records.append(record | {"finish_reason": c.finish_reason})
            new_tokens += len(c.ids)
            if streamer is not None:
                streamer.finish(text)
            else:
                print(f"--- {first + i + 1}/{len(texts)}\n{texts[first + i]}{text}", flush=True)
    seconds = time.perf_counter() - t0
    log.info("%d new tokens in %.2f s (%.1f tokens/s)", new_tokens, seconds, new_tokens / max(seconds, 1e-9))
    if cfg.output:
        Path(cfg.output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no GPU is visible: use device=cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name} is not a device: use auto, cpu, cuda or cuda:<i>") from None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="generate")
def _hydra_main(cfg: DictConfig) -> None:
    from trainer.inference import InferenceError
    from trainer.metrics import setup_console_logging

    setup_console_logging(int(os.environ.get("RANK", "0")))
    with one_line_errors(InferenceError):
        run(typed(cfg, GenerateConfig))


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
