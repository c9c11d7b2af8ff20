"""What every entry point does with bad input: one line naming what to change, exit code 2."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn

from omegaconf.errors import MissingMandatoryValue

from trainer.config import ConfigError


class Exit(SystemExit):
    """SystemExit that keeps the one line it printed (a sweep member records it as its reason)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` and exit; SystemExit passes through Hydra untouched."""
    print(f"error: {message}", file=sys.stderr)
    raise Exit(code, message)


@contextmanager
def one_line_errors(*extra: type[Exception]) -> Iterator[None]:
    """Turn config and data errors (and `extra` ones) raised inside into `fail(...)`."""
    from trainer.data import DataError

    try:
        yield
    except MissingMandatoryValue as e:
        fail(f"{e.full_key} is not set: add {e.full_key}=... to the command line")
    except (ConfigError, DataError, *extra) as e:
        fail(str(e))  # one line naming the key, file or directory
