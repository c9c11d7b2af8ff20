"""The SLURM tests run against a real cluster: slurm/local-cluster.sh's two slurmd on this machine.

The fixture starts it (idempotent; a no-op when it is up) and fails, never skips, when it cannot:
the message says what to install. Deselect these tests with `-m "not slurm"`.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.launch_helpers import LOCAL_CLUSTER, cluster_env, launcher_env


@pytest.fixture(scope="session")
def slurm_env(base_env) -> dict[str, str]:
    proc = subprocess.run(["bash", str(LOCAL_CLUSTER), "start"], capture_output=True, text=True, timeout=180)
    if proc.returncode:
        pytest.fail(
            "the local SLURM cluster did not start (slurm/local-cluster.sh start):\n"
            f"{proc.stderr}{proc.stdout}\n"
            "Deselect the SLURM tests with -m 'not slurm' on a machine without it.",
            pytrace=False,
        )
    return cluster_env(launcher_env(base_env))
