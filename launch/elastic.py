"""torchrun (``torch.distributed.run``) as launch/torchrun.sh runs it, with what SLURM requeue needs.

    python launch/elastic.py [torchrun arguments] -m trainer.train [overrides]

Three differences from plain ``torchrun``:
- SIGUSR1 and SIGTERM go on to the workers and do not stop the launcher: the trainer saves at the
  next step boundary and exits ``EXIT_REQUEUE``; torchrun would instead die on USR1, or kill the
  workers 30 s after TERM, possibly in the middle of the save. The request is also left in the
  environment of workers started later (``TRAINER_STOP_REQUESTED``), which then exit
  ``EXIT_REQUEUE`` at once: a request that comes before the workers exist is not lost, and with
  ``--max-restarts`` torchrun's restarts do not carry on training.
- When the workers exit ``EXIT_REQUEUE`` (checkpoint saved, start me again), this exits with that
  code too, instead of torchrun's 1 for any failure: slurm/train.sbatch requeues on it alone.
- A rendezvous that cannot be reached or completed ends with one line saying so, not a traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

EXIT_REQUEUE = 85  # trainer.signals.EXIT_REQUEUE; kept here so the launcher needs only torch
STOP_ENV = "TRAINER_STOP_REQUESTED"  # trainer.signals.STOP_ENV
FORWARDED = (signal.SIGUSR1, signal.SIGTERM)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the workers torchrun started), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        if int(text.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def forward(signum: int, frame: object) -> None:
    os.environ[STOP_ENV] = str(signum)  # torchrun copies our environment into every worker it starts
    for pid in children(os.getpid()):
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.kill(pid, signum)


def main(argv: list[str]) -> int:
    for sig in FORWARDED:  # first: importing torch takes seconds
        signal.signal(sig, forward)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import main as torchrun

    try:
        # torchrun then installs its own handlers for these only; ours stay on USR1 and TERM.
        torchrun(["--signals-to-handle", "SIGINT,SIGHUP,SIGQUIT", *argv])
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        if first.exitcode == EXIT_REQUEUE:
            print(f"elastic: workers saved and exited {EXIT_REQUEUE} (restart to resume)", file=sys.stderr)
            return EXIT_REQUEUE
        print(
            f"elastic: worker failed with exit code {first.exitcode}; see its output above", file=sys.stderr
        )
        return 1
    except RendezvousError as e:
        endpoint = os.environ.get("TRAINER_RDZV_ENDPOINT", "the rendezvous endpoint")
        print(
            f"elastic: error: rendezvous at {endpoint} failed ({e.__cause__ or e}); check "
            "MASTER_ADDR/MASTER_PORT and that every node started (node rank 0 hosts it)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
