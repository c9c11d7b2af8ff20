"""Benchmark: decode tokens/s with and without the KV cache, next to transformers' ``generate``.

    python -m trainer.benchmarks.decode [--model tiny] [--new-tokens 256] [--prompt-tokens 16]
                                        [--repeats 3] [--dtype fp32] [--threads 1] [--no-hf]

The model is a configs/model preset (randomly initialized: speed does not depend on the
weights) with the byte tokenizer's vocabulary; its max_seq_len is raised to fit prompt + new
tokens if needed (RoPE has no learned table, so the parameter count stays the same). Each
variant generates exactly ``--new-tokens`` greedy tokens for one prompt (end-of-text ignored):
ours with the cache, ours recomputing the whole context every step, and, when transformers is
installed, the exported model's ``generate`` (its own KV cache, same dtype and threads). The
variants alternate, ``--repeats`` times each after a discarded warm-up round; the figures are
medians (and each variant's best run, for a busy machine). The ``cpu_`` figures divide by the
process's CPU time instead of wall-clock time: on a shared machine they leave out the time other
jobs hold the cores, and at one thread they equal the wall-clock figures on an idle machine.
Targets: cache / no cache >= 5x; ours / transformers >= 1x. Decoding one sequence is
latency-bound (hundreds of tiny ops per token), so ``--threads`` defaults to 1: on a shared
2-core machine more intra-op threads make every variant slower and the figures erratic. All
variants run under the same setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from trainer.config import ModelConfig
from trainer.data.tokenizer import ByteTokenizer
from trainer.generate import generate
from trainer.inference import DTYPES, Source
from trainer.model import GPT, num_params
from trainer.train import config_dir


def build_model(preset: str, min_seq_len: int, dtype: torch.dtype) -> GPT:
    section = yaml.safe_load((Path(config_dir()) / "model" / f"{preset}.yaml").read_text())
    cfg = ModelConfig(**section, vocab_size=ByteTokenizer().vocab_size)
    if cfg.max_seq_len < min_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=min_seq_len)
    torch.manual_seed(0)
    return GPT(cfg).to(dtype).eval()


def ours(model: GPT, prompt: list[int], new_tokens: int, use_cache: bool) -> Callable[[], list[int]]:
    def run() -> list[int]:
        (c,) = generate(
            model, [prompt], new_tokens, vocab_size=model.cfg.vocab_size, greedy=True, use_cache=use_cache
        )
        return c.ids

    return run


def transformers_generate(model: GPT, prompt: list[int], new_tokens: int, dtype: str, tmp: Path):
    """The same weights exported and loaded with AutoModelForCausalLM; None without transformers."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    from trainer.export import write_model

    sd = {k: v.float() for k, v in model.state_dict().items()}
    write_model(Source(tmp, "export", model.cfg, sd, ByteTokenizer(), None, None), tmp, dtype)
    hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=DTYPES[dtype]).eval()
    x = torch.tensor([prompt])

    def run() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # no early stop at end-of-text, like ours here
                do_sample=False,
                use_cache=True,
                eos_token_id=None,
            )
        return out[0, len(prompt) :].tolist()

    return run


def measure(
    variants: dict[str, Callable[[], list[int]]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and CPU seconds of each repeat per variant; the variants alternate so machine
    noise hits all alike."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if round_ > 0:  # round 0 warms up allocators and caches
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return wall, cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m trainer.benchmarks.decode", description=__doc__)
    parser.add_argument("--model", default="tiny", help="a configs/model preset (default: tiny)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build_model(args.model, args.prompt_tokens + args.new_tokens, DTYPES[args.dtype])
    prompt = list(range(65, 65 + args.prompt_tokens))  # "ABC..."
    variants = {
        "cache": ours(model, prompt, args.new_tokens, use_cache=True),
        "no_cache": ours(model, prompt, args.new_tokens, use_cache=False),
    }
    with tempfile.TemporaryDirectory() as tmp:
        hf = (
            None
            if args.no_hf
            else transformers_generate(model, prompt, args.new_tokens, args.dtype, Path(tmp))
        )
        if hf is not None:
            variants["transformers"] = hf
        same = {name: fn() == variants["cache"]() for name, fn in variants.items()}
        seconds, cpu_seconds = measure(variants, args.repeats)
    rate = {name: args.new_tokens / statistics.median(s) for name, s in seconds.items()}
    best = {name: args.new_tokens / min(s) for name, s in seconds.items()}  # the least disturbed run
    cpu_rate = {name: args.new_tokens / statistics.median(s) for name, s in cpu_seconds.items()}
    report = {
        "model": args.model,
        "params": num_params(model.cfg),
        "max_seq_len": model.cfg.max_seq_len,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "best_tokens_per_s": {k: round(v, 1) for k, v in best.items()},
        "cpu_tokens_per_s": {k: round(v, 1) for k, v in cpu_rate.items()},
        "cache_speedup": round(rate["cache"] / rate["no_cache"], 2),
        "cpu_cache_speedup": round(cpu_rate["cache"] / cpu_rate["no_cache"], 2),
        "same_tokens_as_cache": same,
    }
    if "transformers" in rate:
        report["ours_vs_transformers"] = round(rate["cache"] / rate["transformers"], 2)
        report["cpu_ours_vs_transformers"] = round(cpu_rate["cache"] / cpu_rate["transformers"], 2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
