"""What the run reports and where it goes: console progress, metrics.jsonl and W&B (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import LoggerConfig

log = logging.getLogger("trainer")


@dataclass
class Throughput:
    """Tokens/s and data-wait over the window since the last log, and the run's ETA."""

    tokens_per_step: int
    window_start: float = field(default_factory=time.perf_counter)
    window_steps: int = 0
    data_wait: float = 0.0

    def step(self, data_wait_s: float) -> None:
        self.window_steps += 1
        self.data_wait += data_wait_s

    def report(self, steps_left: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        step_time = elapsed / max(self.window_steps, 1)
        out = {
            "tokens_per_s": self.window_steps * self.tokens_per_step / elapsed,
            "step_time_s": step_time,
            "data_wait_frac": self.data_wait / elapsed,
            "eta_s": steps_left * step_time,
        }
        self.window_start, self.window_steps, self.data_wait = time.perf_counter(), 0, 0.0
        return out


class MetricsSink:
    """Rank 0 writes every event to metrics.jsonl, the console and (optionally) W&B.

    Other ranks get a sink that drops events, so call sites need no rank checks.
    """

    def __init__(self, run_dir: Path | None, wandb_run: Any = None) -> None:
        self._file = open(run_dir / "metrics.jsonl", "a") if run_dir is not None else None  # noqa: SIM115
        self._wandb = wandb_run

    def log(self, event: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()
        print(format_event(event), flush=True)
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in event.items() if k != "event"}, step=event["step"])
            except Exception as e:  # a logging outage must never stop training
                log.warning("W&B logging failed (%s); metrics.jsonl still has every event", e)

    def preempting(self) -> None:
        """Tell W&B this run stops to be resumed (it shows as preempted, not failed)."""
        if self._wandb is not None:
            self._wandb.mark_preempting()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop events after `step`: a resumed run recomputes them, so each step appears once."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def format_event(e: dict[str, Any]) -> str:
    if e["event"] == "eval":
        ppl = math.exp(min(e["val_loss"], 50))
        return f"eval  step {e['step']:>6} | val_loss {e['val_loss']:.4f} | ppl {ppl:.2f}"
    if e["event"] == "train":
        gn = f" | gnorm {e['grad_norm']:.3f}" if e.get("grad_norm") is not None else ""
        return (
            f"train step {e['step']:>6}/{e['total_steps']} | loss {e['loss']:.4f} | lr {e['lr']:.2e}{gn} | "
            f"{e['tokens_per_s']:,.0f} tok/s | data {100 * e['data_wait_frac']:.0f}% | "
            f"eta {_hms(e['eta_s'])}"
        )
    if e["event"] == "checkpoint":
        return f"ckpt  step {e['step']:>6} | saved in {e['save_s']:.2f} s"
    if e["event"] == "skip":
        return f"skip  step {e['step']:>6} | {e['reason']} | {len(e['sample_ids'])} samples recorded"
    return json.dumps(e)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def start_wandb(cfg: LoggerConfig, run_name: str, run_dir: Path, config: dict, run_id: str | None):
    """One W&B run per training run, continued (same id) when the run resumes. None when disabled."""
    if cfg.mode == "disabled":
        return None
    import wandb

    try:
        return wandb.init(
            mode=cfg.mode,
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            name=cfg.name or run_name,
            tags=list(cfg.tags),
            notes=cfg.notes,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow",
        )
    except Exception as e:  # no network, no account: train anyway, metrics.jsonl has it all
        log.warning("W&B could not start (%s); continuing without it", e)
        return None


def setup_console_logging(rank: int) -> None:
    """Rank 0 logs info; other ranks only warnings and errors, tagged with their rank."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("trainer")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
