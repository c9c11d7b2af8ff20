"""Python's cyclic garbage collector on the step schedule instead of the allocator's.

Left automatic, the collector starts whenever allocations pass its thresholds: at a random point
of a step, on one rank and not the others, and a full collection over everything DeepSpeed and
the loader keep alive pauses that rank (the issue measured ~140 ms pauses, 4-6% of a long loader
run); in a multi-rank step the others then wait for it at the next collective. With ``gc_every=N``
automatic collection is off and every rank collects generations 0 and 1 after the same steps (every
N-th), as torchtitan does (``gc_freq``). Reference counting still frees everything that is not in a
cycle at once.
"""

from __future__ import annotations

import gc
import time
from types import TracebackType


class ScheduledGC:
    """``with ScheduledGC(every) as g:`` ... ``g.after_step(step)`` once per optimizer step.

    ``every=0`` leaves Python's automatic collection as it is. Automatic collection is switched back
    on when the block ends, however it ends.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.collections = 0
        self.seconds = 0.0  # spent in the scheduled collections
        self._was_enabled = False

    def __enter__(self) -> ScheduledGC:
        if self.every:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect(1)  # start from a clean young generation, like torchtitan
        return self

    def after_step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            start = time.perf_counter()
            gc.collect(1)
            self.seconds += time.perf_counter() - start
            self.collections += 1

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.every and self._was_enabled:
            gc.enable()
