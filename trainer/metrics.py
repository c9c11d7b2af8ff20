"""What the run reports and where it goes: console progress, metrics.jsonl and W&B (rank 0 only)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from trainer.config import LoggerConfig

log = logging.getLogger("trainer")

_DISK_LOW = 64 * 1024  # bytes free under which W&B's offline writer starts losing events


class MetricsSink:
    """Rank 0 writes every event to metrics.jsonl, the console and (optionally) W&B.

    Other ranks get a sink that drops events, so call sites need no rank checks. W&B is best
    effort: its first failure is one warning and W&B is dropped for the rest of the run (a dead
    service would otherwise cost a timeout per event); metrics.jsonl keeps every event.
    Events at steps W&B already holds from before a restart (``wandb_floor``) are not sent again,
    so the W&B chart's steps never go backwards.
    """

    def __init__(
        self, run_dir: Path | None, wandb_run: Any = None, wandb_floor: int = 0, progress: bool | None = None
    ) -> None:
        self._file = open(run_dir / "metrics.jsonl", "a") if run_dir is not None else None  # noqa: SIM115
        self._wandb = wandb_run
        self._floor = wandb_floor
        self._console = Console(progress) if run_dir is not None else None
        self._file_ok = True
        self._wandb_disk_warned = False

    @property
    def wandb_id(self) -> str | None:
        return self._wandb.id if self._wandb is not None else None

    def log(self, event: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._write(event)
        assert self._console is not None
        self._console.show(event)
        if self._wandb is not None:
            self._to_wandb(event)

    def _write(self, event: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(event) + "\n")
            self._file.flush()
            self._file_ok = True
        except OSError as e:  # a full disk: warn once, keep training, retry with the next event
            if self._file_ok:
                log.warning("could not write metrics.jsonl (%s); training continues", e)
            self._file_ok = False

    def _to_wandb(self, event: dict[str, Any]) -> None:
        try:
            if event["event"] == "perf":  # what MFU rests on: one value per run, not a curve
                self._wandb.summary.update({k: v for k, v in event.items() if k not in ("event", "step")})
            elif event["step"] > self._floor:
                data = {k: v for k, v in event.items() if k != "event" and isinstance(v, (int, float))}
                self._wandb.log(data, step=event["step"])
                self._check_wandb_disk(event["step"])
        except Exception as e:  # a logging outage must never stop training
            log.warning(
                "W&B logging failed (%s); W&B is off for the rest of this run, metrics.jsonl has it all", e
            )
            self._wandb = None

    def _check_wandb_disk(self, step: int) -> None:
        """W&B's writer drops what it cannot write without telling its caller: say so once."""
        if self._wandb_disk_warned:
            return
        try:
            fs = os.statvfs(self._wandb.dir)
        except Exception:  # a check must not be what turns W&B off
            return
        if fs.f_bavail * fs.f_frsize < _DISK_LOW:
            self._wandb_disk_warned = True
            log.warning(
                "W&B's files in %s: the disk is full, so the W&B run may miss events from step %d on; "
                "metrics.jsonl keeps them (unless it is on the same disk)",
                self._wandb.dir,
                step,
            )

    def preempting(self) -> None:
        """Tell W&B this run stops to be resumed (it shows as preempted, not failed)."""
        if self._wandb is not None:
            try:
                self._wandb.mark_preempting()
            except Exception as e:
                log.warning("W&B mark_preempting failed (%s)", e)

    def close(self) -> None:
        if self._console is not None:
            self._console.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as e:  # the run's results are on disk already
                log.warning("W&B finish failed (%s)", e)


class Console:
    """Rank 0's console: a live tqdm bar on a terminal, one plain line per event otherwise (SLURM logs)."""

    def __init__(self, progress: bool | None = None) -> None:
        self.progress = sys.stdout.isatty() if progress is None else progress
        self._bar: Any = None

    def show(self, event: dict[str, Any]) -> None:
        if not self.progress:
            print(format_event(event), flush=True)
            return
        if event["event"] != "train":
            from tqdm import tqdm

            tqdm.write(format_event(event), file=sys.stdout)
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=event["total_steps"], desc="train", unit="step", file=sys.stdout)
        self._bar.n = event["step"]
        self._bar.set_postfix_str(
            f"loss {event['loss']:.4f} | {event['tokens_per_s']:,.0f} tok/s | eta {_hms(event['eta_s'])}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def open_sink(
    cfg: LoggerConfig,
    run_dir: Path,
    is_main: bool,
    run_name: str,
    config: dict[str, Any],
    step: int,
    wandb_id: str | None,
) -> MetricsSink:
    """Rank 0: drop events past the checkpoint at `step` (they are redone), start or continue W&B."""
    if not is_main:
        return MetricsSink(None)
    logged_up_to = truncate_metrics(run_dir, step)
    wandb_run = start_wandb(cfg, run_name, run_dir, config, wandb_id)
    return MetricsSink(run_dir, wandb_run, wandb_floor=logged_up_to if wandb_id else 0)


def truncate_metrics(run_dir: Path, step: int) -> int:
    """Drop events after `step`: a resumed run recomputes them, so each step appears once.

    Returns the highest step logged before (W&B holds that far already and refuses lower steps).
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    events = [_parse(line) for line in lines]  # None: a line torn by a crash mid-write
    kept = [line for line, e in zip(lines, events) if e is not None and e["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return max((e["step"] for e in events if e is not None), default=0)


def _parse(line: str) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "step" in event else None


def format_event(e: dict[str, Any]) -> str:
    if e["event"] == "eval":
        ppl = math.exp(min(e["val_loss"], 50))
        bpb = f" | bpb {e['val_bpb']:.4f}" if e.get("val_bpb") is not None else ""
        return f"eval  step {e['step']:>6} | val_loss {e['val_loss']:.4f} | ppl {ppl:.2f}{bpb}"
    if e["event"] == "train":
        gn = f" | gnorm {e['grad_norm']:.3f}" if e.get("grad_norm") is not None else ""
        line = (
            f"train step {e['step']:>6}/{e['total_steps']} | loss {e['loss']:.4f} | lr {e['lr']:.2e}{gn} | "
            f"{e['tokens_per_s']:,.0f} tok/s | data {100 * e['data_wait_frac']:.0f}% | "
        )
        if e.get("mfu") is not None:
            line += f"mfu {100 * e['mfu']:.1f}% | "
        mem = e.get("cuda_max_allocated_gb", e.get("rss_gb"))
        if mem is not None:
            line += f"mem {mem:.2f} GB | "
        return line + f"eta {_hms(e['eta_s'])}"
    if e["event"] == "checkpoint":
        if e.get("async"):  # the write goes on in the background: checkpoint_complete follows
            waited = f" (waited {e['wait_s']:.2f} s for the previous write)" if e["wait_s"] >= 0.01 else ""
            return f"ckpt  step {e['step']:>6} | snapshot in {e['save_s']:.2f} s{waited}, writing"
        return f"ckpt  step {e['step']:>6} | saved in {e['save_s']:.2f} s"
    if e["event"] == "checkpoint_complete":
        return f"ckpt  step {e['step']:>6} | complete (written in {e['write_s']:.2f} s)"
    if e["event"] == "skip":
        return f"skip  step {e['step']:>6} | {e['reason']} | {len(e['sample_ids'])} samples recorded"
    if e["event"] == "perf":
        peak = f"{e['peak_tflops'] * 1e3:,.1f} GFLOP/s" if e.get("peak_tflops") else "none"
        line = f"perf  peak {peak} ({e['peak_source']}) | {e['flops_per_token']:,} FLOPs/token"
        if e.get("plan"):
            line += f" | plan {e['plan']['memory_gb']:.2f} GiB per rank"
        return line + (f" | compiled in {e['compile_s']:.1f} s (first step)" if "compile_s" in e else "")
    if e["event"] == "plan_check":
        peak = max(e["peak_gb"])
        return f"plan  peak memory {peak:.2f} GiB per rank measured, {e['planned_gb']:.2f} GiB planned"
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
    setup_logging(rank)


# Libraries that print through handlers of their own instead of propagating to the root logger.
_OWN_HANDLERS = ("DeepSpeed",)


class _CopyToFile(logging.Filter):
    """On a library's logger: hand each record to the run's log file; let it through to the
    library's own (console) handlers only if ``console``."""

    def __init__(self, handler: logging.Handler, console: bool) -> None:
        super().__init__()
        self.handler, self.console = handler, console

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.handler.level:
            self.handler.handle(record)
        return self.console


def setup_logging(rank: int, log_file: Path | None = None, debug: bool = False) -> None:
    """The console shows our lines: the ``trainer`` logger's (rank 0: info, other ranks: warnings and
    errors, tagged with their rank), and what the progress sink prints.

    With ``log_file``, everything else goes there instead: libraries' logging (DeepSpeed's compiler
    probes and accelerator notices, torch's), Python warnings (torch.distributed's deprecations),
    DeepSpeed's prints while it starts (``stdout_to_log``), and our own lines too. ``debug``
    (``log_level=debug``): libraries log at debug level, and all of it comes to the console as well.
    Call it before DeepSpeed is imported: it logs while it is imported.
    """
    level = logging.DEBUG if debug else logging.INFO
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(f"[rank{rank}] %(levelname)s %(name)s: %(message)s"))
    console.setLevel(level if rank == 0 or debug else logging.WARNING)
    ours = logging.getLogger("trainer")
    _replace_handlers(ours, [console])
    ours.setLevel(level)
    ours.propagate = False
    if log_file is None:
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours.addHandler(to_file)
    root = logging.getLogger()
    handlers: list[logging.Handler] = [to_file]
    if debug:  # on stdout, where Hydra's handler printed them: DeepSpeed silences stderr (fd 2) while
        # it probes the compiler, which is when most of them come
        libraries = logging.StreamHandler(sys.stdout)
        libraries.setFormatter(console.formatter)
        handlers.append(libraries)
    _replace_handlers(root, handlers)  # Hydra's console handler goes
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings" -> root
    for name in _OWN_HANDLERS:
        library = logging.getLogger(name)
        for f in [f for f in library.filters if isinstance(f, _CopyToFile)]:
            library.removeFilter(f)
        library.addFilter(_CopyToFile(to_file, console=debug))


def _replace_handlers(logger: logging.Logger, handlers: list[logging.Handler]) -> None:
    for old in logger.handlers:
        if isinstance(old, logging.FileHandler):
            old.close()  # an earlier run of this process (a sweep member) opened it
    logger.handlers[:] = handlers


class _LogWriter:
    """A text stream that logs each line it is given (at info, to ``logger``)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self._pending = logger, ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line)
        return len(text)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def stdout_to_log(name: str) -> Iterator[None]:
    """Python-level prints inside the block become log records of ``name`` (so they go where
    `setup_logging` sends library lines): DeepSpeed prints while it builds its ops."""
    with contextlib.redirect_stdout(_LogWriter(logging.getLogger(name))):  # type: ignore[type-var]
        yield
