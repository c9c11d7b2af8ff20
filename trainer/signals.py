"""Stop requests from the outside (SLURM preemption, `kill`), and the exit codes launchers act on."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("trainer")

# The trainer saved a checkpoint because it was asked to stop (SIGTERM / SIGUSR1 / SIGUSR2) and
# expects to be started again: slurm/train.sbatch requeues the job on this code and on no other.
EXIT_REQUEUE = 85
# Set by launch/elastic.py in the environment of the workers it starts after a stop request.
STOP_ENV = "TRAINER_STOP_REQUESTED"


class Preempted(Exception):
    """Raised at a step boundary after the checkpoint was saved; the entry point exits EXIT_REQUEUE."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum  # the signal this rank received; None: another rank was asked


class StopSignal:
    """Remembers that SIGTERM, SIGUSR1 or SIGUSR2 arrived; the loop acts on it at the next step boundary.

    SIGUSR2 is what submitit (Hydra's SLURM launcher) has SLURM send a sweep member before its
    time limit; SIGUSR1 is slurm/train.sbatch's; SIGTERM is what SLURM, Kubernetes and kill send.

    The handler only sets a flag: the save happens in the loop, where every rank can agree on
    it. A second signal while saving is logged and ignored, so it cannot interrupt the save.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None

    def install(self) -> StopSignal:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def ignore_further(self) -> None:
        """On the way out after saving: interpreter shutdown resets Python handlers to the default
        action (terminate), which would turn a late signal into a kill and lose EXIT_REQUEUE.
        SIG_IGN survives shutdown."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            log.warning("got %s: saving a checkpoint at the next step boundary, then exiting",
                        signal.Signals(signum).name)  # fmt: skip
            self.received = signum
        else:
            log.warning("got %s again: already stopping", signal.Signals(signum).name)
