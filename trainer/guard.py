"""Per-step decisions every rank must take together: drop a bad step, stop, save now.

Once per step, after the last micro-batch's forward and before its backward, one small
host-side collective carries [loss, stop requested, save due] over all ranks; every rank
then takes the same decisions from the same numbers.
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch
import torch.distributed as dist

from trainer.config import GuardConfig
from trainer.distributed import DistInfo
from trainer.signals import StopSignal


class TrainingHalted(RuntimeError):
    """The guard stopped the run (non-finite loss, or a loss spike with on_spike=stop)."""


class StepControl:
    def __init__(self, cfg: GuardConfig, dist_info: DistInfo, stop: StopSignal, save_every_s: float) -> None:
        self.cfg, self.dist, self.stop = cfg, dist_info, stop
        self.save_every_s = save_every_s
        self.last_save = time.monotonic()
        self.window: deque[float] = deque(maxlen=cfg.spike_window)
        self.step = 0  # the step being computed, set by the loop
        self.loss = math.nan  # this step's loss, averaged over ranks
        self.stop_requested = self.save_due = False
        self.drop_reason: str | None = None

    def __call__(self, local_loss: torch.Tensor) -> bool:
        """Agree on this step's numbers; True means: drop this step (do not apply its update)."""
        loss = float(local_loss)  # the one host sync of the step
        if self.step in self.cfg.inject_nan_at:
            loss = math.nan
        save_due = bool(self.save_every_s) and time.monotonic() - self.last_save >= self.save_every_s
        t = torch.tensor([loss, float(self.stop.received is not None), float(save_due)], dtype=torch.float64)
        if self.dist.world_size > 1:
            dist.all_reduce(t, group=self.dist.cpu_group)  # NaN on any rank makes the sum NaN
        self.loss = t[0].item() / self.dist.world_size
        self.stop_requested, self.save_due = t[1].item() > 0, t[2].item() > 0
        self.drop_reason = self._verdict()
        return self.drop_reason is not None

    def _verdict(self) -> str | None:
        if not math.isfinite(self.loss):
            if self.cfg.on_nonfinite == "stop":
                raise TrainingHalted(
                    f"non-finite loss at step {self.step}: stopped without saving (the newest checkpoint "
                    "is still good); lower optim.lr, or set guard.on_nonfinite=skip to drop such steps"
                )
            return "non-finite loss"
        if self.cfg.spike_k and len(self.window) >= min(10, self.cfg.spike_window):
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((v - mean) ** 2 for v in self.window) / len(self.window))
            limit = mean + self.cfg.spike_k * std
            if self.loss > limit:
                if self.cfg.on_spike == "stop":
                    raise TrainingHalted(
                        f"loss spike at step {self.step}: {self.loss:.4f} > mean + {self.cfg.spike_k} std "
                        f"= {limit:.4f} of the last {len(self.window)} steps; set guard.on_spike=skip "
                        "to drop such steps, or raise guard.spike_k"
                    )
                return f"loss spike ({self.loss:.4f} > {limit:.4f})"
        self.window.append(self.loss)
        return None

    def saved(self) -> None:
        self.last_save = time.monotonic()
