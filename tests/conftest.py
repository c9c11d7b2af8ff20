"""Session fixtures: one cache of the built-in corpus, and a clean environment for subprocess runs.

The suite runs on two pytest-xdist workers (pyproject's addopts: ``-n 2``); the scheduler below
decides what may run side by side.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Files whose tests start several processes (torchrun groups, SLURM jobs): one worker runs them one
# after another, so no two of them share the two cores (a few e2e tests run two ranks too; those
# files stay with the other worker).
SEVERAL_PROCESSES = ("tests/distributed/", "tests/slurm/")


@pytest.hookimpl(optionalhook=True)  # defined only when pytest-xdist is loaded
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Work units for the xdist workers: the multi-process tests as one unit, handed out first (the
    longest), then every other file whole, so its module fixtures (trained runs, exports) are built
    once. (xdist's own ``--dist loadgroup`` does the same from marks, but on pytest 9.2 its marks
    no longer reach the scheduler: pytest-xdist issue #1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return "several-processes" if path.startswith(SEVERAL_PROCESSES) else path

    config.option.loadscopereorder = False  # collection order: tests/distributed comes first
    return Scheduling(config, log)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One cache of the built-in corpus for the whole session, prepared on first use (workers
    share it: prepare_builtin serializes concurrent builders on a lock file)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # .../pytest-N/popen-gwK -> the session's directory, shared by the workers
    (root / "data").mkdir(exist_ok=True)
    return root / "data"


@pytest.fixture(scope="session")
def base_env(data_dir) -> dict[str, str]:
    """The environment of a user's shell, minus anything a launcher would have set."""
    env = dict(os.environ)
    env |= {"TRAINER_DATA_DIR": str(data_dir), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture
def cli_env(base_env) -> dict[str, str]:
    return dict(base_env)
