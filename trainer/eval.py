"""Entry point: ``python -m trainer.eval checkpoint=<dir> [data=<dataset dir>] [batches=N]``.

Loads a checkpoint of any ZeRO stage, or an exported directory, on any number of ranks (plain or
under torchrun: each rank takes its slice of every global batch, as in training), streams a
split of a prepared dataset, and reports loss, perplexity, bits per byte and token count: on
the console, as JSON in ``output_dir``, and to W&B when ``logger`` is on. The numbers come from
:func:`trainer.evaluate.evaluate`, the function behind the trainer's own validation.
Bad input ends with one line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from trainer.cli import one_line_errors
from trainer.config import ConfigError, EvalConfig, register_configs
from trainer.train import config_dir as train_config_dir

log = logging.getLogger("trainer")


def config_dir() -> str:
    """configs/inference: its own search path, where checkpoint= and data= are not config groups."""
    return str(Path(train_config_dir()) / "inference")


def typed(cfg: DictConfig, schema: type) -> Any:
    """DictConfig -> the schema's dataclass; every ``__post_init__`` check runs here."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # drop Hydra's own node
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    assert isinstance(obj, schema)
    return obj


def eval_data(cfg: EvalConfig, run_config: dict[str, Any] | None, local_rank: int) -> dict[str, Any]:
    """ShardLoader arguments: ``data``, or else the run's own dataset(s) read as its validation reads them.

    The built-in corpus is prepared again if it is missing.
    """
    if cfg.data is not None:
        return {"dataset": Path(cfg.data)}
    if run_config is None:
        raise ConfigError("data is not set: an exported model needs data=<prepared dataset dir>")
    data = run_config["data"]
    if data.get("builtin") and not (Path(data["path"]) / "manifest.json").is_file():
        from trainer.data.prepare import prepare_builtin
        from trainer.distributed import barrier

        if local_rank == 0:
            prepare_builtin(Path(data["path"]), seq_len=data["seq_len"])
        barrier()
    sources = [(s["path"], s.get("weight", 1.0)) for s in data.get("sources") or []]
    return {
        "dataset": Path(data["path"]) if data.get("path") else sources,
        "seed": data.get("seed", 0),
        "shuffle_window": data.get("shuffle_window", 4),
        "on_corrupt": data.get("on_corrupt", "error"),
    }


def batch_sizes(cfg: EvalConfig, run_config: dict[str, Any] | None, world: int) -> tuple[int, int]:
    """(global, micro) batch sizes: given, else the run's, else 8 and the whole per-rank slice
    (as the run's micro_batch_size=auto)."""
    run = run_config or {}
    gbs = cfg.global_batch_size or run.get("global_batch_size") or 8
    run_micro = run.get("micro_batch_size")
    micro = cfg.micro_batch_size or (run_micro if isinstance(run_micro, int) else 0) or max(gbs // world, 1)
    if gbs % (micro * world):
        raise ConfigError(
            f"global_batch_size={gbs} is not divisible by micro_batch_size={micro} x world size {world}: "
            "change global_batch_size or micro_batch_size (every micro-batch must hold as many tokens)"
        )
    return gbs, micro


def evaluate_checkpoint(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` on every rank; returns the report (rank 0 also writes it)."""
    from trainer.data.loader import ShardLoader, load_manifest
    from trainer.evaluate import evaluate, token_byte_lengths
    from trainer.inference import DTYPES, InferenceError, load_model
    from trainer.metrics import start_wandb

    dist = _init_distributed()
    t0 = time.perf_counter()
    loaded = load_model(cfg.checkpoint, tokenizer=cfg.tokenizer, device=dist.device, dtype=DTYPES[cfg.dtype])
    src = loaded.source
    data = eval_data(cfg, src.run_config, dist.local_rank)
    path = data["dataset"] if isinstance(data["dataset"], Path) else Path(data["dataset"][0][0])
    manifest = load_manifest(path)
    if manifest["tokenizer"].get("identity") != loaded.tokenizer.identity():
        raise InferenceError(
            f"data={path} was tokenized with another tokenizer ({manifest['tokenizer']['kind']}, "
            f"{manifest['tokenizer']['vocab_size']} ids) than the model's ({loaded.tokenizer.kind}, "
            f"{loaded.tokenizer.vocab_size} ids): evaluate on data prepared with the model's tokenizer"
        )
    if manifest["seq_len"] > loaded.cfg.max_seq_len:
        raise ConfigError(
            f"data={path} holds samples of {manifest['seq_len']} tokens, longer than the model's "
            f"max_seq_len={loaded.cfg.max_seq_len}: prepare the data with a smaller seq_len"
        )
    gbs, micro = batch_sizes(cfg, src.run_config, dist.world_size)
    # manifest order, as the trainer's validation reads it (a train split is read unshuffled too)
    loader = ShardLoader(
        split=cfg.split,
        global_batch_size=gbs,
        rank=dist.rank,
        world_size=dist.world_size,
        infinite=False,
        shuffle=False,
        **data,
    )
    result = evaluate(
        loaded.model, loader, micro, cfg.batches, dist.device, token_byte_lengths(loaded.tokenizer)
    )
    report = {
        "checkpoint": str(src.path),
        "step": src.step,
        "data": str(path) if isinstance(data["dataset"], Path) else [str(p) for p, _ in data["dataset"]],
        "split": cfg.split,
        **result.to_dict(),
        "global_batch_size": gbs,
        "micro_batch_size": micro,
        "world_size": dist.world_size,
        "dtype": cfg.dtype,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if dist.is_main:
        out = write_report(cfg, src.path, src.kind, report)
        print(summary_line(report), flush=True)
        log.info("wrote %s", out)
        run = start_wandb(cfg.logger, f"eval-{src.path.name}", out.parent, report, None)
        if run is not None:
            run.log({f"eval/{k}": v for k, v in report.items() if isinstance(v, (int, float))})
            run.finish()
    return report


def write_report(cfg: EvalConfig, source: Path, kind: str, report: dict[str, Any]) -> Path:
    """``<output_dir>/<split>-step-<N>.json``; output_dir defaults to <run_dir>/eval or <export>/eval."""
    default = source.parent.parent / "eval" if kind == "checkpoint" else source / "eval"
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{cfg.split}-step-{report['step']}.json" if report["step"] is not None else f"{cfg.split}.json"
    path = out_dir / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def summary_line(r: dict[str, Any]) -> str:
    bpb = f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "n/a"
    return (
        f"eval  step {r['step']} | {r['split']} | loss {r['loss']:.4f} | ppl {r['perplexity']:.2f} | "
        f"bpb {bpb} | {r['tokens']:,} tokens in {r['batches']} batches"
    )


def _init_distributed():
    """Join torchrun's process group when there is one; a lone process needs none."""
    from trainer.distributed import DistInfo, init_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return DistInfo(0, 1, 0, device)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    from trainer.inference import InferenceError
    from trainer.metrics import setup_console_logging

    setup_console_logging(int(os.environ.get("RANK", "0")))
    try:
        with one_line_errors(InferenceError):
            evaluate_checkpoint(typed(cfg, EvalConfig))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
