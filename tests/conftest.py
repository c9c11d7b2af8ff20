"""Session fixtures: one cache of the built-in corpus, and a clean environment for subprocess runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One cache of the built-in corpus for the whole session (prepared on first use)."""
    return tmp_path_factory.mktemp("data")


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
