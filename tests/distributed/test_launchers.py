"""The launchers outside SLURM: launch/torchrun.sh on one and on two "nodes" (one machine, c10d
rendezvous), `accelerate launch`, SIGUSR1 to the launcher, local sweeps (a member restarted after
submitit's time-limit signal), and bad input."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import assert_ok, catches, frozen, kill_group, pending, run_module, start_module
from tests.launch_helpers import (
    EXIT_REQUEUE,
    REPO,
    SBATCH,
    TORCHRUN_SH,
    free_port,
    launcher_env,
    losses,
    run_script,
    train_steps,
    wait_for,
)

pytestmark = pytest.mark.distributed

# Global batch 8 = 2 ranks x micro 4, or 1 rank x micro 4 x 2 accumulation steps.
COMMON = ["debug=fast", "max_steps=8", "eval_every=4", "engine=zero2", "checkpoint.every_steps=0"]


@pytest.fixture
def env(cli_env) -> dict[str, str]:
    return launcher_env(cli_env)


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory, base_env) -> list[float]:
    """The reference: launch/torchrun.sh on one node with one process."""
    cwd = tmp_path_factory.mktemp("one")
    proc = run_script(TORCHRUN_SH, ["--nproc", "1", *COMMON, "run_dir=out"], cwd, launcher_env(base_env))
    assert_ok(proc)
    assert "node 0 of 1, 1 process(es)" in proc.stderr
    return losses(cwd / "out")


def test_two_nodes_on_one_machine_match_one_process(tmp_path, env, one_process_losses):
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                "bash",
                str(TORCHRUN_SH),
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                *COMMON,
                "run_dir=out",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "node 0 of 2" in outs[0] and "node 1 of 2" in outs[1]
    assert len(list((tmp_path / "out" / "checkpoints" / "step-8").glob("*optim_states.pt"))) == 2
    assert losses(tmp_path / "out") == pytest.approx(one_process_losses, rel=1e-4, abs=1e-5)


def test_accelerate_launch_matches_one_process(tmp_path, env, one_process_losses):
    # Not accelerate's default port (29500): the README's `accelerate launch` may be starting on
    # the other xdist worker, and two launches that find it free at once both try to bind it.
    port = ["--main_process_port", str(free_port())]
    args = ["--config_file", str(REPO / "launch" / "accelerate.yaml"), *port, "-m", "trainer.train"]
    proc = run_module("accelerate.commands.launch", [*args, *COMMON, "run_dir=out"], tmp_path, env)
    assert_ok(proc)
    assert len(list((tmp_path / "out" / "checkpoints" / "step-8").glob("*optim_states.pt"))) == 2
    assert losses(tmp_path / "out") == pytest.approx(one_process_losses, rel=1e-4, abs=1e-5)


def test_usr1_to_the_launcher_saves_exits_85_and_a_restart_finishes(tmp_path, env):
    args = ["--nproc", "2", "debug=fast", "max_steps=80", "eval_every=0", "run_dir=out"]
    rc, out = _stop_launcher(
        tmp_path, env, args, lambda _: len(train_steps(tmp_path / "out")) >= 3, signal.SIGUSR1
    )
    assert rc == EXIT_REQUEUE, out[-3000:]
    stopped_at = train_steps(tmp_path / "out")[-1]
    assert stopped_at < 80 and (tmp_path / "out" / "checkpoints" / f"step-{stopped_at}").is_dir()

    proc = run_script(TORCHRUN_SH, args, tmp_path, env)  # the same command again: resumes
    assert_ok(proc)
    assert train_steps(tmp_path / "out") == list(range(1, 81))


def test_local_sweep_runs_every_member_in_its_own_dir_and_summarizes(tmp_path, env):
    """Hydra's basic launcher: members one after another in one process."""
    args = ["-m", "name=s", "debug=fast", "max_steps=3", "eval_every=3", "optim.lr=1e-3,3e-3"]
    proc = run_module("trainer.train", args, tmp_path, env)
    assert_ok(proc)
    sweep = tmp_path / "runs" / "sweeps" / "s"
    for num in (0, 1):
        cfg = yaml.safe_load((sweep / str(num) / "config.yaml").read_text())
        assert cfg["run_dir"] == str(sweep / str(num)) and cfg["logger"]["group"] == "s"
        assert len(losses(sweep / str(num))) == 3
    proc = run_module("trainer.sweep", [str(sweep), "--csv", "lrs.csv"], tmp_path, env)
    assert_ok(proc)
    lines = proc.stdout.splitlines()
    assert lines[0] == "common overrides: name=s debug=fast max_steps=3 eval_every=3"
    assert sum("| done |" in line for line in lines) == 2
    assert (tmp_path / "lrs.csv").read_text().count("optim.lr=") == 2 and (sweep / "summary.md").is_file()
    # The same sweep again resumes its members; another one under the same name is refused.
    proc = run_module("trainer.train", args, tmp_path, env)
    assert_ok(proc)
    assert proc.stderr.count("already complete") == 2
    other = [*args[:-1], "optim.lr=3e-2"]
    proc = run_module("trainer.train", other, tmp_path, env)
    assert proc.returncode == 2 and "holds a run of another sweep (optim.lr=0.001;" in proc.stderr, (
        proc.stderr
    )
    assert "name=" in proc.stderr and len(losses(sweep / "0")) == 3
    # A single run still goes to runs/<name>.
    assert_ok(run_module("trainer.train", ["debug=fast", "max_steps=1"], tmp_path, env))
    assert (tmp_path / "runs" / "default" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_a_basic_sweep_runs_on_past_members_that_exit_and_lists_why(tmp_path, env):
    """Hydra's basic launcher catches Exception only; a member that exits (bad config here) must not
    end the sweep: the next member trains, the sweep exits with the member's code, and
    `trainer.sweep` names the failed member and its reason."""
    args = ["-m", "name=f", "debug=fast", "max_steps=2", "eval_every=2", "optim.lr=-1,1e-3"]
    proc = run_module("trainer.train", args, tmp_path, env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    sweep = tmp_path / "runs" / "sweeps" / "f"
    assert len(losses(sweep / "1")) == 2  # the member after the failed one ran
    assert "Traceback" not in proc.stderr
    assert "sweep member 0 (optim.lr=-1) exited with code 2: optim.lr=-1.0 must be > 0" in proc.stderr, (
        proc.stderr[-3000:]
    )
    proc = run_module("trainer.sweep", [str(sweep)], tmp_path, env)
    assert_ok(proc)
    rows = {line.split("|")[2].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert "| done |" in rows["1"]
    assert "failed (exit 2): optim.lr=-1.0 must be > 0" in rows["0"], proc.stdout

    # A stop request (preemption) in a basic sweep: the member saves and the ones after it do not
    # start; the sweep exits 85 (requeue), every member listed as preempted; running it again resumes.
    args = ["-m", "name=p", "debug=fast", "max_steps=2", "eval_every=2", "optim.lr=1e-3,3e-3"]
    proc = run_module("trainer.train", args, tmp_path, env | {"TRAINER_STOP_REQUESTED": "15"})
    assert proc.returncode == EXIT_REQUEUE, proc.stderr[-3000:]
    proc = run_module("trainer.sweep", [str(tmp_path / "runs" / "sweeps" / "p")], tmp_path, env)
    assert_ok(proc)
    assert proc.stdout.count("preempted (exit 85): a stop was requested before this worker started") == 2, (
        proc.stdout
    )


def test_a_submitit_local_member_restarts_on_its_time_limit_signal(tmp_path, env):
    """hydra/launcher=local: USR2 (what submitit's local controller sends before the time limit)
    to the member's task: it saves, its controller starts it again, and it finishes from there."""
    steps = 60
    args = ["-m", "hydra/launcher=local", "name=loc", "debug=fast", f"max_steps={steps}", "eval_every=30",
            "checkpoint.every_steps=0", "optim.lr=1e-3"]  # fmt: skip
    proc = start_module("trainer.train", args, tmp_path, env)
    member = tmp_path / "runs" / "sweeps" / "loc" / "0"
    try:
        wait_for(lambda: len(train_steps(member)) >= 3, 120, "the sweep member training", interval=0.01)
        task = subprocess.run(
            ["pgrep", "-f", f"submitit.core._submit {tmp_path}"], capture_output=True, text=True
        ).stdout.split()
        assert len(task) == 1, task  # the member's one task (its controller runs another module)
        with frozen([int(task[0])]):  # the signal lands in the middle of the run, however late we are
            assert train_steps(member)[-1] < steps, "the member finished before it was signalled"
            os.kill(int(task[0]), signal.SIGUSR2)
        out, err = proc.communicate(timeout=300)
    except BaseException:
        kill_group(proc)
        raise
    assert proc.returncode == 0, (out + err)[-5000:]
    logs = "".join(p.read_text() for p in sorted((member.parent / ".submitit").glob("*/*_log.*")))
    resumed = re.findall(r"resumed from \S+ at step (\d+)", logs)
    assert len(resumed) == 1 and 0 < int(resumed[0]) < steps, logs[-5000:]
    assert train_steps(member) == list(range(1, steps + 1))  # every step once


def test_sweep_summary_of_a_missing_dir_says_so(tmp_path, env):
    proc = run_module("trainer.sweep", [str(tmp_path / "nope")], tmp_path, env)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


# --- bad input: a clear message and a non-zero exit, in bounded time -------------------------


def _fails_fast(proc, needle: str, within_s: float, started: float) -> None:
    assert proc.returncode != 0, proc.stdout
    assert needle in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - started < within_s


def test_port_in_use(tmp_path, env):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        args = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "debug=fast"]
        proc = run_script(TORCHRUN_SH, args, tmp_path, env, timeout=60)
    _fails_fast(proc, f"port {port} is in use", 30, t0)


def test_unresolvable_rendezvous_host(tmp_path, env):
    t0 = time.monotonic()
    args = ["--nnodes", "2", "--node-rank", "1", "--master-addr", "no-such-host.invalid", "debug=fast"]
    proc = run_script(TORCHRUN_SH, args, tmp_path, env, timeout=60)
    _fails_fast(proc, "cannot resolve the rendezvous host 'no-such-host.invalid'", 30, t0)


def test_unreachable_rendezvous_gives_up_after_the_timeout(tmp_path, env):
    """Node rank 1 of 2 while nothing listens at the rendezvous: no hang past RDZV_TIMEOUT."""
    t0 = time.monotonic()
    args = ["--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port",
            str(free_port()), "debug=fast"]  # fmt: skip
    proc = run_script(TORCHRUN_SH, args, tmp_path, env | {"RDZV_TIMEOUT": "5"}, timeout=120)
    _fails_fast(proc, "rendezvous at 127.0.0.1", 60, t0)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--nnodes", "2"], "--nnodes=2 needs --master-addr"),
        (
            ["--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"],
            "--node-rank=2 must be one of 0..1",
        ),
        (["--nproc", "two"], "--nproc=two is not a whole number"),
        (["--master-port"], "--master-port needs a value"),
        (["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", "0"], "works on one node only"),
        # Leading zeros are decimal (bash arithmetic would read 08 as a bad octal number).
        (["--nproc", "08", "--nnodes", "02"], "--nnodes=2 needs --master-addr"),
        (["--nnodes", "02", "--node-rank", "09", "--master-addr", "127.0.0.1"], "--node-rank=9 must be one"),
        (["--nnodes", "02", "--master-addr", "localhost", "--master-port", "099999"], "port=99999"),
        (["--rdzv-timeout", "00"], "must be >= 1"),
    ],
)
def test_bad_flags(tmp_path, env, args, needle):
    t0 = time.monotonic()
    proc = run_script(TORCHRUN_SH, ["debug=fast", *args], tmp_path, env, timeout=60)
    _fails_fast(proc, needle, 30, t0)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # our one line, no bash error first


def test_sbatch_script_outside_slurm(tmp_path, env):
    clean = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    proc = run_script(SBATCH, ["debug=fast"], tmp_path, clean, timeout=30)
    assert proc.returncode == 2
    assert "SLURM_JOB_ID is not set" in proc.stderr and "sbatch slurm/train.sbatch" in proc.stderr


def test_launcher_forwards_sigterm_too(tmp_path, env):
    """`kill <launcher>` (SIGTERM) is a stop request as well, not an abrupt kill of the workers; with
    --max-restarts the worker torchrun restarts after the save stops at once instead of training on."""
    args = [
        "--nproc",
        "1",
        "--max-restarts",
        "1",
        "debug=fast",
        "max_steps=500",
        "eval_every=0",
        "run_dir=out",
    ]
    rc, out = _stop_launcher(
        tmp_path, env, args, lambda _: len(train_steps(tmp_path / "out")) >= 2, signal.SIGTERM
    )
    assert rc == EXIT_REQUEUE, out[-3000:]
    assert "preempted" in out and (tmp_path / "out" / "checkpoints" / "latest").is_file()
    saved = (tmp_path / "out" / "checkpoints" / "latest").read_text().strip()
    assert saved == f"step-{train_steps(tmp_path / 'out')[-1]}" and "resumed from" not in out


def test_a_stop_request_before_the_workers_start_is_kept(tmp_path, env):
    """SIGUSR1 while the launcher is still importing torch: the workers exit 85 at once (before, the
    launcher died of the signal, or the request was lost and the job ran to its time limit)."""
    args = ["--nproc", "1", "debug=fast", "max_steps=500", "run_dir=out"]

    def started(launcher: subprocess.Popen) -> bool:
        # bash exec'd it and its handler is in place (before that USR1 kills it): it imports torch
        elastic = b"elastic.py" in Path(f"/proc/{launcher.pid}/cmdline").read_bytes()
        return elastic and catches(launcher.pid, signal.SIGUSR1)

    rc, out = _stop_launcher(tmp_path, env, args, started, signal.SIGUSR1)
    assert rc == EXIT_REQUEUE, out[-3000:]
    assert "stop was requested before this worker started" in out and not train_steps(tmp_path / "out")


def _stop_launcher(tmp_path, env, args: list[str], ready, sig: int) -> tuple[int, str]:
    """launch/torchrun.sh ``args``, sent ``sig`` once ``ready(process)``: (exit code, output).

    The workers that exist by then stay frozen until the launcher has passed the signal on to
    them: it reaches them where ready() saw them, not after their run ended, however late this
    process or the launcher gets the CPU."""
    launcher = subprocess.Popen(
        ["bash", str(TORCHRUN_SH), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: launcher.poll() is not None or ready(launcher), 120, "the launcher", interval=0.01)
        workers = []
        with contextlib.suppress(psutil.NoSuchProcess):  # exited: its exit code tells why
            workers = [p.pid for p in psutil.Process(launcher.pid).children()]  # torchrun's workers
        with frozen(workers):
            launcher.send_signal(sig)  # bash exec'd the launcher: this is its pid

            def passed_on() -> bool:
                with contextlib.suppress(FileNotFoundError):  # a worker gone: the exit code says
                    return all(pending(pid, sig) for pid in workers)
                return True

            wait_for(lambda: launcher.poll() is not None or passed_on(), 60, "the launcher", interval=0.01)
        out = launcher.communicate(timeout=120)[0].decode()
    finally:
        launcher.kill()
    return launcher.returncode, out
