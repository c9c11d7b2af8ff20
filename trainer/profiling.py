"""torch.profiler traces of chosen steps on chosen ranks: ``profile.enabled=true profile.steps=[a,b]``.

The loop calls ``before_step(n)`` at the top of each step n inside ``with StepProfiler(...)``.
Steps a..b (inclusive) are recorded into ``<run_dir>/profile/rank<r>.steps<a>-<b>.pt.trace.json``,
a Chrome trace (chrome://tracing, https://ui.perfetto.dev) that TensorBoard's profiler plugin also
reads (``*.pt.trace.json``). On CUDA a memory snapshot of the same steps goes beside it
(``.memory.pickle``, for https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from trainer.config import ProfileConfig

log = logging.getLogger("trainer")


class StepProfiler:
    """Starts torch.profiler before step a and stops it after step b; a no-op when not configured."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, device: torch.device) -> None:
        self.cfg = cfg
        self.on = cfg.enabled and rank in cfg.ranks
        self.first, self.last = cfg.steps
        self.cuda = device.type == "cuda"
        self.dir, self.rank = run_dir / "profile", rank
        self.recorded_from = self.first  # > first when a run resumed inside the window
        self._prof: profile | None = None
        self._mark: Any = None  # the open "ProfilerStep#n" range of the step being recorded

    def before_step(self, step: int) -> None:
        """Called with the number of the step about to run (1-based)."""
        if not self.on:
            return
        if self._prof is not None and step > self.last:
            self.close()
        elif self._prof is None and self.first <= step <= self.last:
            self._start(step)
        if self._prof is not None:
            self._end_mark()
            self._mark = record_function(f"ProfilerStep#{step}")  # a step's range in the trace viewer
            self._mark.__enter__()

    def _end_mark(self) -> None:
        if self._mark is not None:
            self._mark.__exit__(None, None, None)
            self._mark = None

    def _start(self, step: int) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._prof = profile(
            activities=activities,
            record_shapes=self.cfg.record_shapes,
            profile_memory=self.cfg.profile_memory,
            with_stack=self.cfg.with_stack,
        )
        if self.cuda and self.cfg.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._prof.start()
        self.recorded_from = step
        log.info("profiling steps %d-%d", step, self.last)

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also when the run stops inside the window: a profiler left running crashes the exit

    def close(self) -> None:
        """Stop and write the trace (also when the run ends inside the window); idempotent."""
        if self._prof is None:
            return
        self._end_mark()
        prof, self._prof, self.on = self._prof, None, False
        prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        base = f"rank{self.rank}.steps{self.recorded_from}-{self.last}"  # the steps it holds
        trace = self.dir / f"{base}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        if self.cuda and self.cfg.memory_snapshot:
            torch.cuda.memory._dump_snapshot(str(self.dir / f"{base}.memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        log.info("profile trace written to %s", trace)
