"""Run under torchrun: train through the trainer's own build/fit, then record what each rank holds.

    torchrun ... tests/distributed/agree_worker.py <out_dir> [hydra overrides]

Every rank writes ``<out_dir>/rank<r>.json`` with a fingerprint of the full weights (gathered
under ZeRO-3) and the loss its model gives on one fixed batch, so the test can check that the
ranks agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trainer.data import to_device
from trainer.distributed import init_distributed
from trainer.loop import build_run, fit
from trainer.metrics import MetricsSink
from trainer.signals import StopSignal
from trainer.train import load_config


def weights_fingerprint(engine) -> list[float]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return [float(p.detach().double().sum()) for p in params] + [
            float(p.detach().double().abs().sum()) for p in params
        ]


def main() -> None:
    out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(overrides)
    dist = init_distributed()
    run = build_run(cfg, dist)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    fit(run, MetricsSink(Path(cfg.run_dir) if dist.is_main else None), StopSignal().install())

    batch = next(iter(run.data.val))  # this rank's slice; every rank scores rank 0's slice below
    tokens = batch["tokens"]  # [G/W, T + 1], contiguous: one broadcast, then inputs and labels
    torch.distributed.broadcast(tokens, src=0)
    x, y = to_device(tokens[: run.cfg.micro_batch_size], dist.device)
    run.engine.eval()
    with torch.no_grad():
        _, loss = run.engine(x, y)
    result = {"fingerprint": weights_fingerprint(run.engine), "loss": loss.item(), "step": run.state.step}
    (out_dir / f"rank{dist.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
