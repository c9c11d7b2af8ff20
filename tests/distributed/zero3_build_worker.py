"""Run under torchrun: ZeRO-3's partitioned build, its memory and its initial weights.

    torchrun ... tests/distributed/zero3_build_worker.py <out_dir>

Each rank writes ``<out_dir>/rank<r>.json``:
- memory: the resident memory after importing torch and DeepSpeed and joining the group
  (``baseline``), then the high-water mark after building a ~4M-parameter model under ZeRO-3
  with its engine and taking two optimizer steps (``peak``), with what the bound needs;
- generation: greedy tokens of the trained partitioned model equal those of its gathered weights;
- weights: for a GPT-2-style and a Llama-style tiny config, whether the gathered initial weights
  of the partitioned build equal ``GPT(cfg)`` built whole for the same seed, bit for bit, and
  whether the CPU generator is left in the same state.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch

from trainer import hostmem
from trainer.config import EngineConfig, ModelConfig, OptimConfig
from trainer.distributed import init_distributed
from trainer.engine import build_engine, build_model, deepspeed_config
from trainer.generate import generate
from trainer.model import GPT, num_params
from trainer.perf import peak_rss_gb

MEMORY_MODEL = ModelConfig(n_layer=4, n_head=4, d_model=256, vocab_size=4096, max_seq_len=64)  # 4.3M
SMALL_MODEL = ModelConfig(n_layer=1, n_head=2, d_model=32, vocab_size=256, max_seq_len=64)  # 25K
ARCHS = {
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True),
    "llama": dict(n_kv_head=2, tie_embeddings=False),
}


def zero3_config(model: ModelConfig, world: int) -> dict:
    return deepspeed_config(EngineConfig(zero_stage=3), OptimConfig(), micro_batch_size=2, grad_accum_steps=1,
                            world_size=world, total_steps=10, model=model)  # fmt: skip


def train_briefly(cfg: ModelConfig, world: int):
    """Build under ZeRO-3 as the trainer does, then two optimizer steps on random tokens."""
    torch.manual_seed(0)
    ds = zero3_config(cfg, world)
    engine = build_engine(build_model(cfg, ds), ds, OptimConfig(), total_steps=10)
    hostmem.trim()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len + 1))
    for _ in range(2):
        _, loss = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(loss)
        engine.step()
    return engine


def memory(world: int) -> dict:
    """Peak growth of a ZeRO-3 run of MEMORY_MODEL over one of a model ~100x smaller, which takes
    the costs that do not grow with the model (DeepSpeed's lazy imports and setup, gloo buffers)."""
    # The threshold the trainer uses for wide models, whose tensors are all far above it. This
    # model stands in for one at small scale; with the narrow models' 4 MiB its 1 MiB tensors stay
    # in the heap once freed, and the peak measures the heap's retention (90-99 MiB, not 57).
    hostmem.release_large_frees(hostmem.WIDE_MMAP_THRESHOLD)
    baseline = peak_rss_gb()
    train_briefly(SMALL_MODEL, world)
    fixed = peak_rss_gb()
    engine = train_briefly(MEMORY_MODEL, world)
    peak = peak_rss_gb()
    return {"baseline_gb": baseline, "fixed_gb": fixed, "peak_gb": peak,
            "params": num_params(MEMORY_MODEL) - num_params(SMALL_MODEL),
            "generates_as_whole": generates_as_whole(engine.module)}  # fmt: skip


def generates_as_whole(module: GPT) -> bool:
    """Greedy decoding of the trained, partitioned model equals that of its gathered weights in a
    whole GPT (generate gathers a ZeRO-3 model itself)."""
    prompts = [[1, 2, 3], [7]]
    got = generate(module.eval(), prompts, 6, vocab_size=module.cfg.vocab_size, greedy=True)
    whole = GPT(module.cfg)
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        whole.load_state_dict(module.state_dict())
    want = generate(whole.eval(), prompts, 6, vocab_size=module.cfg.vocab_size, greedy=True)
    return [c.ids for c in got] == [c.ids for c in want] and len(got[0].ids) == 6


def same_initial_weights(arch: dict, world: int) -> dict:
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=300, max_seq_len=32, **arch)
    torch.manual_seed(1234)
    model = build_model(cfg, zero3_config(cfg, world))
    after_partitioned = torch.rand(4)
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        got = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1234)
    whole = GPT(cfg)
    after_whole = torch.rand(4)
    want = whole.state_dict()
    return {
        "partitioned": len(partitioned) == len(list(whole.parameters())),
        "same_keys": list(got) == list(want),
        "differ": [k for k in want if not torch.equal(got[k], want[k])],
        "same_rng_after": torch.equal(after_partitioned, after_whole),
    }


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist = init_distributed()
    result = {"memory": memory(dist.world_size)}  # first: the peak is this process's high-water mark
    result["weights"] = {name: same_initial_weights(arch, dist.world_size) for name, arch in ARCHS.items()}
    (out_dir / f"rank{dist.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
