"""Hydra sweeps (``python -m trainer.train -m ...``): what a member needs while it runs, and a summary.

    python -m trainer.sweep runs/sweeps/<name> [--csv FILE] [--markdown FILE]

prints one row per member, best first: its overrides, final train and validation loss, validation
bits per byte, tokens/s and status: done, stopped at a step, or failed / preempted with its exit
code and reason. Best: lowest bits per byte when every member logged it (members may differ in
tokenizer), else lowest validation loss. The same table goes to ``summary.csv`` and ``summary.md``
in the sweep dir.
It reads what every run leaves behind: ``<member>/config.yaml``, ``<member>/metrics.jsonl``,
``<member>/.hydra/overrides.yaml`` (Hydra writes it for sweep members only) and ``<member>/exit.json``
(a member that exited early: its code and one-line reason).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from trainer.rundir import (
    CONFIG,
    METRICS,
    clear_exit,
    flatten,
    read_config,
    read_events,
    read_exit,
    write_exit,
)
from trainer.signals import EXIT_REQUEUE, STOP_ENV

log = logging.getLogger("trainer")

# configs/train.yaml: run_dir: ${oc.env:TRAINER_SWEEP_RUN_DIR,runs/${name}}
RUN_DIR_ENV = "TRAINER_SWEEP_RUN_DIR"
# Overrides configs/train.yaml adds to every member; the same everywhere, so not worth showing.
INJECTED = ("logger.group",)


class SweepMember(Callback):
    """Hydra callback (configs/train.yaml ``hydra.callbacks``); does nothing outside multirun.

    A member's default run dir is the directory Hydra made for it (``runs/sweeps/<name>/<num>``):
    the task config is copied before callbacks run, so the value travels through the environment
    variable that ``run_dir``'s default reads. Every rank of a member computes the same path.

    A submitit member with several tasks (``hydra.launcher.tasks_per_node``/``nodes``) is one SLURM
    task per rank: submitit sets SLURM's variables, the trainer reads torchrun's, so map them.
    """

    def __init__(self) -> None:
        self.exits: list[MemberExit] = []  # members run in this process that exited early

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        os.environ[RUN_DIR_ENV] = hydra_cfg.runtime.output_dir
        if os.environ.get("SUBMITIT_EXECUTOR") and "RANK" not in os.environ:
            from submitit import JobEnvironment
            from submitit.helpers import TorchDistributedEnvironment

            if JobEnvironment().num_tasks > 1:
                # One device per rank is chosen by LOCAL_RANK: keep every device visible.
                TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if int(os.environ.get("RANK", "0")) == 0:
            clear_exit(Path(hydra_cfg.runtime.output_dir))  # from an earlier start of this member

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        os.environ.pop(RUN_DIR_ENV, None)  # the basic launcher runs the next member in this process
        from hydra.core.utils import JobStatus

        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, MemberExit):
            self.exits.append(job_return.return_value)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """After a sweep run in this process: one line per member that exited early, then exit with
        the requeue code if any was preempted (a requeued sweep resumes them), else the first one's."""
        if not self.exits:
            return
        command_line = set(config.hydra.overrides.task)
        for e in self.exits:
            own = [o for o in e.overrides if o not in command_line and not _injected(o)]
            print(f"error: sweep member {e.num} ({' '.join(own)}) exited with code {e.code}: {e.reason}",
                  file=sys.stderr)  # fmt: skip
        sweep_dir = config.hydra.sweep.dir
        print(f"error: {len(self.exits)} sweep member(s) did not finish: python -m trainer.sweep {sweep_dir} "
              "lists every member; running the same sweep again resumes them", file=sys.stderr)  # fmt: skip
        codes = [e.code for e in self.exits]
        sys.exit(EXIT_REQUEUE if EXIT_REQUEUE in codes else codes[0])


@dataclass
class MemberExit:
    """What a sweep member run in the sweep's own process returns instead of raising SystemExit."""

    num: int
    overrides: list[str]
    code: int
    reason: str


def sweep_member_dir() -> Path | None:
    """The directory Hydra made for the sweep member this process runs; None outside a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().runtime.output_dir)


def member_exited(member_dir: Path, exc: SystemExit) -> MemberExit:
    """A sweep member exits early (bad config, halted, preempted): record why in its directory.

    A submitit member is a process of its own whose exit code submitit acts on (a requeue): it exits
    as a single run does. A member of Hydra's basic launcher shares the sweep's process, and Hydra
    catches Exception only, so its SystemExit would end the whole sweep: it returns instead, and the
    sweep ends with its code once the other members ran. A stop request (preemption) is one for the
    process: the members after it stop before they start, and the same sweep run again resumes them.
    """
    code = exc.code if isinstance(exc.code, int) else 1
    reason = getattr(exc, "message", None) or (exc.code if isinstance(exc.code, str) else f"exit code {code}")
    if int(os.environ.get("RANK", "0")) == 0:
        write_exit(member_dir, code, str(reason))
    if os.environ.get("SUBMITIT_EXECUTOR"):
        raise exc
    if code == EXIT_REQUEUE:
        os.environ.setdefault(STOP_ENV, str(int(signal.SIGTERM)))
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    return MemberExit(int(hydra_cfg.job.num), list(hydra_cfg.overrides.task), code, str(reason))


def member_crashed(member_dir: Path, exc: Exception) -> None:
    """A sweep member raised (a bug, not a refusal): its dir records it; Hydra reports the traceback."""
    if int(os.environ.get("RANK", "0")) == 0:
        write_exit(member_dir, 1, f"{type(exc).__name__}: {exc}".splitlines()[0])


def _injected(override: str) -> bool:
    return override.split("=", 1)[0].lstrip("+~") in INJECTED


# submitit's local controller starts a job's tasks again when one exits with this code.
SUBMITIT_LOCAL_REQUEUE = 144
MAX_REQUEUES = 50  # per SLURM job, as in slurm/train.sbatch: a member that cannot progress stops


def exit_code_after_stop(signum: int | None, default: int) -> int:
    """The exit code of a process that saved because it was asked to stop (``signum``: the signal
    this rank got), and, for a submitit sweep member stopped by submitit's time-limit signal (USR2),
    what starts the member again so it resumes from that checkpoint: under SLURM, rank 0 requeues
    the job (as slurm/train.sbatch does); locally, the exit code asks submitit's controller to.
    Any other stop (scancel's SIGTERM, a user's kill) leaves with ``default``: the member resumes
    when the same sweep runs again.
    """
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    if executor not in ("slurm", "local") or signum is None:
        return default
    from submitit import JobEnvironment

    if signum != getattr(signal, "SIG" + JobEnvironment.USR_SIG, None):
        return default
    if executor == "local":
        return SUBMITIT_LOCAL_REQUEUE
    job = JobEnvironment()
    if job.global_rank != 0:
        return default
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= MAX_REQUEUES:
        log.warning("sweep member job %s was requeued %d times already: not again", job.job_id, restarts)
        return default
    cmd = ["scontrol", "requeue", job.job_id]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        reason = (getattr(e, "stderr", None) or str(e)).strip()
        log.error("`%s` failed (%s): run the same sweep again to resume the member", " ".join(cmd), reason)
        return default
    log.warning("requeued SLURM job %s: the sweep member resumes from its checkpoint", job.job_id)
    return default


@dataclass
class Member:
    path: Path
    overrides: list[str] = field(default_factory=list)
    step: int = 0
    total_steps: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None  # bits per byte: comparable across tokenizers, unlike the loss
    tokens_per_s: float | None = None
    exit: dict[str, Any] | None = None  # why it ended early, when it did (rundir.EXIT)

    @property
    def status(self) -> str:
        if self.total_steps is None:
            progress = "no metrics"  # failed before the first log, or not started yet
        elif self.step >= self.total_steps:
            progress = "done"
        else:
            progress = f"stopped {self.step}/{self.total_steps}"  # running, preempted or failed
        if self.exit is None:
            return progress
        code = self.exit.get("code")
        kind = "preempted" if code == EXIT_REQUEUE else "failed"
        where = "" if self.total_steps is None else f" at {self.step}/{self.total_steps}"
        return f"{kind} (exit {code}){where}: {self.exit.get('reason', '')}"

    def score(self, by_bpb: bool = False) -> float:
        """Lower is better: validation bits per byte (``by_bpb``: members without it last), or
        validation loss, else train loss; NaN last."""
        value = self.val_bpb if by_bpb else self.val_loss if self.val_loss is not None else self.train_loss
        return math.inf if value is None or math.isnan(value) else value


def find_members(sweep_dir: Path) -> list[Path]:
    """Member dirs in job order: the sweep's subdirs that hold a run or Hydra's record of one."""
    subdirs = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    members = [p for p in subdirs if any((p / f).exists() for f in (CONFIG, METRICS, ".hydra"))]
    return sorted(
        members, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)
    )


def read_member(path: Path) -> Member:
    member = Member(path)
    overrides = path / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        import yaml

        member.overrides = [str(o) for o in yaml.safe_load(overrides.read_text()) or []]
    member.exit = read_exit(path)
    events = read_events(path)
    train, evals = events.get("train", []), events.get("eval", [])
    if train:
        last = train[-1]
        member.step, member.total_steps = last["step"], last.get("total_steps")
        member.train_loss = last["loss"]
        speeds = [e["tokens_per_s"] for e in train if e.get("tokens_per_s")]
        # The median ignores the first window's start-up (compilation, data preparation).
        member.tokens_per_s = statistics.median(speeds) if speeds else None
    if evals:
        member.val_loss, member.val_bpb = evals[-1]["val_loss"], evals[-1].get("val_bpb")
    return member


def split_overrides(members: list[Member]) -> list[str]:
    """Keep on each member only what tells it apart; return what all members share.

    Without Hydra's record (a member started another way), the differing keys of the resolved
    configs stand in for the overrides.
    """
    for m in members:
        if not m.overrides and (m.path / CONFIG).is_file():
            flat = flatten(read_config(m.path))
            m.overrides = [f"{k}={json.dumps(v)}" for k, v in flat.items() if k not in ("run_dir", "name")]
    for m in members:
        m.overrides = [o for o in m.overrides if not _injected(o)]
    if len(members) < 2:
        return []
    common = [o for o in members[0].overrides if all(o in m.overrides for m in members[1:])]
    for m in members:
        m.overrides = [o for o in m.overrides if o not in common]
    return common


def _fmt(x: float | None, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def table(members: list[Member]) -> list[dict[str, str]]:
    return [
        {
            "rank": str(i),
            "member": m.path.name,
            "overrides": " ".join(m.overrides),
            "train_loss": _fmt(m.train_loss, 4),
            "val_loss": _fmt(m.val_loss, 4),
            "val_bpb": _fmt(m.val_bpb, 4),
            "tokens_per_s": _fmt(m.tokens_per_s, 0),
            "status": m.status,
            "run_dir": str(m.path),
        }
        for i, m in enumerate(members, 1)
    ]


def to_markdown(rows: list[dict[str, str]], common: list[str]) -> str:
    cols = [c for c in rows[0] if c != "run_dir"]
    lines = [f"common overrides: {' '.join(common) or '(none)'}", ""] if common else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r[c].replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def summarize(sweep_dir: Path) -> tuple[list[dict[str, str]], list[str]]:
    if not sweep_dir.is_dir():
        raise FileNotFoundError(
            f"{sweep_dir} is not a directory: pass a sweep dir such as runs/sweeps/<name>"
        )
    members = [read_member(p) for p in find_members(sweep_dir)]
    if not members:
        raise FileNotFoundError(
            f"{sweep_dir} holds no sweep members (subdirs with config.yaml or metrics.jsonl): "
            "pass the sweep dir, e.g. runs/sweeps/<name>"
        )
    common = split_overrides(members)
    # By bits per byte when every member that evaluated logged it: members may differ in tokenizer
    # (runs from before val_bpb lack it).
    evaluated = [m for m in members if m.val_loss is not None]
    by_bpb = bool(evaluated) and all(m.val_bpb is not None for m in evaluated)
    members.sort(key=lambda m: m.score(by_bpb))  # stable: ties keep job order
    return table(members), common


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep's directory, e.g. runs/sweeps/<name>")
    parser.add_argument("--csv", type=Path, help="where to write the CSV (default: <sweep_dir>/summary.csv)")
    parser.add_argument("--markdown", type=Path, help="the markdown table (default: <sweep_dir>/summary.md)")
    args = parser.parse_args(argv)
    try:
        rows, common = summarize(args.sweep_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    markdown = to_markdown(rows, common)
    print(markdown, end="")
    for path, text in ((args.csv or args.sweep_dir / "summary.csv", to_csv(rows)),
                       (args.markdown or args.sweep_dir / "summary.md", markdown)):  # fmt: skip
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
