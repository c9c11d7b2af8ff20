"""Plots and a summary of one run or several (a sweep): ``python -m trainer.report <run_dir> [...]``.

    python -m trainer.report runs/default
    python -m trainer.report runs/sweeps/lr-sweep            # a sweep dir: every member under it
    python -m trainer.report runs/a runs/b --out plots/

Reads each run's ``config.yaml`` and ``metrics.jsonl``; writes ``loss.png`` (train and validation
loss against tokens) and ``throughput.png`` (tokens/s and MFU against tokens) into ``--out``
(default: ``<run_dir>/report``, or ``<common parent>/report`` for several runs), and prints one
row per run. Each run is labelled by the config values that differ between the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.rundir import METRICS, flatten, read_config, read_events

# Keys that always differ between runs and say nothing about them.
_NOT_LABELS = ("run_dir", "logger.")


@dataclass
class RunData:
    path: Path
    config: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""


def find_runs(paths: list[Path]) -> list[Path]:
    """Run dirs (holding metrics.jsonl) among `paths`; a dir without one is searched below (a sweep)."""
    runs: list[Path] = []
    for path in paths:
        if (path / METRICS).is_file():
            runs.append(path)
        else:
            below = sorted(p.parent for p in path.rglob(METRICS))
            if not below:
                raise FileNotFoundError(f"no metrics.jsonl in or under {path}: is it a run dir?")
            runs += below
    return runs


def load_run(path: Path) -> RunData:
    events = read_events(path)
    return RunData(path, read_config(path), events.get("train", []), events.get("eval", []))


def label_runs(runs: list[RunData]) -> None:
    """Label each run by the config keys whose values differ across runs (else by its dir name)."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f})
    differ = [
        k
        for k in keys
        if not k.startswith(_NOT_LABELS) and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1
    ]
    for run, f in zip(runs, flat):
        parts = [f"{k}={f.get(k)}" for k in differ if k != "name"]
        run.label = ", ".join(parts) if parts and len(runs) > 1 else (f.get("name") or run.path.name)
    if len({r.label for r in runs}) < len(runs):  # e.g. the same config in two run dirs
        for run in runs:
            run.label = f"{run.path.name}: {run.label}" if run.label != run.path.name else run.label


def plot(runs: list[RunData], out_dir: Path) -> list[Path]:
    """loss.png and throughput.png into out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        ax.plot(
            _xs(run.train), [e["loss"] for e in run.train], color=color, lw=1.2, label=f"{run.label} (train)"
        )
        if run.evals:
            val = [e["val_loss"] for e in run.evals]
            ax.plot(_xs(run.evals), val, color=color, ls="--", marker="o", ms=3, label=f"{run.label} (val)")
    _finish(ax, "loss against tokens", "loss (cross-entropy, nats/token)")
    paths = [_save(fig, out_dir / "loss.png")]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        top.plot(_xs(run.train), [e["tokens_per_s"] for e in run.train], color=color, label=run.label)
        mfu = [(x, 100 * e["mfu"]) for x, e in zip(_xs(run.train), run.train) if e.get("mfu") is not None]
        if mfu:
            bottom.plot(*zip(*mfu), color=color, label=run.label)
    top.set_title("throughput")
    top.set_ylabel("tokens/s (all devices)")
    top.grid(alpha=0.3)
    _finish(bottom, "", "MFU (%)")
    paths.append(_save(fig, out_dir / "throughput.png"))
    return paths


def _xs(events: list[dict[str, Any]]) -> list[float]:
    return [e.get("tokens", e["step"]) for e in events]


def _finish(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clear()
    return path


def summary(runs: list[RunData]) -> str:
    """One row per run: steps, tokens, last train loss, best val loss and bits per byte, median
    tokens/s, median MFU."""
    rows = [("run", "steps", "tokens", "loss", "best val", "best bpb", "tok/s", "MFU %")]
    for run in runs:
        last = run.train[-1] if run.train else {}
        val, bpb = (_best([e.get(key) for e in run.evals]) for key in ("val_loss", "val_bpb"))
        mfu = _median([100 * e["mfu"] for e in run.train if e.get("mfu") is not None])
        tps = _median([e["tokens_per_s"] for e in run.train[1:] or run.train])  # step 1 includes warm-up
        loss = last.get("loss", math.nan)
        steps, tokens = str(last.get("step", 0)), f"{last.get('tokens', 0):,}"
        scores = (f"{loss:.4f}", f"{val:.4f}", f"{bpb:.4f}")
        rows.append((run.label, steps, tokens, *scores, f"{tps:,.0f}", f"{mfu:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    return "\n".join(lines)


def _best(xs: list[float | None]) -> float:
    """The lowest finite value; NaN when there is none (min over NaNs depends on their order)."""
    return min((x for x in xs if x is not None and math.isfinite(x)), default=math.nan)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run dirs, or dirs holding several (a sweep)")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go")
    args = parser.parse_args(argv)
    try:
        paths = find_runs(args.runs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = [load_run(p) for p in paths]
    label_runs(runs)
    out = args.out or (Path(os.path.commonpath([str(p.resolve()) for p in paths])) / "report")
    for png in plot(runs, out):
        print(f"wrote {png}")
    print(summary(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
