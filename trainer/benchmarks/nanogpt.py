"""Benchmark: the trainer against nanoGPT on nanoGPT's own CPU recipe.

    python -m trainer.benchmarks.nanogpt [--iters 2000] [--compile] [--precision bf16] [--ceiling]
                                         [--data DIR]

The recipe is nanoGPT's README CPU run of ``train_shakespeare_char`` (``--device=cpu
--compile=False --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``): character tokens, 4 layers x 4 heads x
128, LayerNorm without bias, GELU, learned positions, tied embeddings; AdamW lr 1e-3, betas
0.9/0.99, weight decay 0.1, clipping at 1, warmup 100, cosine to 1e-4 at the last iteration.

The reference is a plain loop equivalent to nanoGPT's model.py and train.py, written out below
(a benchmark cannot download nanoGPT): its model (fused c_attn, scaled_dot_product_attention,
GPT-2 init), its optimizer groups (decay on every matrix, embeddings included) and its step
(random windows of the train tokens, loss.item() every iteration as with log_interval=1). The
trainer runs as a user runs it (``python -m trainer.train``, engine=zero0, one rank), with the
same shape and schedule, on the same character dataset (the project's generated corpus, char
tokenizer, prepared once into ``--data``). Both use torch's default threads; neither saves
checkpoints while it trains (the reference has none to save).

``--precision bf16`` trains ours in bf16 (``engine.precision=bf16``: DeepSpeed's bf16 weights with
fp32 master weights; attention in fp32 on the CPU, ``trainer.model.attend``) against the same fp32
reference: nanoGPT itself runs fp32 on a CPU whatever its ``--dtype`` (its autocast is for CUDA).

``--ceiling`` runs the reference a second time with torch's fused AdamW kernel and the model
compiled: what a hand-written fp32 loop of the same model reaches on this machine, against which
an fp32 trainer's ratio can be read (2026-12-03, 2 cores, three runs: 0.978-1.139 of nanoGPT's loop).

Printed: each side's training tokens/s (the reference's after 10 iterations, ours from its train
events after the first log window, so compilation and warm-up count in neither; the wall time
of each run is printed too), their ratio (target >= 1.15), and the validation loss of both
models on the same validation rows (target: ours the same or lower).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import DataConfig
from trainer.data.build import build_data
from trainer.evaluate import evaluate

BLOCK, BATCH, LAYERS, HEADS, EMBD = 64, 12, 4, 4, 128
LR, MIN_LR, WARMUP, BETAS, WD, CLIP = 1e-3, 1e-4, 100, (0.9, 0.99), 0.1, 1.0
EVAL_BATCHES = 50  # global batches of BATCH validation rows, the same rows for both models

# ---------------------------------------------------------------------------- nanoGPT's model, written out


class LayerNorm(nn.Module):
    def __init__(self, ndim: int) -> None:  # bias=False, as the recipe
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(EMBD, 3 * EMBD, bias=False)
        self.c_proj = nn.Linear(EMBD, EMBD, bias=False)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(EMBD, dim=2)
        k = k.view(B, T, HEADS, C // HEADS).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        v = v.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = nn.Linear(EMBD, 4 * EMBD, bias=False)
        self.c_proj = nn.Linear(4 * EMBD, EMBD, bias=False)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = (
            LayerNorm(EMBD),
            CausalSelfAttention(),
            LayerNorm(EMBD),
            MLP(),
        )

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, EMBD), nn.Embedding(BLOCK, EMBD)
        self.h = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = LayerNorm(EMBD)
        self.lm_head = nn.Linear(EMBD, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * LAYERS))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, fused: bool = False):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        nodecay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": WD}, {"params": nodecay, "weight_decay": 0.0}]
        # nanoGPT asks for the fused kernel only on CUDA; ``fused`` is the ceiling's (see main)
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS, **({"fused": True} if fused else {}))


def nanogpt_lr(it: int, iters: int) -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > iters:
        return MIN_LR
    ratio = (it - WARMUP) / (iters - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def train_reference(
    train_tokens: torch.Tensor, vocab: int, iters: int, seed: int, fast: bool = False
) -> tuple[NanoGPT, float, float]:
    """nanoGPT's loop; returns (model, training tokens/s after 10 iterations, wall seconds).
    ``fast``: the same loop with torch's fused AdamW kernel and the model compiled."""
    torch.manual_seed(seed)
    model = NanoGPT(vocab)
    opt = model.configure_optimizers(fused=fast)
    model = torch.compile(model) if fast else model
    start_wall = time.perf_counter()
    for it in range(iters):
        if it == 10:
            start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = nanogpt_lr(it, iters)
        ix = torch.randint(len(train_tokens) - BLOCK, (BATCH,))
        x = torch.stack([train_tokens[i : i + BLOCK] for i in ix]).long()
        y = torch.stack([train_tokens[i + 1 : i + 1 + BLOCK] for i in ix]).long()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # log_interval=1
    end = time.perf_counter()
    return model, (iters - 10) * BATCH * BLOCK / (end - start), end - start_wall


# ---------------------------------------------------------------------------- the data and our trainer


def char_dataset(out_dir: Path) -> Path:
    """The project's generated corpus, character-tokenized into samples of 64 + 1 (once)."""
    from trainer.data.corpus import write_builtin_corpus
    from trainer.data.prepare import prepare_dataset

    if not (out_dir / "manifest.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            corpus = write_builtin_corpus(Path(tmp) / "corpus.jsonl")
            prepare_dataset([corpus], out_dir, seq_len=BLOCK, tokenizer="char", val_fraction=0.05)
    return out_dir


def train_ours(
    data_dir: Path, iters: int, compile_model: bool, precision: str, run_dir: Path
) -> tuple[float, float, float]:
    """`python -m trainer.train` on the recipe; returns (training tokens/s, val loss, wall seconds)."""
    log_every = max(1, min(100, iters // 10))
    overrides = [
        "data=prepared", f"data.path={data_dir}", f"data.seq_len={BLOCK}",
        f"model.n_layer={LAYERS}", f"model.n_head={HEADS}", f"model.d_model={EMBD}",
        f"model.max_seq_len={BLOCK}", "model.pos_emb=learned", "model.norm=layernorm", "model.mlp=gelu",
        "model.bias=false", "model.tie_embeddings=true", "model.dropout=0.0",
        f"model.compile={str(compile_model).lower()}",
        f"optim.lr={LR}", f"optim.betas=[{BETAS[0]},{BETAS[1]}]", f"optim.weight_decay={WD}",
        f"optim.warmup_steps={WARMUP}", f"optim.min_lr_ratio={MIN_LR / LR}", f"optim.grad_clip={CLIP}",
        "engine=zero0", f"engine.precision={precision}",
        f"global_batch_size={BATCH}", f"micro_batch_size={BATCH}", f"max_steps={iters}",
        f"log_every={log_every}", f"eval_every={iters}", f"eval_batches={EVAL_BATCHES}",
        "checkpoint.save_final=false", "checkpoint.every_steps=0", "checkpoint.resume=none",
        f"run_dir={run_dir}", "name=nanogpt-recipe",
    ]  # fmt: skip
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", *overrides], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"error: the trainer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"][1:]  # the first window holds warm-up/compile
    seconds = sum(e["step_time_s"] * log_every for e in train)
    (val,) = [e["val_loss"] for e in events if e["event"] == "eval"]
    return len(train) * log_every * BATCH * BLOCK / seconds, val, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=2000, help="training iterations of each (the recipe: 2000)")
    p.add_argument("--compile", action="store_true", help="ours with model.compile=true")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="ours (the reference: fp32)")
    p.add_argument(
        "--data", type=Path, default=Path(os.environ.get("TRAINER_DATA_DIR", "data")) / "char-seq64"
    )
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="also run the reference with fused AdamW and compiled: the fastest fp32 loop written by hand",
    )
    args = p.parse_args()
    if args.iters <= max(WARMUP, 20):
        sys.exit(f"error: --iters={args.iters} must exceed the warmup ({WARMUP}): raise --iters")
    data_dir = char_dataset(args.data.resolve())
    data = build_data(DataConfig(path=str(data_dir), seq_len=BLOCK), BATCH, 0, 1, 0, lambda: None)
    # nanoGPT's train.bin: the train split's tokens, one epoch in the loader's order (its windows are random)
    rows = [b["tokens"] for _, b in zip(range(len(data.train)), iter(data.train))]
    train_tokens = torch.cat([r[:, :-1].reshape(-1) for r in rows])

    ref, ref_tps, ref_wall = train_reference(train_tokens, data.vocab_size, args.iters, args.seed)
    ref_val = evaluate(ref, data.val, BATCH, EVAL_BATCHES, torch.device("cpu")).loss
    with tempfile.TemporaryDirectory() as tmp:
        ours_tps, ours_val, ours_wall = train_ours(
            data_dir, args.iters, args.compile, args.precision, Path(tmp) / "run"
        )

    print(
        f"nanoGPT recipe: {LAYERS} layers x {HEADS} heads x {EMBD}, block {BLOCK}, batch {BATCH}, "
        f"char vocab {data.vocab_size}, {args.iters} iters, {torch.get_num_threads()} threads"
    )
    print(f"nanoGPT (plain loop): {ref_tps:10,.0f} tokens/s | val loss {ref_val:.4f} | {ref_wall:.1f} s")
    how = (" compiled" if args.compile else "") + (" bf16" if args.precision == "bf16" else "")
    print(
        f"trainer{how:<13}: {ours_tps:10,.0f} tokens/s | val loss {ours_val:.4f} | {ours_wall:.1f} s in all"
    )
    print(
        f"ratio trainer/nanoGPT: {ours_tps / ref_tps:.3f} (target >= 1.15); "
        f"val loss {ours_val - ref_val:+.4f} (target <= 0)"
    )
    if args.ceiling:  # after ours, so the three runs see the same machine in turn
        _, fast_tps, fast_wall = train_reference(
            train_tokens, data.vocab_size, args.iters, args.seed, fast=True
        )
        print(
            f"plain loop, fused AdamW + compiled: {fast_tps:10,.0f} tokens/s | {fast_wall:.1f} s | "
            f"{fast_tps / ref_tps:.3f} of nanoGPT (the ceiling of an fp32 step of this model here)"
        )


if __name__ == "__main__":
    main()
